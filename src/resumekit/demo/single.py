"""The single-process demonstration behind ``resumekit demo`` (and ``make demo``).

It trains a small model on synthetic data twice: once straight, once under ``resumekit run`` while this module
SIGKILLs the job at random moments, some of them while a checkpoint is being written. It then compares the two final
states bit for bit (model, optimizer, scheduler, grad scaler, data position, RNGs) and the batches each step saw.

The job itself runs as ``python -m resumekit.demo.single --worker --dir D ...`` (see :func:`job_cmd`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from itertools import pairwise

from ..events import EVENTS_FILE, iter_events, read_events
from .core import (
    CrashStats,
    ProgressTail,
    closing_fields,
    count_events,
    fresh_run_dirs,
    parse_worker_args,
    report,
    saving,
    supervisor_cmd,
    tree_diff,
    worker_args,
)

PROGRESS = "progress.jsonl"  # one {"step", "batch", "loss", "pid"} record per step
WORKER_MODULE = "resumekit.demo.single"


# ------------------------------------------------------------------------------------------------ the job
def train(
    directory: str, steps: int, save_every: int, seed: int = 0, async_save: bool = False, width: int = 512
) -> None:
    """The training job: plain PyTorch plus the four resumekit lines. Deterministic given ``seed``.

    Args:
        directory: the checkpoint directory (the progress log goes there too).
        steps: train until this step.
        save_every: checkpoint every this many steps.
        seed: seeds the data, the weights, the data order and every RNG.
        async_save: write checkpoints in the background.
        width: the hidden width of the model.
    """
    import hashlib

    import numpy as np
    import torch

    from ..data import ResumableDataLoader
    from ..manager import CheckpointManager

    torch.set_num_threads(1)  # same kernels, same thread split: bitwise reproducible on one machine
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2048, 64, generator=g)
    y = (x[:, :8].sum(1, keepdim=True) > 0).float()
    ds = torch.utils.data.TensorDataset(torch.arange(len(x)), x, y)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(width, width),
        torch.nn.ReLU(),
        torch.nn.Linear(width, 1),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    scaler = torch.amp.GradScaler("cpu")
    loader = ResumableDataLoader(ds, batch_size=32, seed=seed)
    mgr = CheckpointManager(directory, every_steps=save_every, keep_last=3, async_save=async_save)
    state = {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "loader": loader}
    step = mgr.restore(state)
    per_epoch = -(-len(ds) // 32)  # batches per epoch (the last one may be short)
    # Open for the whole loop, which the demo kills on purpose; line buffering puts each line on disk at once.
    progress = open(os.path.join(directory, PROGRESS), "a", buffering=1)  # noqa: SIM115
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
            batch_hash = hashlib.sha1(idx.numpy().tobytes()).hexdigest()[:12]
            progress.write(
                json.dumps({"step": step, "batch": batch_hash, "loss": round(loss.item(), 6), "pid": os.getpid()})
                + "\n"
            )
            mgr.maybe_save(step, state, metrics={"loss": loss.item()})
            if step >= steps:
                break
        else:
            continue
        break
    mgr.save(steps, state, block=True)  # the final state both runs are compared on
    mgr.close()
    progress.close()


def job_cmd(directory: str, steps: int, save_every: int, seed: int, async_save: bool) -> list[str]:
    """The command line that runs :func:`train` in a fresh Python process (the arguments are those of
    :func:`resumekit.demo.core.worker_args`).

    Returns:
        ``[python, "-m", "resumekit.demo.single", "--worker", ...]``.
    """
    return [sys.executable, *worker_args(WORKER_MODULE, directory, steps, save_every, seed, async_save)]


# ----------------------------------------------------------------------------------------- comparison
def compare_final(a: str, b: str, step: int) -> list[str]:
    """Keys whose values differ between two runs' final checkpoints.

    Args:
        a: one run's checkpoint directory.
        b: the other's.
        step: the step of the checkpoint compared in both.

    Returns:
        The differing paths, sorted; empty when bitwise identical.
    """
    from ..checkpointers.native import read_checkpoint
    from ..format import step_dirname
    from ..storage import open_storage

    _, ta = read_checkpoint(open_storage(a, create=False), step_dirname(step))
    _, tb = read_checkpoint(open_storage(b, create=False), step_dirname(step))
    return sorted(tree_diff(ta, tb))


def batch_sequence(directory: str) -> dict[int, str]:
    """step -> batch hash, the last record winning (a redone step after a kill overwrites the lost one).

    Args:
        directory: the run directory holding the progress log.

    Returns:
        The batch hash seen at each step.
    """
    return {rec["step"]: rec["batch"] for rec in iter_events(os.path.join(directory, PROGRESS))}


def progress_attempts(directory: str) -> list[tuple[int, int, int]]:
    """(pid, first step, last step) of each attempt, in start order, from the whole progress log.

    Args:
        directory: the run directory holding the progress log.

    Returns:
        One tuple per process that trained.
    """
    order: dict[int, list[int]] = {}
    for rec in iter_events(os.path.join(directory, PROGRESS)):  # JSONL reader that skips lines torn by a kill
        order.setdefault(rec["pid"], []).append(rec["step"])
    return [(pid, min(v), max(v)) for pid, v in order.items()]


# ---------------------------------------------------------------------------------------- crash loop
def run_with_kills(
    directory: str,
    steps: int,
    save_every: int,
    seed: int,
    crashes: int,
    rng: random.Random,
    async_save: bool = False,
    timeout: float = 600.0,
) -> CrashStats:
    """Run the job under ``resumekit run`` and SIGKILL it ``crashes`` times; the supervisor restarts it each time.

    The first kill, and about 40% of the others, land while a checkpoint is being written; the rest after a
    random delay.

    Args:
        directory: the (empty) run directory.
        steps: the job's length.
        save_every: the job's checkpoint interval.
        seed: the job's seed.
        crashes: how many kills.
        rng: picks the kind and moment of each kill.
        async_save: the job writes checkpoints in the background.
        timeout: seconds the whole run may take.

    Returns:
        What happened: kills, restarts, skipped checkpoints, steps redone, one record per attempt.
    """
    stats = CrashStats()
    env = dict(os.environ, RESUMEKIT_TEST_SAVE_PAUSE="0.02", PYTHONUNBUFFERED="1")
    extra = ["--crash-loop", str(crashes + 2), "--json"]
    sup_cmd = [*supervisor_cmd(directory, max_restarts=crashes + 3, extra=extra), "--"]
    sup = subprocess.Popen(
        sup_cmd + job_cmd(directory, steps, save_every, seed, async_save), env=env, stdout=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    killed_pids = set()
    tail = ProgressTail(directory, PROGRESS)
    try:
        while stats.kills < crashes and sup.poll() is None and time.monotonic() < deadline:
            tail.poll()
            pids = list(tail.latest)  # in start order: the last one is the attempt running now
            if not pids or pids[-1] in killed_pids:
                time.sleep(0.005)
                continue
            pid = pids[-1]
            aim_at_save = stats.kills == 0 or rng.random() < 0.4
            t_seen, delay = time.monotonic(), rng.uniform(0.05, 1.2)
            last_poll = t_seen
            while sup.poll() is None:
                now = time.monotonic()
                if now - last_poll >= 0.02:
                    # An attempt about to finish before its kill came (no save caught in an async save's short
                    # window, or a delay longer than a fast warm attempt's remaining steps): kill it now rather than
                    # let the run end with a kill missing.
                    tail.poll()
                    last_poll = now
                    if tail.latest.get(pid, (0, 0))[1] >= steps - save_every // 2:
                        aim_at_save = False
                        delay = 0.0
                if (aim_at_save and saving(directory)) or (not aim_at_save and now - t_seen >= delay):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        break  # it finished on its own first
                    killed_pids.add(pid)
                    stats.kills += 1
                    time.sleep(0.01)
                    stats.kills_mid_save += int(saving(directory))
                    break
                time.sleep(0.002)
        out, _ = sup.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if sup.poll() is None:
            sup.kill()
    try:
        stats.summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        stats.summary = {}
    stats.exit_code = sup.returncode
    restores = {
        e.get("pid"): e.get("step", 0)
        for e in read_events(os.path.join(directory, EVENTS_FILE))
        if e.get("event") == "restore"
    }
    for i, (pid, first, last) in enumerate(progress_attempts(directory)):
        stats.attempts.append(
            {
                "attempt": i,
                "pid": pid,
                "resumed_from": restores.get(pid, first - 1),
                "reached": last,
                "killed": pid in killed_pids,
            }
        )
    stats.restarts = int(stats.summary.get("restarts", len(stats.attempts) - 1))
    stats.skipped_invalid = count_events(directory, "skip_invalid")
    for prev, nxt in pairwise(stats.attempts):
        stats.steps_redone += max(0, prev["reached"] - nxt["resumed_from"])
    return stats


def run_single_demo(
    directory: str,
    *,
    crashes: int = 6,
    steps: int = 300,
    seed: int | None = None,
    as_json: bool = False,
    save_every: int = 20,
    async_save: bool = False,
) -> int:
    """Straight run vs killed-and-restarted run of the single-process job.

    Args:
        directory: where both runs write (``straight/`` and ``crashy/``, emptied first).
        crashes: how many SIGKILLs.
        steps: the job's length.
        seed: the kill seed (random when None; printed so a run can be repeated).
        as_json: print one JSON object instead of the table.
        save_every: the job's checkpoint interval.
        async_save: the job writes checkpoints in the background.

    Returns:
        0 only if both runs end bitwise identical, saw the same batches and the supervisor exited 0; else 1.
    """
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    straight, crashy = fresh_run_dirs(directory)
    t0 = time.monotonic()
    subprocess.run(job_cmd(straight, steps, save_every, 0, async_save), check=True)
    t_straight = time.monotonic() - t0
    t0 = time.monotonic()
    stats = run_with_kills(crashy, steps, save_every, 0, crashes, rng, async_save=async_save)
    t_crashy = time.monotonic() - t0
    diffs = compare_final(straight, crashy, steps)
    sa, sb = batch_sequence(straight), batch_sequence(crashy)
    batches_equal = sa == sb and len(sa) == steps
    result = {
        "identical": not diffs and batches_equal and stats.exit_code == 0,
        "kills": stats.kills,
        "kills_mid_save": stats.kills_mid_save,
        "restarts": stats.restarts,
        "skipped_invalid": stats.skipped_invalid,
        "steps_redone": stats.steps_redone,
        "supervisor_exit": stats.exit_code,
        "supervisor_summary": stats.summary,
        "differing_keys": diffs,
        "batch_sequence_equal": batches_equal,
        **closing_fields(steps=steps, seed=seed, t_straight=t_straight, t_crashy=t_crashy, directory=directory),
    }
    rows = [
        ("kills (SIGKILL)", stats.kills),
        ("  of which during a save", stats.kills_mid_save),
        ("restarts", stats.restarts),
        ("checkpoints skipped as invalid", stats.skipped_invalid),
        ("steps redone", stats.steps_redone),
        ("steps", steps),
        ("supervisor exit code", stats.exit_code),
    ]
    return report(
        result,
        as_json=as_json,
        title="train straight, then again under `resumekit run` with random SIGKILLs",
        rows=rows,
        batches_label="same batch at every step",
        t_straight=t_straight,
        t_crashy=t_crashy,
    )


# --------------------------------------------------------------------------------------- entry point
def worker_main(argv: list[str] | None = None) -> None:
    """``python -m resumekit.demo.single --worker --dir D [--steps N] [--save-every K] [--seed S] [--async]``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
    """
    a = parse_worker_args(f"python -m {WORKER_MODULE}", argv, steps=300, save_every=20)
    train(a.dir, a.steps, a.save_every, a.seed, a.async_save)


__all__ = [
    "PROGRESS",
    "batch_sequence",
    "compare_final",
    "job_cmd",
    "progress_attempts",
    "run_single_demo",
    "run_with_kills",
    "train",
    "worker_main",
]

if __name__ == "__main__":
    worker_main()
