"""The crash-and-resume demonstration behind ``resumekit demo`` (and ``make demo``).

It trains a small model on synthetic data twice: once straight, once under a restart loop that SIGKILLs the job at
random moments, some of them while a checkpoint is being written. It then compares the two final states bit for
bit (model, optimizer, scheduler, grad scaler, data position, RNGs) and the batches each step saw.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .events import iter_events

PROGRESS = "progress.jsonl"


# ------------------------------------------------------------------------------------------------ the job
def train(directory: str, steps: int, save_every: int, seed: int = 0, async_save: bool = False,
          width: int = 512) -> None:
    """The training job: plain PyTorch plus the four resumekit lines. Deterministic given ``seed``."""
    import hashlib

    import torch

    from .data import ResumableDataLoader
    from .manager import CheckpointManager

    import numpy as np

    torch.set_num_threads(1)  # same kernels, same thread split: bitwise reproducible on one machine
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2048, 64, generator=g)
    y = (x[:, :8].sum(1, keepdim=True) > 0).float()
    ds = torch.utils.data.TensorDataset(torch.arange(len(x)), x, y)
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    scaler = torch.amp.GradScaler("cpu")
    loader = ResumableDataLoader(ds, batch_size=32, seed=seed)
    mgr = CheckpointManager(directory, every_steps=save_every, keep_last=3, async_save=async_save)
    state = {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "loader": loader}
    step = mgr.restore(state)
    per_epoch = -(-len(ds) // 32)  # batches per epoch (the last one may be short)
    progress = open(os.path.join(directory, PROGRESS), "a", buffering=1)
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
            progress.write(json.dumps({"step": step, "batch": batch_hash, "loss": round(loss.item(), 6),
                                       "pid": os.getpid()}) + "\n")
            mgr.maybe_save(step, state, metrics={"loss": loss.item()})
            if step >= steps:
                break
        else:
            continue
        break
    mgr.save(steps, state, block=True)  # the final state both runs are compared on
    mgr.close()
    progress.close()


# ----------------------------------------------------------------------------------------- comparison
def tree_diff(x: Any, y: Any, path: str = "") -> List[str]:
    """Paths where two decoded state trees differ; tensors compare by bytes, NaN equals NaN (empty: identical)."""
    import numpy as np
    import torch

    diffs: List[str] = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
                    and x.shape == y.shape
                    and torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))):
                diffs.append(path)
        elif isinstance(x, dict) and isinstance(y, dict):
            if set(x) != set(y):
                diffs.append(f"{path} (keys)")
            for k in set(x) & set(y):
                walk(x[k], y[k], f"{path}/{k}")
        elif isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            if len(x) != len(y):
                diffs.append(f"{path} (length)")
            for i, (u, v) in enumerate(zip(x, y)):
                walk(u, v, f"{path}/{i}")
        elif isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            if not np.array_equal(x, y):
                diffs.append(path)
        elif x != y and not (x != x and y != y):  # NaN == NaN for this purpose
            diffs.append(path)

    walk(x, y, path)
    return diffs


def compare_final(a: str, b: str, step: int) -> List[str]:
    """Keys whose values differ between the two runs' final checkpoints (empty: bitwise identical)."""
    from .checkpoint import read_checkpoint
    from .format import step_dirname
    from .storage import open_storage

    _, ta = read_checkpoint(open_storage(a, create=False), step_dirname(step))
    _, tb = read_checkpoint(open_storage(b, create=False), step_dirname(step))
    return sorted(tree_diff(ta, tb))


def batch_sequence(directory: str) -> Dict[int, str]:
    """step -> batch hash, the last record winning (a redone step after a kill overwrites the lost one)."""
    return {rec["step"]: rec["batch"] for rec in iter_events(os.path.join(directory, PROGRESS))}


# ---------------------------------------------------------------------------------------- crash loop
@dataclass
class CrashStats:
    kills: int = 0
    kills_mid_save: int = 0
    restarts: int = 0
    skipped_invalid: int = 0
    steps_redone: int = 0
    exit_code: Optional[int] = None
    attempts: List[Dict[str, Any]] = field(default_factory=list)
    summary: Dict[str, Any] = field(default_factory=dict)


def _job_cmd(directory: str, steps: int, save_every: int, seed: int, async_save: bool) -> List[str]:
    cmd = [sys.executable, "-m", "resumekit.demo", "--worker", "--dir", directory, "--steps", str(steps),
           "--save-every", str(save_every), "--seed", str(seed)]
    return cmd + (["--async"] if async_save else [])


def _count_events(directory: str, kind: str) -> int:
    from .events import EVENTS_FILE, read_events

    return sum(1 for e in read_events(os.path.join(directory, EVENTS_FILE)) if e.get("event") == kind)


def _progress_pids(directory: str) -> List[tuple]:
    """(pid, first step, last step) of each attempt, in start order, from the progress log."""
    order: Dict[int, List[int]] = {}
    for rec in iter_events(os.path.join(directory, PROGRESS)):  # JSONL reader that skips lines torn by a kill
        order.setdefault(rec["pid"], []).append(rec["step"])
    return [(pid, min(v), max(v)) for pid, v in order.items()]


