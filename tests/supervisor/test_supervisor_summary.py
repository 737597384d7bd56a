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
    attempts = [_att(i + 1, r, l, a, a + dur, rc=rc, backoff_s=b) for i, (r, l, a, dur, rc, b) in enumerate(rows)]
    s = summarize(attempts, exit_code=0, outcome="x", wall_s=wall, save_blocking_s=saves)
    assert 0.0 <= s.effective_ratio <= 1.0
    assert s.lost_steps >= 0 and s.restarts == max(0, len(attempts) - 1)
    assert s.failures == sum(a.returncode != 0 for a in attempts)
    json.dumps(s.as_dict())
