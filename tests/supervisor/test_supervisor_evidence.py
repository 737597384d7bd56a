"""The crash-loop rule acts on evidence (issue 11): what the job reported loading, not outside kills or guesses."""

from __future__ import annotations

import os
import signal
import time

import pytest
from supervisor_jobs import (
    PY,
    ckptjob,
    events_of,
    final_state,
    finish,
    procs,  # noqa: F401 - a fixture, used as an argument
    summary_of,
)


def _job_restores(d, seen):
    """The job's restore events not seen yet (by pid)."""
    return [e for e in events_of(d, "restore") if e.get("source") != "supervisor" and e["pid"] not in seen]


@pytest.mark.timeout(90)
def test_outside_sigkills_during_start_up_never_quarantine_the_valid_newest_checkpoint(tmp_path, procs):
    d = tmp_path / "ckpt"
    d.mkdir()
    ckptjob.save_checkpoint(str(d), ckptjob.straight_run(10))  # the newest checkpoint, valid
    p = procs.run(
        d,
        "--crash-loop",
        "2",
        "--max-restarts",
        "6",
        "--backoff",
        "0.02",
        "--json",
        job=["--steps", "20", "--save-every", "5", "--step-time", "0.005", "--startup-time", "1.5"],
    )
    seen: set = set()
    deadline = time.monotonic() + 60
    while len(seen) < 3 and time.monotonic() < deadline and p.poll() is None:
        new = _job_restores(d, seen)
        if not new:
            time.sleep(0.01)
            continue
        ev = new[0]
        assert ev["step"] == 10  # it reported loading the valid newest checkpoint; no progress yet (start-up)
        os.kill(ev["pid"], signal.SIGKILL)  # the OOM killer, a preemption: from outside, no traceback
        seen.add(ev["pid"])
    rc, out, err = finish(p)
    assert rc == 0, err
    assert len(seen) == 3
    assert not events_of(d, "quarantine") and not (d / "quarantine").exists()
    assert (d / "step_000000010" / "manifest.json").is_file()
    exits = events_of(d, "exit")
    assert [e["cause"] for e in exits] == ["outside-signal"] * 3 + ["ok"]
    assert all(e["loaded"] == str(d / "step_000000010") for e in exits)
    s = summary_of(out)
    assert s["outside_kills"] == 3 and s["quarantined"] == 0 and s["outcome"] == "success"
    assert s["lost_steps"] == 0  # each killed start reported step 10 and the next resumed from it
    assert "killed from outside (no traceback): not held against the checkpoint" in err
    assert final_state(d) == ckptjob.straight_run(20)


@pytest.mark.timeout(60)
def test_a_job_that_does_not_say_what_it_loaded_gets_unknown_and_no_quarantine(tmp_path, procs):
    d = tmp_path / "ckpt"
    d.mkdir()
    ckptjob.save_checkpoint(str(d), ckptjob.straight_run(10))
    crash = "import sys; print('Traceback (most recent call last):', file=sys.stderr); sys.exit(3)"
    p = procs.run(
        d, "--crash-loop", "2", "--max-restarts", "5", "--backoff", "0.01", "--json", command=[PY, "-c", crash]
    )
    rc, out, err = finish(p)
    assert rc == 3
    assert "did not report which checkpoint it loaded (no 'restore' event: unknown), so nothing was quarantined" in err
    assert not events_of(d, "quarantine") and (d / "step_000000010" / "manifest.json").is_file()
    (loop,) = events_of(d, "crash_loop")
    assert loop["evidence"] == ["<unknown>", "<unknown>"]
    s = summary_of(out)
    assert s["starts"] == 2 and s["quarantined"] == 0
    assert s["lost_steps"] is None and s["effective_ratio"] is None and s["save_blocking_s"] is None
    assert "lost steps unknown" in err and "effective training time unknown" in err
