"""``resumekit.supervisor.summary``: the attempt records and the end-of-run account (pure arithmetic)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resumekit.supervisor import AttemptRecord, lost_steps_of, summarize


def _att(i, resume, last, start, end, rc=-9, **kw):
    return AttemptRecord(
        index=i, resume_step=resume, last_step=last, start=start, end=end, returncode=rc, failure=rc != 0, **kw
    )


def test_summary_arithmetic_on_a_known_run():
    attempts = [
        _att(1, None, 30, 0.0, 10.0, startup_s=1.0),
        _att(2, 20, 55, 11.0, 20.0, backoff_s=0.5, precheck_s=0.25, startup_s=0.75),
        _att(3, 50, 100, 21.0, 32.0, rc=0, backoff_s=0.5, precheck_s=0.25, startup_s=1.0),
    ]
    assert lost_steps_of(attempts) == [10, 5]
    s = summarize(attempts, exit_code=0, outcome="success", wall_s=40.0, save_blocking_s=2.0)
    assert (s.starts, s.restarts, s.failures, s.killed_by_signal, s.lost_steps) == (3, 2, 2, 2, 15)
    assert s.backoff_s == 1.0 and s.startup_s == 1.75 and s.precheck_s == 0.5 and s.restart_s == 3.25
    # 30 + 35 + 50 steps trained in 9 + 8.25 + 10 s of training time: each redone step cost 27.25/115 s
    assert s.redone_s == pytest.approx(15 * 27.25 / 115)
    assert s.effective_ratio == pytest.approx(1 - (3.25 + 15 * 27.25 / 115 + 2.0) / 40.0)
    assert "lost steps 15" in s.format_text()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.integers(0, 10**6)),
            st.one_of(st.none(), st.integers(0, 10**6)),
            st.floats(0, 1e4),
            st.floats(0, 1e4),
            st.integers(-15, 3),
            st.floats(0, 100),
        ),
        min_size=0,
        max_size=12,
    ),
    st.floats(0, 1e6),
    st.floats(0, 1e3),
)
def test_summary_is_always_sane(rows, wall, saves):
    attempts = [_att(i + 1, r, last, a, a + dur, rc=rc, backoff_s=b) for i, (r, last, a, dur, rc, b) in enumerate(rows)]
    s = summarize(attempts, exit_code=0, outcome="x", wall_s=wall, save_blocking_s=saves)
    # Issue 11: a figure that cannot be known is None ("unknown"), not 0 or a guess.
    assert s.effective_ratio is None or 0.0 <= s.effective_ratio <= 1.0
    assert (s.lost_steps is None) == (len(attempts) > 1 and all(a.last_step is None for a in attempts))
    assert (s.lost_steps is None or s.lost_steps >= 0) and s.restarts == max(0, len(attempts) - 1)
    assert s.failures == sum(a.returncode != 0 for a in attempts)
    json.dumps(s.as_dict())


def test_what_cannot_be_known_is_unknown_not_zero():
    # A framework without an integration: killed twice, never reported a step.
    quiet = [_att(1, None, None, 0.0, 10.0), _att(2, None, None, 11.0, 20.0), _att(3, None, None, 21.0, 30.0, rc=0)]
    s = summarize(quiet, exit_code=0, outcome="success", wall_s=30.0, save_blocking_s=None)
    assert s.lost_steps is None and s.redone_s is None and s.startup_s is None and s.effective_ratio is None
    assert lost_steps_of(quiet) is None
    text = s.format_text()
    assert "lost steps unknown" in text and "effective training time unknown" in text and "saves unknown" in text
    assert json.loads(json.dumps(s.as_dict()))["lost_steps"] is None
    # A job that reports steps but never got past its first one trained nothing: 0%, not 78%.
    stuck = [_att(1, 10, 10, 0.0, 10.0), _att(2, 10, 10, 11.0, 20.0, backoff_s=1.0)]
    s = summarize(stuck, exit_code=1, outcome="gave-up", wall_s=20.0, save_blocking_s=0.0)
    assert s.lost_steps == 0 and s.effective_ratio == 0.0


def test_report_says_why_the_loss_plot_is_empty(tmp_path):
    from resumekit.events import EventLog
    from resumekit.report import load_run

    ev = str(tmp_path / "events.jsonl")
    EventLog(ev, source="supervisor").emit("start", attempt=1, restart_count=0, pid=1)
    assert "did not report its steps or loss" in load_run(ev).empty_reason()
    EventLog(ev).emit("save", step=4, blocking_s=0.1)
    assert "logged saves but not its loss" in load_run(ev).empty_reason()
    EventLog(ev).emit("step", step=5)
    assert "reported steps but no loss" in load_run(ev).empty_reason()
    EventLog(ev).emit("step", step=6, loss=0.5)
    assert load_run(ev).empty_reason() is None
    EventLog(ev, source="supervisor").emit("summary", starts=1, lost_steps=None, effective_ratio=None)
    from resumekit.report import _title

    assert "unknown steps redone, effective training time unknown" in _title(load_run(ev))
