"""A tiny data-parallel training job for the distributed tests, run under ``torchrun`` with the gloo backend.

DDP or FSDP2 (``fully_shard``) over a 2-layer MLP with dropout (so every rank's RNG matters), AdamW, a StepLR
schedule, a GradScaler (DDP) and a :class:`ResumableDataLoader`. Everything is deterministic given the world size,
so a straight run and a killed-and-resumed one must end bit-identical.

Files it writes into ``--dir`` (besides the checkpoints):

* ``progress_rank{R}.jsonl``: one line per step: step, the sample indices of the batch, pid, torchrun restart count;
* ``final_rank{R}.json``: sha256 of every local tensor shard, scheduler, scaler, sampler and RNG state at the end;
* ``error_rank{R}_step{S}.txt``: the text of a save error caught with ``--fail`` (the job then goes on).

Fault switches: ``--fail-rank R --fail S:dcp --fail T:files`` makes rank R's saves of steps S and T fail with
ENOSPC (while DCP writes its shard, or while writing its own rank files; the error text goes to
``error_rank{R}_step{S}.txt`` and the job goes on); ``--term-rank R --term-step S`` sends SIGTERM to rank R just
before ``maybe_save(S)``; ``--freeze-rank R --freeze-step S`` makes rank R (or, with ``--freeze-env VAR``, the rank
whose environment has VAR) enter, after step S of the job's first start, a barrier no other rank enters: a rank
stuck in a collective (``frozen.json`` in ``--dir`` records when, and keeps later starts from freezing again).
``--restore-only`` restores, records the sampler's next batches (``--peek`` steps) and the fingerprint, and exits
without saving.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import hashlib
import json
import os
import random
import signal
import sys
import time

# A line before the heavy imports: until its first heartbeat, `resumekit run --hang-timeout` judges a starting job by
# its output, and importing torch is the longest silent phase of a start (seconds on a loaded 2-core machine).
print(f"rank {os.environ.get('RANK', '?')}: starting (pid {os.getpid()})", flush=True)

import numpy as np  # noqa: E402 - after the line above
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from resumekit import CheckpointManager, CheckpointWriteError, ResumableDataLoader  # noqa: E402


def build(parallel: str, seed: int, width: int):
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = torch.nn.Sequential(
        torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(width, 1)
    )
    if parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def digest(x) -> str:
    from torch.distributed.tensor import DTensor

    if isinstance(x, DTensor):
        x = x.to_local()
    if isinstance(x, torch.Tensor):
        return hashlib.sha256(x.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    if isinstance(x, dict):
        return json.dumps({str(k): digest(v) for k, v in sorted(x.items(), key=lambda kv: str(kv[0]))})
    if isinstance(x, (list, tuple)):
        return json.dumps([digest(v) for v in x])
    if isinstance(x, np.ndarray):
        return hashlib.sha256(x.tobytes()).hexdigest()
    return repr(x)


def fingerprint(state) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = {
        "model": digest(get_model_state_dict(state["model"])),
        "optim": digest(get_optimizer_state_dict(state["model"], state["optim"])),
        "sched": digest(state["sched"].state_dict()),
        "loader": digest(state["loader"].state_dict()),
        "rng_torch": digest(torch.get_rng_state()),
        "rng_python": digest(random.getstate()),
        "rng_numpy": digest(np.random.get_state()[1]),
    }
    if "scaler" in state:
        out["scaler"] = digest(state["scaler"].state_dict())
    return out


def full_digest(state) -> dict:
    """Digests of the unsharded model and optimizer state: equal whatever the world size that holds them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    return {
        "model": digest(get_model_state_dict(state["model"], options=opts)),
        "optim": digest(get_optimizer_state_dict(state["model"], state["optim"], options=opts)),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--async", dest="async_save", action="store_true")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--fail-rank", type=int, default=-1)
    p.add_argument("--fail", action="append", default=[], metavar="STEP:dcp|files")
    p.add_argument("--term-rank", type=int, default=-1)
    p.add_argument("--term-step", type=int, default=-1)
    p.add_argument("--restore-only", action="store_true")
    p.add_argument("--peek", type=int, default=0)
    p.add_argument("--tag", default="")
    p.add_argument("--freeze-rank", type=int, default=-1)
    p.add_argument("--freeze-step", type=int, default=-1)
    p.add_argument("--freeze-env", default="", help="the rank whose environment has this variable freezes")
    a = p.parse_args(argv)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    # A line per startup phase: before its first heartbeat, `resumekit run --hang-timeout` judges a job by its output.
    print(f"rank {rank}: process group ready (world {world})", flush=True)
    model = build(a.parallel, 0, a.width)
    # Per-rank streams after the shared init: dropout masks differ between ranks, as in real jobs.
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(a.samples, 4, generator=g)
    y = x.sum(1, keepdim=True)
    ds = torch.utils.data.TensorDataset(torch.arange(a.samples), x, y)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.7)
    loader = ResumableDataLoader(ds, batch_size=a.batch, seed=3)
    state = {"model": model, "optim": opt, "sched": sched, "loader": loader}
    if a.parallel == "ddp":
        state["scaler"] = torch.amp.GradScaler("cpu")
    mgr = CheckpointManager(a.dir, every_steps=a.every, keep_last=3, async_save=a.async_save)
    step = mgr.restore(state)
    print(f"rank {rank}: resumed from step {step}", flush=True)
    suffix = f"{a.tag}_rank{rank}" if a.tag else f"rank{rank}"

    if a.restore_only:
        restored = {"loader": state["loader"].state_dict(), "sched": state["sched"].state_dict()}
        seen = []
        for _, (idx, _, _) in zip(range(a.peek), loader, strict=False):  # the first a.peek batches only
            seen.append(idx.tolist())
        with open(os.path.join(a.dir, f"restored_{suffix}.json"), "w") as f:
            json.dump({"step": step, "world": world, "next": seen, "full": full_digest(state), **restored}, f)
        mgr.close()
        # every rank done with every group before any tears its gloo pairs down (teardown races abort)
        dist.barrier()
        dist.destroy_process_group()
        return

    if rank == a.fail_rank:
        _inject_failures({int(f.split(":")[0]): f.split(":")[1] for f in a.fail})
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    frozen_marker = os.path.join(a.dir, "frozen.json")
    # Created by every rank (group creation is collective); only the frozen rank ever uses it.
    freeze_group = (
        dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=600)) if a.freeze_step >= 0 else None
    )
    freezes = rank == a.freeze_rank or bool(a.freeze_env and os.environ.get(a.freeze_env))
    progress = open(os.path.join(a.dir, f"progress_{suffix}.jsonl"), "a", buffering=1)
    # The epoch comes from the restored sampler, not from step // steps-per-epoch: the steps per epoch change with the
    # world size, and a job restarted on fewer ranks must go on in the epoch (and at the position) it was saved in.
    epoch = loader.epoch
    while step < a.steps:
        loader.set_epoch(epoch)
        epoch += 1
        for idx, xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            if "scaler" in state:
                state["scaler"].scale(loss).backward()
                state["scaler"].step(opt)
                state["scaler"].update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            step += 1
            progress.write(
                json.dumps({"step": step, "rank": rank, "idx": idx.tolist(), "pid": os.getpid(), "restart": restart})
                + "\n"
            )
            _STEP[0] = step
            if freezes and step == a.freeze_step and not os.path.exists(frozen_marker):
                with open(frozen_marker, "w") as f:
                    json.dump({"time": time.time(), "rank": rank, "step": step, "pid": os.getpid()}, f)
                dist.barrier(group=freeze_group)  # the other ranks never come: stuck until killed
            if rank == a.term_rank and step == a.term_step:
                os.kill(os.getpid(), signal.SIGTERM)
            try:
                mgr.maybe_save(step, state)
            except CheckpointWriteError as e:
                with open(os.path.join(a.dir, f"error_{suffix}_step{step}.txt"), "w") as f:
                    f.write(str(e))
            if step >= a.steps:
                break
    mgr.save(a.steps, state, block=True)
    mgr.close()
    with open(os.path.join(a.dir, f"final_{suffix}.json"), "w") as f:
        json.dump(fingerprint(state), f, indent=1)
    progress.close()
    # every rank done with every group before any tears its gloo pairs down (teardown races abort)
    dist.barrier()
    dist.destroy_process_group()


_STEP = [0]


def _inject_failures(plan: dict) -> None:
    """Make this rank's save fail with ENOSPC at the planned steps, in the planned phase."""
    from torch.distributed.checkpoint import FileSystemWriter

    import resumekit.distributed.sharded as rd

    def boom(phase: str) -> None:
        if plan.get(_STEP[0]) == phase:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")

    orig_write_data = FileSystemWriter.write_data
    orig_write_tensors = rd.write_tensors

    def write_data(self, plan_, planner):
        boom("dcp")
        return orig_write_data(self, plan_, planner)

    def write_tensors(f, tensors, h):
        boom("files")
        return orig_write_tensors(f, tensors, h)

    FileSystemWriter.write_data = write_data
    rd.write_tensors = write_tensors


if __name__ == "__main__":
    main(sys.argv[1:])
