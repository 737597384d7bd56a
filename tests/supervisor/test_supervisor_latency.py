"""``resumekit.supervisor.latency``: the restart-latency breakdown, from the pure arithmetic to a real run whose job
is SIGKILLed (issue 14)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from supervisor_jobs import JOBS, PY, events_of, finish, procs, summary_of  # noqa: F401

from resumekit.supervisor import AttemptRecord, summarize
from resumekit.supervisor.latency import (
    COMPONENTS,
    JobTimings,
    extrapolate_effective,
    format_breakdown,
    hang_detect_s,
    job_timings,
    median_breakdown,
    restart_breakdown,
    run_step_s,
)

LATENCY_JOB = str(JOBS / "latencyjob.py")


def _job(name, t, **kw):
    return {"event": name, "time": t, "source": "library", **kw}


def test_job_timings_read_the_jobs_own_events():
    events = [
        {"event": "start", "time": 100.0, "source": "supervisor"},
        _job("job_init", 101.5),
        _job("restore", 102.0, step=40, seconds=0.25),
        _job("first_step", 102.1, step=41),
        _job("metrics", 103.1, step=51),
        _job("save", 103.2, step=50, blocking_s=0.05),
        _job("save", 104.0, step=60, blocking_s=0.07),
        _job("metrics", 104.1, step=61),
    ]
    t = job_timings(events)
    assert t.last_report_time == 104.1
    assert (t.init_time, t.restore_start, t.restore_end, t.restore_s) == (101.5, 101.75, 102.0, 0.25)
    assert t.first_step_time == 102.1
    assert t.step_s == pytest.approx(2.0 / 20) and t.steps_timed == 20
    assert t.save_stalls_s == pytest.approx(0.12)
    # A job that logged nothing: every job-side figure unknown, not 0.
    assert job_timings([{"event": "start", "time": 1.0, "source": "supervisor"}]) == JobTimings()


def test_a_known_restart_tiles_kill_to_next_step():
    t = job_timings([_job("restore", 14.0, step=30, seconds=0.5), _job("first_step", 14.25, step=31)])
    b = restart_breakdown(
        attempt=2,
        after="outside-signal",
        prev_end=10.0,
        prev_detect_s=None,
        prev_detect_max_s=0.1,
        prev_save_stalls_s=0.3,
        prev_last_report=9.5,
        start=11.5,
        backoff_s=1.0,
        precheck_s=0.25,
        timings=t,
        lost_steps=4,
        step_s=0.05,
    )
    assert b.supervisor_s == pytest.approx(0.25) and b.spawn_s == pytest.approx(2.0) and b.first_step_s == 0.25
    assert b.redone_s == pytest.approx(0.2) and b.save_stalls_s == 0.3
    # The job last reported a step 0.5 s before its observed exit: it may have trained that long unseen.
    assert b.redone_max_s == pytest.approx(0.7)
    assert b.detect_s is None and b.detect_max_s == 0.1  # an exit: only its bound is known
    parts = b.supervisor_s + b.backoff_s + b.precheck_s + b.spawn_s + b.restore_s + b.first_step_s
    assert b.kill_to_next_step_s == pytest.approx(parts) == pytest.approx(4.25)
    assert b.unknown() == ["detect"]
    line = format_breakdown(median_breakdown([b]))
    assert "detect <= 0.10 s" in line and "spawn + imports 2.00 s" in line and "kill to next step 4.25 s" in line
    assert "redone work 0.20 s (<= 0.70)" in line


def test_hang_detection_counts_the_silence_before_the_kill():
    hang = {"event": "hang", "time": 58.0, "source": "supervisor", "detected_time": 57.0, "heartbeat_age_s": 6.0}
    assert hang_detect_s([hang], end=58.5) == pytest.approx(7.5)
    no_age = dict(hang, heartbeat_age_s=None)
    assert hang_detect_s([no_age], end=58.5) is None
    assert hang_detect_s([dict(no_age, output_idle_s=2.0)], end=58.5) == pytest.approx(3.5)


_dur = st.floats(0, 100, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(_dur, _dur, _dur, _dur, _dur, _dur, _dur, st.booleans(), st.booleans())
def test_the_segments_always_tile_kill_to_next_step(gap, backoff, pre, spawn, restore, first, t0, timed, stepped):
    # A restart's timeline built from arbitrary durations: the measured segments add up to the headline figure,
    # and whatever the job did not report is None, never a number.
    start = t0 + gap + backoff + pre
    r_end = start + spawn + restore
    events = []
    if timed:
        events.append(_job("restore", r_end, step=0, seconds=restore))
    if stepped:
        events.append(_job("first_step", r_end + first, step=1))
    b = restart_breakdown(
        attempt=2,
        after="crash",
        prev_end=t0,
        prev_detect_s=None,
        prev_detect_max_s=None,
        prev_save_stalls_s=None,
        start=start,
        backoff_s=backoff,
        precheck_s=pre,
        timings=job_timings(events),
        lost_steps=None,
        step_s=None,
    )
    assert b.supervisor_s == pytest.approx(gap, abs=1e-6)
    assert (b.spawn_s is None) == (not timed) and (b.restore_s is None) == (not timed)
    assert (b.first_step_s is None) == (not (timed and stepped)) and (b.kill_to_next_step_s is None) == (not stepped)
    if timed and stepped:
        parts = sum(getattr(b, n) for n in ("supervisor_s", "backoff_s", "precheck_s", "spawn_s", "restore_s"))
        assert b.kill_to_next_step_s == pytest.approx(parts + b.first_step_s, abs=1e-6)
    assert all(v is None or v >= 0 for v in b.as_dict().values() if isinstance(v, float))
    assert b.redone_s is None and "redone work" in b.unknown()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0.0, 10.0), st.integers(1, 10**4)), max_size=6))
def test_run_step_time_is_a_weighted_mean_of_measured_steps(rows):
    timings = [JobTimings(step_s=s, steps_timed=n) for s, n in rows]
    got = run_step_s(timings)
    if not rows:
        assert got is None
    else:
        assert min(s for s, _ in rows) - 1e-9 <= got <= max(s for s, _ in rows) + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    st.floats(1, 1e5),
    st.floats(0, 100),
    st.floats(0, 10),
    st.floats(0.01, 1e4),
    st.floats(0, 1),
)
def test_extrapolated_effective_time_is_a_ratio_that_falls_with_more_failures(interval, restart, cost, every, frac):
    e = extrapolate_effective(
        interval_s=interval, restart_s=restart, save_cost_s=cost, save_interval_s=every, redone_fraction=frac
    )
    assert 0.0 <= e <= 1.0
    more = extrapolate_effective(
        interval_s=interval / 2, restart_s=restart, save_cost_s=cost, save_interval_s=every, redone_fraction=frac
    )
    assert more <= e + 1e-12


def _att(i, last, start, end, timings=None, rc=-9, **kw):
    return AttemptRecord(
        index=i,
        resume_step=kw.pop("resume", None),
        last_step=last,
        start=start,
        end=end,
        returncode=rc,
        failure=rc != 0,
        timings=timings or JobTimings(),
        **kw,
    )


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, 10**5)),
            st.floats(0, 1e3),
            st.floats(0, 1e3),
            st.floats(0, 10),
            st.booleans(),
        ),
        max_size=8,
    )
)
def test_summary_carries_one_breakdown_per_restart(rows):
    attempts, t = [], 0.0
    for i, (last, gap, dur, backoff, reports) in enumerate(rows):
        start = t + gap
        timings = (
            job_timings([_job("restore", start + 1, step=0, seconds=0.5), _job("first_step", start + 1.5, step=1)])
            if reports
            else JobTimings()
        )
        attempts.append(_att(i + 1, last, start, start + dur + 2, timings, backoff_s=backoff, detect_max_s=0.1))
        t = start + dur + 2
    s = summarize(attempts, exit_code=0, outcome="x", wall_s=t + 1)
    d = json.loads(json.dumps(s.as_dict()))
    assert len(d["breakdown"]) == max(0, len(attempts) - 1)
    for b, cur in zip(d["breakdown"], attempts[1:], strict=True):
        assert (b["restore_s"] is None) == (cur.timings.restore_s is None)
        assert all(b[name] is None or b[name] >= 0 for name, _ in COMPONENTS)
    if d["breakdown"]:
        med = d["breakdown_median"]
        for name, _ in COMPONENTS:
            known = [b[name] for b in d["breakdown"] if b[name] is not None]
            assert med[f"{name}_n"] == len(known)
            assert med[name] is None or min(known) - 1e-3 <= med[name] <= max(known) + 1e-3
        assert "restart latency, median of" in s.format_text()
    else:
        assert d["kill_to_next_step_s"] is None and "restart latency" not in s.format_text()


def _kill_job_when(directory, attempt, pred, timeout=60.0):
    """SIGKILL attempt ``attempt`` once ``pred(its own job events)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        starts = events_of(directory, "start")
        if len(starts) >= attempt:
            pid = starts[attempt - 1]["pid"]
            mine = [e for e in events_of(directory) if e.get("pid") == pid and e.get("source") != "supervisor"]
            if pred(mine):
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.05)
    raise AssertionError(f"attempt {attempt} never got there: {events_of(directory)}")


