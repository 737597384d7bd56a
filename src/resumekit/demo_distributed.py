"""The multi-process crash-and-resume demonstration behind ``resumekit demo --nproc N``.

A DDP job (gloo on CPU) runs under ``torchrun --nproc-per-node N``: once straight, once under
``resumekit run -- torchrun --max-restarts K ...`` while this module SIGKILLs one random worker at random moments,
some of them while a sharded checkpoint is being written. torchrun's elastic agent tears the group down and starts it
again; every rank resumes from the newest checkpoint valid on all ranks. The two runs' final checkpoints are then
compared bit for bit (every tensor unsharded, every rank's scheduler/scaler/sampler/RNG state) together with the
batches every rank saw at every step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .events import iter_events

PROGRESS_GLOB = "progress_rank"  # progress_rank{R}.jsonl: {"step", "rank", "pid", "batch", ...} per step
SAVING_PREFIX = ".tmp-step_"


# ------------------------------------------------------------------------------------------------ the job
def train(directory: str, steps: int, save_every: int, seed: int = 0, async_save: bool = False,
          width: int = 128) -> None:
    """One rank of the DDP job: plain PyTorch plus the resumekit lines. Deterministic given seed and world."""
    import hashlib

    import numpy as np
    import torch
    import torch.distributed as dist

    from .data import ResumableDataLoader
    from .manager import CheckpointManager

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)  # identical initial weights everywhere
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    model = torch.nn.parallel.DistributedDataParallel(model)
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
    mgr = CheckpointManager(directory, every_steps=save_every, keep_last=3, async_save=async_save)
    state = {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "loader": loader}
    step = mgr.restore(state)
    per_epoch = loader.resumable_sampler.epoch_length // (16 * world)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    progress = open(os.path.join(directory, f"{PROGRESS_GLOB}{rank}.jsonl"), "a", buffering=1)
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
            progress.write(json.dumps({"step": step, "rank": rank, "batch": batch, "loss": round(loss.item(), 6),
                                       "pid": os.getpid(), "restart": restart}) + "\n")
            mgr.maybe_save(step, state, metrics={"loss": loss.item()})
            if step >= steps:
                break
    mgr.save(steps, state, block=True)  # the final state both runs are compared on
    mgr.close()
    progress.close()
    # every rank done with every group before any tears its gloo pairs down (teardown races abort)
    dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------- comparison
def compare_final(a: str, b: str, step: int) -> List[str]:
    """What differs between two runs' final sharded checkpoints (empty: bitwise identical)."""
    from .distributed import read_sharded
    from .format import step_dirname

    _, ta, ra = read_sharded(os.path.join(a, step_dirname(step)))
    _, tb, rb = read_sharded(os.path.join(b, step_dirname(step)))
    from .demo import tree_diff

    return sorted(tree_diff(ta, tb, "shards") + tree_diff(ra, rb, "ranks"))


def read_progress(directory: str) -> Dict[int, List[Dict[str, Any]]]:
    """rank -> progress records in file order (a torn last line from a kill is skipped)."""
    out: Dict[int, List[Dict[str, Any]]] = {}
    for name in sorted(os.listdir(directory)):
        if not (name.startswith(PROGRESS_GLOB) and name.endswith(".jsonl")):
            continue
        for rec in iter_events(os.path.join(directory, name)):  # skips a line torn by a kill
            out.setdefault(int(rec["rank"]), []).append(rec)
    return out


def batch_sequences(directory: str, key: str = "batch") -> Dict[int, Dict[int, Any]]:
    """rank -> {step -> batch}, the last record winning (a step redone after a kill replaces the lost one)."""
    return {r: {rec["step"]: rec[key] for rec in recs} for r, recs in read_progress(directory).items()}


# ---------------------------------------------------------------------------------------- crash loop
def free_port() -> int:
    """A TCP port free right now on this host (for torchrun's rendezvous endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd(nproc: int, job: Sequence[str], *, max_restarts: int = 0, port: Optional[int] = None) -> List[str]:
    """``torchrun`` on this host with a c10d rendezvous on a free port, restarting the group up to N times."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port or free_port()}", f"--max-restarts={max_restarts}",
            "--monitor-interval=0.1", "--rdzv-conf=join_timeout=60", *job]


def torchrun_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for torchrun jobs that restart: one CPU thread per worker, unbuffered output, and
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: with the agent's store shared (the default since torch 2.5) a
    restarted group can read the previous attempt's gloo/NCCL addresses and fail to connect (pytorch#135712)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _job_args(directory: str, steps: int, save_every: int, seed: int, async_save: bool) -> List[str]:
    args = ["-m", "resumekit.demo_distributed", "--worker", "--dir", directory, "--steps", str(steps),
            "--save-every", str(save_every), "--seed", str(seed)]
    return args + (["--async"] if async_save else [])


