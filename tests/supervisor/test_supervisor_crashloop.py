"""``resumekit.supervisor.crashloop``: a checkpoint the job keeps crashing on is quarantined, never deleted."""

from __future__ import annotations

from pathlib import Path

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

from resumekit.supervisor import quarantine


@pytest.mark.timeout(60)
def test_a_checkpoint_that_crashes_every_load_is_quarantined_and_the_run_completes(tmp_path, procs):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / ckptjob.POISON_FILE).write_text("10")
    p = procs.run(
        d,
        "--crash-loop",
        "3",
        "--max-restarts",
        "6",
        "--backoff",
        "0.02",
        "--json",
        job=["--steps", "20", "--save-every", "5", "--step-time", "0.005", "--crash-at", "12"],
    )
    rc, out, err = finish(p)
    assert rc == 0, err
    (q,) = events_of(d, "quarantine")
    assert q["step"] == 10 and q["failures"] == 3 and q["next_step"] == 5
    moved = Path(q["to"])
    assert moved.name.startswith("quarantined-step_000000010-")
    assert (moved / "manifest.json").is_file() and (moved / "state.json").is_file()  # never deleted
    starts = events_of(d, "start")
    assert [s["resume_step"] for s in starts] == [None, 10, 10, 10, 5]
    s = summary_of(out)
    assert s["quarantined"] == 1 and s["failures"] == 4 and s["starts"] == 5
    assert "quarantined it as" in err
    assert final_state(d) == ckptjob.straight_run(20)


@pytest.mark.timeout(60)
def test_a_crash_loop_with_nothing_to_quarantine_gives_up_with_the_jobs_exit_code(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = procs.run(
        d,
        "--crash-loop",
        "2",
        "--max-restarts",
        "9",
        "--backoff",
        "0.01",
        "--json",
        command=[PY, "-c", "import sys; sys.exit(5)"],
    )
    rc, out, err = finish(p)
    assert rc == 5
    s = summary_of(out)
    assert s["outcome"] == "gave-up" and s["starts"] == 2
    assert "crash loop: the job failed 2 times in a row starting from scratch" in err


def test_quarantine_renames_never_deletes_and_native_discovery_ignores_it(tmp_path):
    from resumekit.layouts import NativeLayout
    from resumekit.storage import open_storage

    ckptjob.save_checkpoint(str(tmp_path), {"step": 5, "w": 0.0, "b": 0.0, "h": 0})
    ckptjob.save_checkpoint(str(tmp_path), {"step": 10, "w": 0.0, "b": 0.0, "h": 0})
    storage = open_storage(str(tmp_path))
    lay = NativeLayout()
    best, _ = lay.latest(storage)
    new = quarantine(storage, best, now=0)
    again = quarantine(storage, lay.latest(storage)[0], now=0)
    assert new.startswith("quarantined-step_000000010-") and again.startswith("quarantined-step_000000005-")
    assert (tmp_path / new / "manifest.json").is_file() and (tmp_path / again / "state.json").is_file()
    assert lay.latest(storage) == (None, [])
