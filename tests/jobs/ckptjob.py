"""A torch-free training job that follows resumekit's job contract, for the supervisor tests.

It trains a 1-D linear regression with SGD in pure Python (deterministic data from the step number), so a straight
run and an interrupted-and-resumed run must end with bit-identical floats. It behaves like a job using
``CheckpointManager``:

* resumes from ``RESUMEKIT_RESUME_FROM`` (a real native checkpoint: ``state.json`` + optional payload, manifest
  last, written through ``LocalStorage.begin``) and logs ``restore``;
* touches ``RESUMEKIT_HEARTBEAT`` every step (``events.Heartbeat``), logs ``metrics`` and ``save`` (with
  ``blocking_s``) to ``RESUMEKIT_EVENTS``;
* on SIGTERM saves at the next step boundary and exits 0.

Fault switches (each fires once, remembered by a marker file in the checkpoint dir, so a restart gets past it):
``--crash-at K`` exits 3 after step K; ``--hang-at K`` starts a detached child and sleeps forever after step K.
A file ``poison-step`` holding N in the checkpoint dir makes every start from step N raise right after it reported
loading it (a checkpoint that loads but crashes the job before its first step, deterministically).
``--ignore-term`` ignores SIGTERM (to test the grace kill); ``--startup-time S`` sleeps S seconds after the restore
report, before the first step (a slow start-up, to kill the job in).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

from resumekit.events import ENV_DIR, ENV_RESUME_FROM, EventLog, Heartbeat
from resumekit.format import FileEntry, Manifest, new_hasher, step_dirname
from resumekit.storage.local import LocalStorage

STATE_FILE = "state.json"
PAYLOAD_FILE = "payload.bin"
FINAL_FILE = "final.json"
POISON_FILE = "poison-step"
CHILD_PIDFILE = "child.pid"


def init_state() -> dict[str, Any]:
    return {"step": 0, "w": 0.0, "b": 0.0, "h": 0}


def train_step(state: dict[str, Any]) -> float:
    """One SGD step on a batch derived from the step number only; returns the loss."""
    s = state["step"] + 1
    lr = 0.02
    gw = gb = loss = 0.0
    seed = (s * 2654435761) % 2**32
    for _ in range(8):
        seed = (1103515245 * seed + 12345) % 2**31
        x = seed / 2**31 * 2 - 1
        seed = (1103515245 * seed + 12345) % 2**31
        noise = (seed / 2**31 - 0.5) * 0.2
        y = 3.0 * x + 0.5 + noise
        err = state["w"] * x + state["b"] - y
        loss += err * err / 8
        gw += 2 * err * x / 8
        gb += 2 * err / 8
    state["w"] -= lr * gw
    state["b"] -= lr * gb
    # A running hash of the whole trajectory: any skipped or repeated step changes it.
    state["h"] = (state["h"] * 1000003 + hash((s, state["w"], state["b"])) % 2**61) % 2**61
    state["step"] = s
    return loss


def straight_run(steps: int) -> dict[str, Any]:
    """The final state of an uninterrupted run (what every interrupted run must end with)."""
    state = init_state()
    while state["step"] < steps:
        train_step(state)
    return state


def save_checkpoint(root: str, state: dict[str, Any], payload: int = 0, pause: float = 0.0) -> str:
    """Write a real native checkpoint: data files durable first, manifest last (LocalStorage's commit)."""
    storage = LocalStorage(root)
    tx = storage.begin(step_dirname(state["step"]))
    files: dict[str, FileEntry] = {}
    try:
        blobs = [(STATE_FILE, json.dumps(state).encode())]
        if payload:
            blobs.append((PAYLOAD_FILE, (str(state["h"]).encode() * (payload // 8 + 1))[:payload]))
        for i, (rel, data) in enumerate(blobs):
            h = new_hasher()
            h.update(data)
            with tx.open_write(rel) as f:
                f.write(data)
            files[rel] = FileEntry(len(data), h.hexdigest())
            if pause and i == 0:
                time.sleep(pause)  # widens the window in which a kill lands mid-save
        return tx.commit(Manifest(step=state["step"], files=files).to_json())
    except BaseException:
        tx.abort()
        raise


def load_checkpoint(path: str) -> dict[str, Any]:
    with open(os.path.join(path, STATE_FILE)) as f:
        return json.load(f)


def _once(root: str, name: str) -> bool:
    """True the first time only (a marker file remembers it across restarts)."""
    marker = os.path.join(root, f".once-{name}")
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _poison(root: str) -> int | None:
    try:
        with open(os.path.join(root, POISON_FILE)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def main(argv: list | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=os.environ.get(ENV_DIR))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--step-time", type=float, default=0.01)
    p.add_argument("--save-pause", type=float, default=0.0)
    p.add_argument("--payload", type=int, default=0)
    p.add_argument("--crash-at", type=int, default=None)
    p.add_argument("--hang-at", type=int, default=None)
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--startup-time", type=float, default=0.0)
    p.add_argument("--metrics", action="store_true", help="log a metrics event every step")
    args = p.parse_args(argv)
    root = args.dir
    assert root, "no checkpoint directory: pass --dir or run under resumekit run --dir"
    faulthandler.register(signal.SIGUSR1)  # the supervisor's stack dump of a hung job
    log = EventLog.for_dir(root)
    beat = Heartbeat.from_env(interval=0.0)
    preempt = {"flag": False}
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: preempt.update(flag=True))

    resume = os.environ.get(ENV_RESUME_FROM, "")
    if resume:
        state = load_checkpoint(resume)
        log.emit("restore", step=state["step"], path=resume)
        if state["step"] == _poison(root):
            raise RuntimeError(f"poisoned checkpoint {resume} (step {state['step']}) crashes after loading")
    else:
        state = init_state()
        log.emit("restore", step=0, path=None)
    beat.beat(state["step"], force=True)
    time.sleep(args.startup_time)
    last_saved = state["step"] if resume else None

    def save() -> None:
        nonlocal last_saved
        t = time.perf_counter()
        path = save_checkpoint(root, state, payload=args.payload, pause=args.save_pause)
        last_saved = state["step"]
        log.emit("save", step=state["step"], path=path, blocking_s=round(time.perf_counter() - t, 6))

    while state["step"] < args.steps:
        t = time.perf_counter()
        time.sleep(args.step_time)
        loss = train_step(state)
        step = state["step"]
        beat.beat(step, force=True)
        if args.metrics:
            log.emit("metrics", step=step, loss=loss, step_time=round(time.perf_counter() - t, 6))
        if preempt["flag"]:
            save()
            log.emit("preempted", step=step)
            return 0
        if step % args.save_every == 0:
            save()
        if args.crash_at == step and _once(root, "crash"):
            print(f"ckptjob: crashing on purpose after step {step}", file=sys.stderr)
            return 3
        if args.hang_at == step and _once(root, "hang"):
            child = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
            )  # leaves our process group, like a daemon
            with open(os.path.join(root, CHILD_PIDFILE), "w") as f:
                f.write(str(child.pid))
            while True:
                time.sleep(3600)
    if last_saved != state["step"]:
        save()
    tmp = os.path.join(root, f".{FINAL_FILE}.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, os.path.join(root, FINAL_FILE))
    return 0


if __name__ == "__main__":
    sys.exit(main())
