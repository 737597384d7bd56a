"""The multi-process crash-and-resume demonstration behind ``resumekit demo --nproc N``.

A DDP job (gloo on CPU) runs under ``torchrun --nproc-per-node N``: once straight, once under
``resumekit run -- torchrun --max-restarts K ...`` while this module SIGKILLs one random worker at random moments,
some of them while a sharded checkpoint is being written. torchrun's elastic agent tears the group down and starts it
again; every rank resumes from the newest checkpoint valid on all ranks. The two runs' final checkpoints are then
compared bit for bit (every tensor unsharded, every rank's scheduler/scaler/sampler/RNG state) together with the
batches every rank saw at every step.

Each rank runs as ``torchrun ... -m resumekit.demo.distributed --worker --dir D ...`` (see :func:`job_args`).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..events import iter_events
from .core import (
    CrashStats,
    ProgressTail,
    closing_fields,
    count_events,
    final_diffs,
    fresh_run_dirs,
    parse_worker_args,
    report,
    saving,
    stop_tree,
    supervisor_cmd,
    tree_diff,
    worker_args,
)

PROGRESS_GLOB = "progress_rank"  # progress_rank{R}.jsonl: {"step", "rank", "pid", "batch", ...} per step
PROGRESS_PATTERN = f"{PROGRESS_GLOB}*.jsonl"
WORKER_MODULE = "resumekit.demo.distributed"


# ------------------------------------------------------------------------------------------------ the job
def train(
    directory: str,
    steps: int,
    save_every: int,
    seed: int = 0,
    async_save: bool = False,
    width: int = 128,
    progress_dir: str | None = None,
) -> None:
    """One rank of the DDP job: plain PyTorch plus the resumekit lines. Deterministic given seed and world.

    The node's local tier, when the node has one, is ``RESUMEKIT_LOCAL_TIER`` (which ``resumekit run --local-tier``
    exports; the multi-node demo sets it per node otherwise): required for an object-store ``directory``.

    Args:
        directory: the checkpoint directory, or an object-store root (``s3://bucket/prefix``).
        steps: train until this step.
        save_every: checkpoint every this many steps.
        seed: seeds the data, the weights, the data order and every RNG (one stream per rank).
        async_save: write checkpoints in the background.
        width: the hidden width of the model.
        progress_dir: a local directory for the ranks' progress logs (None: ``directory``).
    """
    import hashlib

    import numpy as np
    import torch
    import torch.distributed as dist

    from ..data import ResumableDataLoader
    from ..manager import CheckpointManager

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)  # identical initial weights everywhere
    model: torch.nn.Module = torch.nn.Sequential(  # a Module: wrapped in DDP below
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 1),
    )
    # No bucket rebuild (find_unused_parameters turns it off): DDP otherwise regroups its gradient buckets after the
    # first iteration of every process, so a restarted process reduces its first step with another layout. With 3 or
    # more ranks the float sum then runs in another order ((a+b)+c != a+(b+c)) and the run is no longer bitwise
    # equal to the straight one; with 2 it is (a+b == b+a).
    model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    random.seed(seed * 1000 + rank)  # then one stream per rank: dropout masks differ between ranks
    np.random.seed(seed * 1000 + rank)
    torch.manual_seed(seed * 1000 + rank)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(1024, 64, generator=g)
    y = (x[:, :8].sum(1, keepdim=True) > 0).float()
    ds = torch.utils.data.TensorDataset(torch.arange(len(x)), x, y)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    scaler = torch.amp.GradScaler("cpu")
    loader = ResumableDataLoader(ds, batch_size=16, seed=seed)
    from ..events import ENV_LOCAL_TIER

    tier = os.environ.get(ENV_LOCAL_TIER) or None  # this node's own directory (per node, never shared)
    mgr = CheckpointManager(directory, every_steps=save_every, keep_last=3, async_save=async_save, local_tier=tier)
    state = {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "loader": loader}
    step = mgr.restore(state)
    sampler = loader.resumable_sampler
    assert sampler is not None  # a map-style dataset always gets one (only an IterableDataset has none)
    per_epoch = sampler.epoch_length // (16 * world)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    # Open for the whole loop, which the demo kills on purpose; line buffering puts each line on disk at once.
    progress_path = os.path.join(progress_dir or directory, f"{PROGRESS_GLOB}{rank}.jsonl")
    progress = open(progress_path, "a", buffering=1)  # noqa: SIM115
    while step < steps:
        loader.set_epoch(step // per_epoch)
        for idx, xb, yb in loader:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            batch = hashlib.sha1(idx.numpy().tobytes()).hexdigest()[:12]
            progress.write(
                json.dumps(
                    {
                        "step": step,
                        "rank": rank,
                        "batch": batch,
                        "loss": round(loss.item(), 6),
                        "pid": os.getpid(),
                        "restart": restart,
                    }
                )
                + "\n"
            )
            mgr.maybe_save(step, state, metrics={"loss": loss.item()})
            if step >= steps:
                break
    mgr.save(steps, state, block=True)  # the final state both runs are compared on
    mgr.close()
    progress.close()
    # every rank done with every group before any tears its gloo pairs down (teardown races abort)
    dist.barrier()
    dist.destroy_process_group()


def job_args(
    directory: str, steps: int, save_every: int, seed: int, async_save: bool, progress: str | None = None
) -> list[str]:
    """torchrun's arguments after its own options: run :func:`train` on every rank (the arguments are those of
    :func:`resumekit.demo.core.worker_args`; ``progress`` is where the ranks' progress logs go).

    Returns:
        ``["-m", "resumekit.demo.distributed", "--worker", ...]``.
    """
    return worker_args(WORKER_MODULE, directory, steps, save_every, seed, async_save, progress)


# ----------------------------------------------------------------------------------------- comparison
def compare_final(a: str, b: str, step: int) -> list[str]:
    """What differs between two runs' final sharded checkpoints.

    Args:
        a: one run's checkpoint directory.
        b: the other's.
        step: the step of the checkpoint compared in both.

    Returns:
        The differing paths (``shards/...`` for tensors, ``ranks/...`` for per-rank state), sorted; empty when
        bitwise identical.
    """
    from ..distributed import read_sharded
    from ..format import step_dirname

    _, ta, ra = read_sharded(os.path.join(a, step_dirname(step)))
    _, tb, rb = read_sharded(os.path.join(b, step_dirname(step)))
    return sorted(tree_diff(ta, tb, "shards") + tree_diff(ra, rb, "ranks"))


def read_progress(directory: str) -> dict[int, list[dict[str, Any]]]:
    """rank -> progress records in file order (a torn last line from a kill is skipped).

    Args:
        directory: the run directory holding ``progress_rank{R}.jsonl``.

    Returns:
        Every rank's records.
    """
    out: dict[int, list[dict[str, Any]]] = {}
    for name in sorted(os.listdir(directory)):
        if not fnmatch.fnmatchcase(name, PROGRESS_PATTERN):
            continue
        for rec in iter_events(os.path.join(directory, name)):  # skips a line torn by a kill
            out.setdefault(int(rec["rank"]), []).append(rec)
    return out


def batch_sequences(directory: str, key: str = "batch") -> dict[int, dict[int, Any]]:
    """rank -> {step -> batch}, the last record winning (a step redone after a kill replaces the lost one).

    Args:
        directory: the run directory holding the progress logs.
        key: the record field to collect.

    Returns:
        Each rank's value of ``key`` at each step.
    """
    return {r: {rec["step"]: rec[key] for rec in recs} for r, recs in read_progress(directory).items()}


def same_batches(straight: str, crashy: str, *, world: int, steps: int) -> bool:
    """Whether every rank of both runs saw the same batch at every step, each of ``world`` ranks all ``steps``.

    Args:
        straight: the straight run's directory.
        crashy: the killed run's directory.
        world: ranks of the job.
        steps: the job's length.

    Returns:
        True when the batch sequences are equal and complete.
    """
    sa, sb = batch_sequences(straight), batch_sequences(crashy)
    return sa == sb and len(sa) == world and all(len(v) == steps for v in sa.values())


# ------------------------------------------------------------------------------------------- torchrun
def free_port() -> int:
    """A TCP port free right now on this host (for torchrun's rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, job: Sequence[str], *, max_restarts: int = 0, port: int | None = None) -> list[str]:
    """``torchrun`` on this host with a c10d rendezvous on a free port, restarting the group up to N times.

    Args:
        nproc: processes per node.
        job: the script and its arguments, or ``-m module ...``.
        max_restarts: group restarts torchrun's agent may make.
        port: the rendezvous port (default: a free one).

    Returns:
        The command line.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port or free_port()}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.1",
        "--rdzv-conf=join_timeout=60",
        *job,
    ]


def torchrun_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for torchrun jobs that restart.

    One CPU thread per worker, unbuffered output, and ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the agent's
    store shared (the default since torch 2.5) a restarted group can read the previous attempt's gloo/NCCL
    addresses and fail to connect (pytorch#135712).

    Args:
        base: the environment to start from (default: this process's).

    Returns:
        A new environment dict.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def demo_env() -> dict[str, str]:
    """:func:`torchrun_env` without a supervisor's hand-off (``RESUMEKIT_RESUME_FROM``, ``_HEARTBEAT``, ``_EVENTS``,
    ``_DIR``): a demo started under ``resumekit run`` must not hand its own supervisor's files to its jobs.

    Returns:
        A new environment dict.
    """
    env = torchrun_env()
    for k in ("RESUMEKIT_RESUME_FROM", "RESUMEKIT_HEARTBEAT", "RESUMEKIT_EVENTS", "RESUMEKIT_DIR"):
        env.pop(k, None)
    return env


# ---------------------------------------------------------------------------------------- crash loop
def run_torchrun_with_kills(
    command: Sequence[str],
    directory: str,
    *,
    nproc: int,
    crashes: int,
    rng: random.Random,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
    log_path: str | None = None,
    last_step: int | None = None,
) -> CrashStats:
    """Run ``command`` (torchrun, or ``resumekit run -- torchrun ...``) and SIGKILL one random worker ``crashes``
    times.

    The first kill, and about 40% of the others, land while a checkpoint is being written, the rest after a random
    number of steps. Workers are found through their progress files (``progress_rank{R}.jsonl`` lines with
    ``pid``, ``rank`` and ``step``).

    Args:
        command: what to run; it is started in a session of its own.
        directory: the run directory the workers write their progress and checkpoints to.
        nproc: workers per generation.
        crashes: how many kills.
        rng: picks the kind, the moment and the victim of each kill.
        env: the command's environment (default: this process's).
        timeout: seconds the whole run may take.
        log_path: where the command's output is appended (default: discarded).
        last_step: the job's length; kills aimed at a step never aim past ``last_step - 2``, so every kill lands
            before the job ends.

    Returns:
        The kills (one record per kill in ``attempts``) and the command's exit code. Every process it started is
        gone when it returns.
    """
    stats = CrashStats()
    tail = ProgressTail(directory, PROGRESS_PATTERN)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - the child's stdout, for its lifetime
    proc = subprocess.Popen(list(command), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    dead: set = set()
    try:
        while stats.kills < crashes and proc.poll() is None and time.monotonic() < deadline:
            tail.poll()
            # The current generation: every rank has reported from a pid not yet known dead.
            live = {rank: (pid, step) for pid, (rank, step) in tail.latest.items() if pid not in dead}
            if len(live) < nproc:
                time.sleep(0.005)
                continue
            aim_at_save = stats.kills == 0 or rng.random() < 0.4
            target = max(s for _, s in live.values()) + rng.randint(1, 12)
            if last_step is not None:
                target = min(target, last_step - 2)
            victim_rank = rng.randrange(nproc)
            while proc.poll() is None and time.monotonic() < deadline:
                tail.poll()
                steps_now = max(s for p, (_, s) in tail.latest.items() if p not in dead)
                if (aim_at_save and saving(directory)) or (not aim_at_save and steps_now >= target):
                    break
                time.sleep(0.002)
            else:
                break
            pid = live[victim_rank][0]
            # Every pid of this generation is about to be torn down by torchrun's agent (or has finished).
            dead |= {p for p, _ in live.values()}
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # it finished on its own first: not a kill
            mid_save = saving(directory)
            stats.kills += 1
            stats.kills_mid_save += int(mid_save)
            stats.attempts.append(
                {"killed_rank": victim_rank, "pid": pid, "at_step": live[victim_rank][1], "mid_save": mid_save}
            )
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_tree(proc)
        if log_path:
            log.close()  # type: ignore[union-attr]
    stats.exit_code = proc.returncode
    stats.restarts = stats.kills
    return stats


def run_distributed_demo(
    directory: str,
    *,
    nproc: int,
    crashes: int = 4,
    steps: int = 120,
    seed: int | None = None,
    as_json: bool = False,
    save_every: int = 10,
    async_save: bool = False,
) -> int:
    """Straight ``torchrun`` run vs one SIGKILLed and restarted by torchrun under ``resumekit run``.

    Args:
        directory: where both runs write (``straight/`` and ``crashy/``, emptied first).
        nproc: processes per run.
        crashes: how many worker SIGKILLs.
        steps: the job's length.
        seed: the kill seed (random when None; printed so a run can be repeated).
        as_json: print one JSON object instead of the table.
        save_every: the job's checkpoint interval.
        async_save: the job writes checkpoints in the background.

    Returns:
        0 only if both runs end bitwise identical, every rank saw the same batches and the command exited 0.
    """
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    straight, crashy = fresh_run_dirs(directory)
    env = demo_env()
    t0 = time.monotonic()
    with open(os.path.join(straight, "torchrun.log"), "wb") as log:
        r = subprocess.run(
            torchrun_cmd(nproc, job_args(straight, steps, save_every, 0, async_save)),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    t_straight = time.monotonic() - t0
    if r.returncode != 0:
        print(
            f"resumekit demo: the straight run failed (exit {r.returncode}); see {straight}/torchrun.log",
            file=sys.stderr,
        )
        return 1
    t0 = time.monotonic()
    job = torchrun_cmd(nproc, job_args(crashy, steps, save_every, 0, async_save), max_restarts=crashes + 1)
    sup = [*supervisor_cmd(crashy, max_restarts=2), "--"]
    stats = run_torchrun_with_kills(
        sup + job,
        crashy,
        nproc=nproc,
        crashes=crashes,
        rng=rng,
        env=dict(env, RESUMEKIT_TEST_SAVE_PAUSE="0.05"),
        log_path=os.path.join(crashy, "torchrun.log"),
        last_step=steps,
    )
    t_crashy = time.monotonic() - t0
    stats.skipped_invalid = count_events(crashy, "skip_invalid")
    diffs = final_diffs(compare_final, straight, crashy, steps)
    batches_equal = same_batches(straight, crashy, world=nproc, steps=steps)
    result = {
        "identical": not diffs and batches_equal and stats.exit_code == 0,
        "nproc": nproc,
        "kills": stats.kills,
        "kills_mid_save": stats.kills_mid_save,
        "restarts": stats.restarts,
        "skipped_invalid": stats.skipped_invalid,
        "exit_code": stats.exit_code,
        "differing_keys": diffs,
        "batch_sequence_equal": batches_equal,
        **closing_fields(
            steps=steps,
            seed=seed,
            t_straight=t_straight,
            t_crashy=t_crashy,
            directory=directory,
            kills_detail=stats.attempts,
        ),
    }
    rows = [
        ("processes (torchrun)", nproc),
        ("kills (SIGKILL of one worker)", stats.kills),
        ("  of which during a save", stats.kills_mid_save),
        ("group restarts", stats.restarts),
        ("checkpoints skipped as invalid", stats.skipped_invalid),
        ("steps", steps),
        ("exit code", stats.exit_code),
    ]
    return report(
        result,
        as_json=as_json,
        title=f"{nproc}-process DDP under torchrun, straight, then again under `resumekit run -- torchrun` "
        "with random worker SIGKILLs",
        rows=rows,
        batches_label="same batch at every step/rank",
        t_straight=t_straight,
        t_crashy=t_crashy,
    )


# --------------------------------------------------------------------------------------- entry point
def worker_main(argv: list[str] | None = None) -> None:
    """``torchrun ... -m resumekit.demo.distributed --worker --dir D [--steps N] [--save-every K] [--seed S]
    [--progress P] [--async]``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    a = parse_worker_args(f"torchrun -m {WORKER_MODULE}", argv, steps=120, save_every=10)
    train(a.dir, a.steps, a.save_every, a.seed, a.async_save, progress_dir=a.progress)


__all__ = [
    "PROGRESS_GLOB",
    "PROGRESS_PATTERN",
    "batch_sequences",
    "compare_final",
    "demo_env",
    "free_port",
    "job_args",
    "read_progress",
    "run_distributed_demo",
    "run_torchrun_with_kills",
    "same_batches",
    "torchrun_cmd",
    "torchrun_env",
    "train",
    "worker_main",
]

if __name__ == "__main__":
    worker_main()
