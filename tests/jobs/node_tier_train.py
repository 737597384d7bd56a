"""A tiny FSDP2 (or DDP) job for the node-local tier tests, run under ``torchrun`` with the gloo backend.

Every "node" gets its own local tier under ``--tier-root``: ``node<R>`` per rank with ``--tier-by rank`` (two
simulated nodes inside one ``torchrun --nproc-per-node 2``), ``node<GROUP_RANK>`` with ``--tier-by node`` (one
directory per ``torchrun --nnodes`` agent). The shared durable root is ``--dir``.

Writes ``final_rank{R}.json`` (sha256 of every local tensor shard, the scheduler, the sampler and the RNG states)
and ``start_rank{R}.json`` (the step ``restore`` returned) into ``--out`` (default ``--dir``; an ``s3://`` root needs
a directory for them).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from resumekit import CheckpointManager, ResumableDataLoader


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


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--tier-root", required=True)
    p.add_argument("--out", default=None)
    p.add_argument("--tier-by", choices=["rank", "node"], default="rank")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="fsdp")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--keep", type=int, default=4)
    a = p.parse_args(argv)
    out = a.out or a.dir

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    node = rank if a.tier_by == "rank" else int(os.environ.get("GROUP_RANK", "0"))
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
    if a.parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 4, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.7)
    loader = ResumableDataLoader(ds, batch_size=4, seed=3)
    state = {"model": model, "optim": opt, "sched": sched, "loader": loader}
    mgr = CheckpointManager(
        a.dir,
        every_steps=a.every,
        keep_last=a.keep,
        local_tier=os.path.join(a.tier_root, f"node{node}"),
    )
    step = mgr.restore(state)
    with open(os.path.join(out, f"start_rank{rank}.json"), "w") as f:
        json.dump({"step": step}, f)
    per_epoch = loader.resumable_sampler.epoch_length // (4 * dist.get_world_size())
    while step < a.steps:
        loader.set_epoch(step // per_epoch)
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            mgr.maybe_save(step, state)
            if step >= a.steps:
                break
    mgr.close()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = {
        "model": digest(get_model_state_dict(model)),
        "optim": digest(get_optimizer_state_dict(model, opt)),
        "sched": digest(sched.state_dict()),
        "loader": digest(loader.state_dict()),
        "rng": digest([torch.get_rng_state(), np.random.get_state()[1], random.getstate()]),
    }
    with open(os.path.join(out, f"final_rank{rank}.json"), "w") as f:
        json.dump(final, f, indent=1)
    dist.barrier()  # every rank done with every group before any tears its gloo pairs down
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
