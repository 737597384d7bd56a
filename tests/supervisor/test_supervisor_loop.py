"""``resumekit.supervisor.loop``: the restart loop end to end (random SIGKILLs, the restart budget); no torch."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from supervisor_jobs import (
    PY,
    ckptjob,
    events_of,
    final_state,
    finish,
    procs,  # noqa: F401 - a fixture, used as an argument
    read_beat,
    summary_of,
)


@pytest.mark.timeout(240)
def test_random_sigkills_including_mid_save_end_equal_to_a_straight_run(tmp_path, procs):
    d = tmp_path / "ckpt"
    # The acceptance: 20+ kills. The 20 kills take ~70 steps (each attempt is killed within ~25 steps of its
    # resume point); the rest of the job runs straight, so 400 steps leave room without training hundreds more.
    steps, n_kills = 400, 20
    p = procs.run(
        d,
        "--backoff",
        "0.05",
        "--backoff-max",
        "0.05",
        "--max-restarts",
        "40",
        "--json",
        job=[
            "--steps",
            str(steps),
            "--save-every",
            "10",
            "--step-time",
            "0.01",
            "--save-pause",
            "0.03",
            "--payload",
            "65536",
        ],
    )
    rng = random.Random(1234)
    killed: list[int] = []
    mid_save = 0
    deadline = time.monotonic() + 200
    while len(killed) < n_kills and p.poll() is None and time.monotonic() < deadline:
        beat = read_beat(d)
        pid = beat.get("pid")
        if not pid or pid in killed:
            time.sleep(0.005)
            continue
        first = beat.get("step")
        while read_beat(d).get("step") == first and p.poll() is None:  # trained past its resume point
            time.sleep(0.005)
        if len(killed) % 3 == 0:
            # Aim at a save: wait for a new in-progress directory and kill while it is being written.
            known = {n for n in os.listdir(d) if n.startswith(".tmp-")}
            t_end = time.monotonic() + 2
            while time.monotonic() < t_end and not ({n for n in os.listdir(d) if n.startswith(".tmp-")} - known):
                time.sleep(0.002)
            in_save = bool({n for n in os.listdir(d) if n.startswith(".tmp-")} - known)
        else:
            time.sleep(rng.uniform(0.0, 0.25))
            in_save = any(n.startswith(".tmp-") and not n.startswith(".tmp-deleting") for n in os.listdir(d))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
        mid_save += in_save
    rc, out, err = finish(p, timeout=90)
    assert rc == 0, err
    assert len(killed) == n_kills, err
    assert mid_save >= 1, "no kill landed during a save"
    assert final_state(d) == ckptjob.straight_run(steps)
    s = summary_of(out)
    assert s["killed_by_signal"] == n_kills and s["failures"] == n_kills and s["restarts"] == n_kills
    assert s["outcome"] == "success" and s["quarantined"] == 0
    assert 0 <= s["effective_ratio"] <= 1 and s["lost_steps"] >= 0
    exits = [e for e in events_of(d, "exit") if e["failure"]]
    assert sorted(e["pid"] for e in exits) == sorted(killed)
    assert all(e["signal"] == "SIGKILL" and e["exit_code"] == 137 for e in exits)
    assert "killed by a signal" in err and "lost steps" in err
    # Each restart resumed from a checkpoint that verifies (half-written ones were never handed over).
    starts = events_of(d, "start")
    assert len(starts) == n_kills + 1
    assert all(s["resume_from"] is None or Path(s["resume_from"]).name.startswith("step_") for s in starts)
    # Warm restart is on (the default), but this torch-free job starts in a fraction of a second: measured on its
    # first start, so no standby is kept (tests/test_resume_augmented.py and test_supervisor_warm.py run warm).
    assert not any(s["warm"] for s in starts)
    (skipped,) = events_of(d, "warm_standby")
    assert skipped["status"] == "skipped" and "would gain it nothing" in skipped["reason"]
    # Every killed attempt had trained: each restart was immediate (a jitter within the first backoff, 0.05 s).
    restarts = events_of(d, "restart")
    assert len(restarts) == n_kills and all(r["after_progress"] and r["delay_s"] <= 0.05 for r in restarts)


@pytest.mark.timeout(60)
def test_restart_budget_is_respected(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = procs.run(
        d,
        "--crash-loop",
        "100",
        "--max-restarts",
        "2",
        "--backoff",
        "0.01",
        "--json",
        command=[PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"],
    )
    rc, out, err = finish(p)
    assert rc == 128 + signal.SIGSEGV
    s = summary_of(out)
    assert s["starts"] == 3 and s["restarts"] == 2 and s["outcome"] == "gave-up"
    assert "restart budget used up (--max-restarts 2); last exit 139 (killed by SIGSEGV)" in err
    # No progress: the backoff applies and grows (0.01 s, then 0.02 s, less up to half as jitter).
    delays = [(r["after_progress"], r["delay_s"]) for r in events_of(d, "restart")]
    assert len(delays) == 2 and not delays[0][0] and not delays[1][0]
    assert 0.005 <= delays[0][1] <= 0.01 and 0.01 <= delays[1][1] <= 0.02, delays


def test_supervisor_imports_no_torch(tmp_path):
    code = "import resumekit.supervisor, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # Nor does a whole supervised run (layouts, storage, events are loaded on the way).
    code = (
        "import sys; from resumekit.supervisor import Supervisor, SupervisorOptions; "
        f"code = Supervisor(SupervisorOptions(command=[sys.executable, '-c', 'pass'], directory={str(tmp_path)!r}, "
        "quiet=True)).run(); assert code == 0; assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
