"""``resumekit report``: parsing the event log and plotting it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from resumekit.events import EventLog, read_events
from resumekit.report import load_run, log_metrics, plot_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path: str) -> None:
    """A supervised run as the supervisor and a job would log it: start, 30 steps, a kill, restart at 20, a hang."""
    sup, job = EventLog(path, source="supervisor"), EventLog(path)
    sup.emit("supervisor_start", command=["x"])
    sup.emit("start", attempt=1, restart_count=0, pid=1, resume_step=None)
    for s in range(1, 31):
        log_metrics(s, loss=2.0 / s, step_time=0.1, log=job)
        if s % 10 == 0:
            job.emit("save", step=s, blocking_s=0.01)
    sup.emit("exit", attempt=1, failure=True, hung=False, signal="SIGKILL", exit_code=137, last_step=30)
    sup.emit("start", attempt=2, restart_count=1, pid=2, resume_step=30)
    job.emit("restore", step=30)
    for s in range(31, 41):
        job.emit("metrics", step=s, loss=2.0 / s)  # no step_time: derived from the event times
    sup.emit("hang", step=40, heartbeat_age_s=5.0)
    sup.emit("exit", attempt=2, failure=True, hung=True, signal="SIGKILL", exit_code=137, last_step=40)
    sup.emit("start", attempt=3, restart_count=2, pid=3, resume_step=30)
    sup.emit("summary", starts=3, failures=2, hangs=1, lost_steps=10, effective_ratio=0.8)


def test_load_run_groups_metrics_by_start_and_collects_markers(tmp_path):
    ev = str(tmp_path / "events.jsonl")
    _write_run(ev)
    with open(ev, "a") as f:
        f.write('{"event": "metrics", "step": 99, "loss"')  # a torn last line from a killed writer
    run = load_run(ev)
    assert [len(s.steps) for s in run.segments] == [30, 10, 0]
    assert [s.resume_step for s in run.segments] == [None, 30, 30]
    assert run.segments[0].loss[1] == 1.0 and run.segments[0].step_time[0] == 0.1
    assert all(v >= 0 for v in run.segments[1].step_time[1:])
    assert {(m.kind, m.step) for m in run.markers} == {("failure", 30), ("restart", 30), ("hang", 40)}
    assert len(run.down) == 2 and len(run.hung) == 1 and len(run.saves) == 3
    assert run.stats() == {
        "segments": 3,
        "metrics": 40,
        "restarts": 2,
        "hangs": 1,
        "failures": 1,
        "preemptions": 0,
        "quarantines": 0,
        "saves": 3,
        "restart_latency": None,  # this summary carries no breakdown
    }


def test_plot_report_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    ev = str(tmp_path / "events.jsonl")
    _write_run(ev)
    out = tmp_path / "sub" / "r.png"
    assert plot_report(ev, str(out)) == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 20_000
    assert [p.name for p in out.parent.iterdir()] == ["r.png"]  # no temp file left behind


def test_plot_report_without_metrics_still_plots(tmp_path):
    pytest.importorskip("matplotlib")
    ev = str(tmp_path / "events.jsonl")
    EventLog(ev, source="supervisor").emit("start", attempt=1, restart_count=0, pid=1)
    plot_report(ev, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:8] == PNG_MAGIC


def test_missing_matplotlib_is_a_clear_error(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed, even if imported before
    ev = str(tmp_path / "events.jsonl")
    _write_run(ev)
    with pytest.raises(ImportError, match=r"resumekit report needs matplotlib .*pip install 'resumekit\[report\]'"):
        plot_report(ev, str(tmp_path / "r.png"))


def test_log_metrics_follows_the_supervisors_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RESUMEKIT_EVENTS", str(tmp_path / "ev.jsonl"))
    rec = log_metrics(7, loss=0.5, step_time=0.25, lr=1e-3)
    assert {k: rec[k] for k in ("event", "step", "loss", "step_time", "lr")} == {
        "event": "metrics",
        "step": 7,
        "loss": 0.5,
        "step_time": 0.25,
        "lr": 1e-3,
    }
    assert json.loads((tmp_path / "ev.jsonl").read_text())["step"] == 7


@pytest.mark.timeout(60)
def test_report_cli(tmp_path):
    pytest.importorskip("matplotlib")
    _write_run(str(tmp_path / "events.jsonl"))
    r = subprocess.run(
        [sys.executable, "-m", "resumekit", "report", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["output"] == os.path.join(str(tmp_path), "report.png") and doc["hangs"] == 1
    assert (tmp_path / "report.png").is_file()
    r = subprocess.run(
        [sys.executable, "-m", "resumekit", "report", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert f"resumekit: no event log at {tmp_path / 'nothing' / 'events.jsonl'}; pass --events PATH" in r.stderr


def test_a_restarts_start_up_runs_from_its_launch_to_its_first_step(tmp_path):
    # Issue 14: the wall-time panel shades what a restart costs after the launch (spawn, imports, restore).
    ev = str(tmp_path / "events.jsonl")
    sup, job = EventLog(ev, source="supervisor"), EventLog(ev)
    sup.emit("start", attempt=1, restart_count=0, pid=1, resume_step=None)
    job.emit("first_step", step=1)
    log_metrics(1, loss=1.0, log=job)
    sup.emit("exit", attempt=1, failure=True, hung=False, signal="SIGKILL", exit_code=137, last_step=1)
    sup.emit("start", attempt=2, restart_count=1, pid=2, resume_step=0)
    job.emit("restore", step=0, seconds=0.01)
    job.emit("first_step", step=1)
    log_metrics(1, loss=1.0, log=job)
    run = load_run(ev)
    (span,) = run.starting
    starts = [e for e in read_events(ev) if e["event"] == "start"]
    firsts = [e for e in read_events(ev) if e["event"] == "first_step"]
    assert span == (starts[1]["time"], firsts[1]["time"])