def _saved_twice(evs):
    return sum(e["event"] == "save" for e in evs) >= 2


def test_a_killed_manager_job_gets_every_figure_but_detect(tmp_path, procs):
    d = tmp_path / "run"
    p = procs.run(d, "--json", "--backoff", "0.2", command=[PY, LATENCY_JOB, str(d)])
    _kill_job_when(d, 1, _saved_twice)
    _kill_job_when(d, 2, _saved_twice)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(events_of(d, "first_step")) < 3:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)  # the third attempt is preempted: the run ends with its summary
    _code, out, err = finish(p)
    s = summary_of(out)
    assert s["restarts"] == 2 and len(s["breakdown"]) == 2, err
    for b in s["breakdown"]:
        assert b["after"] == "outside-signal"
        assert b["detect_s"] is None and b["detect_max_s"] == pytest.approx(0.1)  # the default poll interval
        for name in ("supervisor_s", "backoff_s", "precheck_s", "spawn_s", "restore_s", "first_step_s"):
            assert b[name] is not None and b[name] >= 0, (name, b)
        assert b["lost_steps"] is not None and b["redone_s"] is not None and b["save_stalls_s"] > 0
        assert b["redone_s"] <= b["redone_max_s"] < 5
        parts = sum(b[n] for n in ("supervisor_s", "backoff_s", "precheck_s", "spawn_s", "restore_s", "first_step_s"))
        assert b["kill_to_next_step_s"] == pytest.approx(parts, abs=0.01)
    assert s["kill_to_next_step_s"] is not None and s["breakdown_median"]["restarts"] == 2
    assert "restart latency, median of 2 restarts" in err
    exits = events_of(d, "exit")
    assert len(exits) == 3 and all(e["restore_s"] is not None and e["first_step_s"] is not None for e in exits)