def run_with_kills(directory: str, steps: int, save_every: int, seed: int, crashes: int, rng: random.Random,
                   async_save: bool = False, timeout: float = 600.0) -> CrashStats:
    """Run the job under ``resumekit run`` and SIGKILL it ``crashes`` times (the first, and about a third of the
    others, while a checkpoint is being written); the supervisor restarts it each time."""
    import signal

    from .events import EVENTS_FILE, read_events

    stats = CrashStats()
    env = dict(os.environ, RESUMEKIT_TEST_SAVE_PAUSE="0.02", PYTHONUNBUFFERED="1")
    sup_cmd = [sys.executable, "-m", "resumekit", "run", "--dir", directory, "--max-restarts", str(crashes + 3),
               "--backoff", "0.05", "--backoff-max", "0.2", "--crash-loop", str(crashes + 2), "--json", "--"]
    sup = subprocess.Popen(sup_cmd + _job_cmd(directory, steps, save_every, seed, async_save), env=env,
                           stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    killed_pids = set()
    try:
        while stats.kills < crashes and sup.poll() is None and time.monotonic() < deadline:
            attempts = _progress_pids(directory)
            if not attempts or attempts[-1][0] in killed_pids:
                time.sleep(0.005)
                continue
            pid = attempts[-1][0]
            aim_at_save = stats.kills == 0 or rng.random() < 0.4
            t_seen, delay = time.monotonic(), rng.uniform(0.05, 1.2)
            while sup.poll() is None:
                saving = any(n.startswith(".tmp-step_") for n in os.listdir(directory))
                if (aim_at_save and saving) or (not aim_at_save and time.monotonic() - t_seen >= delay):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        break  # it finished on its own first
                    killed_pids.add(pid)
                    stats.kills += 1
                    time.sleep(0.01)
                    stats.kills_mid_save += int(any(n.startswith(".tmp-step_") for n in os.listdir(directory)))
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
    restores = {e.get("pid"): e.get("step", 0) for e in read_events(os.path.join(directory, EVENTS_FILE))
                if e.get("event") == "restore"}
    for i, (pid, first, last) in enumerate(_progress_pids(directory)):
        stats.attempts.append({"attempt": i, "pid": pid, "resumed_from": restores.get(pid, first - 1),
                               "reached": last, "killed": pid in killed_pids})
    stats.restarts = int(stats.summary.get("restarts", len(stats.attempts) - 1))
    stats.skipped_invalid = _count_events(directory, "skip_invalid")
    for prev, nxt in zip(stats.attempts, stats.attempts[1:]):
        stats.steps_redone += max(0, prev["reached"] - nxt["resumed_from"])
    return stats


def run_demo(directory: str, crashes: int = 6, steps: int = 300, seed: Optional[int] = None, nproc: int = 1,
             as_json: bool = False, save_every: int = 20, async_save: bool = False) -> int:
    """Straight run vs killed-and-restarted run; returns 0 only if they end bitwise identical."""
    if nproc != 1:
        # The same demonstration with N processes under torchrun (DDP, sharded checkpoints, worker SIGKILLs).
        from .demo_distributed import run_distributed_demo

        return run_distributed_demo(directory, nproc=nproc, crashes=crashes, steps=steps, seed=seed,
                                    as_json=as_json, save_every=save_every, async_save=async_save)
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    straight, crashy = os.path.join(directory, "straight"), os.path.join(directory, "crashy")
    for d in (straight, crashy):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    t0 = time.monotonic()
    subprocess.run(_job_cmd(straight, steps, save_every, 0, async_save), check=True)
    t_straight = time.monotonic() - t0
    t0 = time.monotonic()
    stats = run_with_kills(crashy, steps, save_every, 0, crashes, rng, async_save=async_save)
    t_crashy = time.monotonic() - t0
    diffs = compare_final(straight, crashy, steps)
    sa, sb = batch_sequence(straight), batch_sequence(crashy)
    batches_equal = sa == sb and len(sa) == steps
    ok = not diffs and batches_equal and stats.exit_code == 0
    result = {
        "identical": ok, "kills": stats.kills, "kills_mid_save": stats.kills_mid_save, "restarts": stats.restarts,
        "skipped_invalid": stats.skipped_invalid, "steps_redone": stats.steps_redone,
        "supervisor_exit": stats.exit_code, "supervisor_summary": stats.summary, "differing_keys": diffs, "batch_sequence_equal": batches_equal, "steps": steps, "kill_seed": seed,
        "seconds_straight": round(t_straight, 2), "seconds_with_kills": round(t_crashy, 2),
        "directory": os.path.abspath(directory),
    }
    if as_json:
        print(json.dumps(result))
    else:
        rows = [("kills (SIGKILL)", stats.kills), ("  of which during a save", stats.kills_mid_save),
                ("restarts", stats.restarts), ("checkpoints skipped as invalid", stats.skipped_invalid),
                ("steps redone", stats.steps_redone), ("steps", steps),
                ("supervisor exit code", stats.exit_code),
                ("time straight / with kills", f"{t_straight:.1f}s / {t_crashy:.1f}s")]
        print_table("train straight, then again under `resumekit run` with random SIGKILLs", rows, diffs,
                    ("same batch at every step", batches_equal), ok)
    return 0 if ok else 1


def print_table(title: str, rows: List[tuple], diffs: List[str], batches: tuple, ok: bool) -> None:
    """The demo's human summary: counters, then the two verdicts, then PASS/FAIL."""
    print(f"\nresumekit demo: {title}")
    for k, v in rows:
        print(f"  {k:<32} {v}")
    print(f"  {'final state bitwise identical':<32} {'yes' if not diffs else 'NO: ' + ', '.join(diffs[:5])}")
    print(f"  {batches[0]:<32} {'yes' if batches[1] else 'NO'}")
    print("PASS" if ok else "FAIL")


def _worker_main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m resumekit.demo")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async", dest="async_save", action="store_true")
    a = p.parse_args(argv)
    train(a.dir, a.steps, a.save_every, a.seed, a.async_save)


if __name__ == "__main__":
    _worker_main()
