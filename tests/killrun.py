"""A kill loop for any job under ``resumekit run``: SIGKILL the running attempt (with its DataLoader workers, as a
node failure would) at chosen moments, some of them while a checkpoint is being written, and report what happened.

The job appends progress records ``{"step", "pid", ...}`` to ``<progress_dir>/progress.jsonl``. Each kill aims
either at the attempt's first save (mid-save) or at a step a few steps past where the attempt resumed; a step-based
aim keeps the number of steps an attempt trains small, so all the kills happen before the job ends.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from resumekit.demo.core import SAVING_PREFIX, ProgressTail
from resumekit.events import EVENTS_FILE, iter_events, read_events
from resumekit.supervisor.proctree import kill_tree

PROGRESS = "progress.jsonl"


def _step_of(tmp_name: str) -> int:
    """The step of a tmp checkpoint directory ``.tmp-step_000000012-<id>``."""
    return int(tmp_name[len(SAVING_PREFIX) :].split("-", 1)[0])


def _saving(directory: str) -> set:
    """The checkpoints being written in ``directory`` now (their tmp directories; a kill mid-save leaves one
    behind until a later attempt cleans it up, so an attempt compares with what was there when it started)."""
    try:
        return {n for n in os.listdir(directory) if n.startswith(SAVING_PREFIX)}
    except FileNotFoundError:
        return set()


def run_killed(
    job: Sequence[str],
    ckpt_dir: str,
    *,
    kills: int,
    rng: random.Random,
    progress_dir: str | None = None,
    cwd: str | None = None,
    aim_at_save: float = 0.4,
    max_ahead: int = 9,
    kill_steps: Sequence[int] | None = None,
    between_saves: bool = False,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """Run ``job`` under ``resumekit run --dir ckpt_dir`` and kill it ``kills`` times.

    Args:
        job: the job's command line.
        ckpt_dir: the checkpoint directory (``--dir``).
        kills: how many SIGKILLs.
        rng: picks each kill's kind and moment (the first kill always aims at a save).
        progress_dir: where ``progress.jsonl`` is written (default ``ckpt_dir``).
        cwd: the supervisor's working directory.
        aim_at_save: the probability that a later kill aims at a save.
        max_ahead: a step-aimed kill lands 1..max_ahead steps after the attempt's resume point.
        kill_steps: instead, kill ``i`` lands at step ``kill_steps[i]`` (never aimed at a save).
        between_saves: a step-aimed kill waits until no save of the attempt is being written (then the attempt
            after it resumes from a known step).
        timeout: seconds the whole run may take.

    Returns:
        ``kills``, ``kills_mid_save``, ``exit_code``, ``summary`` (the supervisor's JSON line), ``attempts``
        (per attempt in start order: ``pid``, ``resumed_from``, ``reached``, ``killed``, ``last_record``) and
        ``batches``
        (step -> progress record, the last attempt's record winning).
    """
    progress_dir = progress_dir or ckpt_dir
    env = dict(os.environ, RESUMEKIT_TEST_SAVE_PAUSE="0.03", PYTHONUNBUFFERED="1")
    sup_cmd = [sys.executable, "-m", "resumekit", "run", "--dir", ckpt_dir, "--max-restarts", str(kills + 3)]
    sup_cmd += ["--backoff", "0.05", "--backoff-max", "0.2", "--crash-loop", str(kills + 2), "--json", "--", *job]
    sup = subprocess.Popen(sup_cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, text=True)
    tail = ProgressTail(progress_dir, PROGRESS)
    deadline = time.monotonic() + timeout
    done, mid_save, killed = 0, 0, set()
    try:
        while done < kills and sup.poll() is None and time.monotonic() < deadline:
            tail.poll()
            pids = list(tail.latest)
            if not pids or pids[-1] in killed:
                time.sleep(0.003)
                continue
            pid = pids[-1]
            start = tail.latest[pid][1]  # the first step seen: the attempt resumed from about start - 1
            stale = _saving(ckpt_dir)
            if kill_steps is not None:
                at_save, target = False, kill_steps[done]
            else:
                at_save = done == 0 or rng.random() < aim_at_save
                target = start + rng.randint(0, max_ahead - 1)
            while sup.poll() is None and time.monotonic() < deadline:
                tail.poll()
                writing = _saving(ckpt_dir) - stale
                if at_save:
                    # a save of this attempt at or after the target step: attempts that always die in their first
                    # save would never get past the step they started from
                    hit = any(_step_of(n) >= target for n in writing)
                else:
                    hit = tail.latest[pid][1] >= target and not (between_saves and writing)
                if hit:
                    try:
                        os.kill(pid, 0)
                    except ProcessLookupError:
                        break  # it finished on its own first
                    kill_tree(pid)
                    killed.add(pid)
                    done += 1
                    mid_save += int(bool(_saving(ckpt_dir) - stale))
                    break
                time.sleep(0.002)
        out, _ = sup.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if sup.poll() is None:
            kill_tree(sup.pid)
            sup.wait()
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        summary = {}
    restores = {
        e.get("pid"): e.get("step", 0)
        for e in read_events(os.path.join(ckpt_dir, EVENTS_FILE))
        if e.get("event") == "restore"
    }
    attempts: list[dict[str, Any]] = []
    steps: dict[int, list[int]] = {}
    batches: dict[int, dict[str, Any]] = {}
    last: dict[int, dict[str, Any]] = {}
    for rec in iter_events(os.path.join(progress_dir, PROGRESS)):
        steps.setdefault(rec["pid"], []).append(rec["step"])
        batches[rec["step"]] = last[rec["pid"]] = rec
    for pid, v in steps.items():
        attempts.append(
            {
                "pid": pid,
                "resumed_from": restores.get(pid, min(v) - 1),
                "reached": max(v),
                "killed": pid in killed,
                "last_record": last[pid],
            }
        )
    return {
        "kills": done,
        "kills_mid_save": mid_save,
        "exit_code": sup.returncode,
        "summary": summary,
        "attempts": attempts,
        "batches": batches,
    }


def straight_records(directory: str) -> dict[int, dict[str, Any]]:
    """step -> progress record of a run that was never killed."""
    return {rec["step"]: rec for rec in iter_events(os.path.join(directory, PROGRESS))}


def differing_steps(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], keys: Sequence[str]) -> list[int]:
    """Steps whose records differ in any of ``keys`` (or exist in one run only)."""
    return sorted(s for s in set(a) | set(b) if s not in a or s not in b or any(a[s][k] != b[s][k] for k in keys))