def test_a_foreign_job_that_reports_nothing_has_every_job_side_figure_unknown(tmp_path, procs):
    d = tmp_path / "run"
    d.mkdir()
    marker = d / "started"
    script = f"import pathlib, time; pathlib.Path({str(marker)!r}).write_text('x'); time.sleep(60)"
    p = procs.run(d, "--json", "--backoff", "0.1", "--max-restarts", "1", command=[PY, "-c", script])
    deadline = time.monotonic() + 30
    while not (marker.exists() and events_of(d, "start")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(events_of(d, "start")[-1]["pid"], signal.SIGKILL)
    while len(events_of(d, "start")) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGTERM)
    _code, out, err = finish(p)
    (b,) = summary_of(out)["breakdown"]
    for name in ("spawn_s", "restore_s", "first_step_s", "redone_s", "save_stalls_s", "kill_to_next_step_s"):
        assert b[name] is None, (name, b)  # null in JSON: never a guess
    assert b["backoff_s"] is not None and b["supervisor_s"] is not None and b["precheck_s"] is not None
    assert "spawn + imports unknown" in err and "kill to next step unknown" in err


def test_report_draws_the_breakdown_and_names_what_is_unknown(tmp_path):
    pytest.importorskip("matplotlib")
    from resumekit.events import EventLog
    from resumekit.report import load_run, plot_report

    ev = str(tmp_path / "events.jsonl")
    attempts = [
        _att(1, 30, 0.0, 10.0, job_timings([_job("restore", 1.0, step=0, seconds=0.1)]), detect_max_s=0.1),
        _att(2, 50, 11.0, 20.0, job_timings([_job("restore", 13.0, step=20, seconds=0.2)]), resume=20),
        _att(3, 60, 21.0, 30.0, JobTimings(), rc=0, resume=40),
    ]
    s = summarize(attempts, exit_code=0, outcome="success", wall_s=30.0)
    EventLog(ev, source="supervisor").emit("summary", **s.as_dict())
    run = load_run(ev)
    lat = run.stats()["restart_latency"]
    assert len(lat["breakdown"]) == 2 and lat["breakdown"][1]["spawn_s"] is None
    out = plot_report(ev, str(tmp_path / "r.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