class _ProgressTail:
    """Follows every rank's progress file incrementally (the kill loop polls every few milliseconds)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.offsets: Dict[str, int] = {}
        self.latest: Dict[int, Tuple[int, int]] = {}  # pid -> (rank, last step)

    def poll(self) -> None:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return
        for name in names:
            if not (name.startswith(PROGRESS_GLOB) and name.endswith(".jsonl")):
                continue
            path = os.path.join(self.directory, name)
            with open(path, "rb") as f:
                f.seek(self.offsets.get(name, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1  # leave a partly written line for the next poll
            self.offsets[name] = self.offsets.get(name, 0) + end
            for line in data[:end].splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                self.latest[int(rec["pid"])] = (int(rec["rank"]), int(rec["step"]))


def run_torchrun_with_kills(command: Sequence[str], directory: str, *, nproc: int, crashes: int,
                            rng: random.Random, env: Optional[Dict[str, str]] = None, timeout: float = 300.0,
                            log_path: Optional[str] = None, last_step: Optional[int] = None) -> "Any":
    """Run ``command`` (torchrun, or ``resumekit run -- torchrun ...``) and SIGKILL one random worker ``crashes``
    times: the first kill, and about 40% of the others, while a checkpoint is being written, the rest after a
    random number of steps. Workers are found through their progress files (``progress_rank{R}.jsonl`` lines with
    ``pid``, ``rank`` and ``step``). Kills aimed at a step never aim past ``last_step - 2`` (the job's length), so
    every kill lands before the job ends. Returns a :class:`resumekit.demo.CrashStats`; every process it started
    is gone when it returns.
    """
    from .demo import CrashStats

    stats = CrashStats()
    tail = _ProgressTail(directory)
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
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
                saving = any(n.startswith(SAVING_PREFIX) for n in os.listdir(directory))
                steps_now = max(s for p, (_, s) in tail.latest.items() if p not in dead)
                if (aim_at_save and saving) or (not aim_at_save and steps_now >= target):
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
            mid_save = any(n.startswith(SAVING_PREFIX) for n in os.listdir(directory))
            stats.kills += 1
            stats.kills_mid_save += int(mid_save)
            stats.attempts.append({"killed_rank": victim_rank, "pid": pid, "at_step": live[victim_rank][1],
                                   "mid_save": mid_save})
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        _kill_tree(proc)
        if log_path:
            log.close()  # type: ignore[union-attr]
    stats.exit_code = proc.returncode
    stats.restarts = stats.kills
    return stats


def _descendants(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and every descendant (torchrun starts its workers in sessions of their own)."""
    if proc.poll() is None or _descendants(proc.pid):
        for pid in [proc.pid] + _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def run_distributed_demo(directory: str, *, nproc: int, crashes: int = 4, steps: int = 120,
                         seed: Optional[int] = None, as_json: bool = False, save_every: int = 10,
                         async_save: bool = False) -> int:
    """Straight ``torchrun`` run vs one SIGKILLed and restarted by torchrun under ``resumekit run``; returns 0
    only if both end bitwise identical."""
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    straight, crashy = os.path.join(directory, "straight"), os.path.join(directory, "crashy")
    for d in (straight, crashy):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    env = torchrun_env()
    for k in ("RESUMEKIT_RESUME_FROM", "RESUMEKIT_HEARTBEAT", "RESUMEKIT_EVENTS", "RESUMEKIT_DIR"):
        env.pop(k, None)
    t0 = time.monotonic()
    with open(os.path.join(straight, "torchrun.log"), "wb") as log:
        r = subprocess.run(torchrun_cmd(nproc, _job_args(straight, steps, save_every, 0, async_save)), env=env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t_straight = time.monotonic() - t0
    if r.returncode != 0:
        print(f"resumekit demo: the straight run failed (exit {r.returncode}); see {straight}/torchrun.log",
              file=sys.stderr)
        return 1
    t0 = time.monotonic()
    job = torchrun_cmd(nproc, _job_args(crashy, steps, save_every, 0, async_save), max_restarts=crashes + 1)
    sup = [sys.executable, "-m", "resumekit", "run", "--dir", crashy, "--max-restarts", "2", "--backoff", "0.05",
           "--backoff-max", "0.2", "--"]
    stats = run_torchrun_with_kills(sup + job, crashy, nproc=nproc, crashes=crashes, rng=rng,
                                    env=dict(env, RESUMEKIT_TEST_SAVE_PAUSE="0.05"),
                                    log_path=os.path.join(crashy, "torchrun.log"), last_step=steps)
    t_crashy = time.monotonic() - t0
    from .demo import _count_events

    stats.skipped_invalid = _count_events(crashy, "skip_invalid")
    try:
        diffs = compare_final(straight, crashy, steps)
    except Exception as e:  # noqa: BLE001 - a missing or invalid final checkpoint is the demo failing
        diffs = [f"final checkpoint unreadable: {e}"]
    sa, sb = batch_sequences(straight), batch_sequences(crashy)
    batches_equal = sa == sb and len(sa) == nproc and all(len(v) == steps for v in sa.values())
    ok = not diffs and batches_equal and stats.exit_code == 0
    result = {
        "identical": ok, "nproc": nproc, "kills": stats.kills, "kills_mid_save": stats.kills_mid_save,
        "restarts": stats.restarts, "skipped_invalid": stats.skipped_invalid, "exit_code": stats.exit_code,
        "differing_keys": diffs, "batch_sequence_equal": batches_equal, "steps": steps, "kill_seed": seed,
        "kills_detail": stats.attempts, "seconds_straight": round(t_straight, 2),
        "seconds_with_kills": round(t_crashy, 2), "directory": os.path.abspath(directory),
    }
    if as_json:
        print(json.dumps(result))
    else:
        rows = [("processes (torchrun)", nproc), ("kills (SIGKILL of one worker)", stats.kills),
                ("  of which during a save", stats.kills_mid_save), ("group restarts", stats.restarts),
                ("checkpoints skipped as invalid", stats.skipped_invalid), ("steps", steps),
                ("exit code", stats.exit_code),
                ("time straight / with kills", f"{t_straight:.1f}s / {t_crashy:.1f}s")]
        from .demo import print_table

        print_table(f"{nproc}-process DDP under torchrun, straight, then again under `resumekit run -- torchrun` "
                    "with random worker SIGKILLs", rows, diffs, ("same batch at every step/rank", batches_equal), ok)
    return 0 if ok else 1


def _worker_main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="torchrun -m resumekit.demo_distributed")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--async", dest="async_save", action="store_true")
    a = p.parse_args(argv)
    train(a.dir, a.steps, a.save_every, a.seed, a.async_save)


if __name__ == "__main__":
    _worker_main()
