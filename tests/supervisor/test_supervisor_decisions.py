"""``resumekit.supervisor.decisions``: the restart backoff, exit codes, failures and the crash-loop rule (pure)."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resumekit.supervisor import exit_code_of, is_crash_loop, is_failure, made_progress, next_streak, restart_backoff
from resumekit.supervisor.decisions import describe_exit, grace_expired, hang_target, is_hung


@given(
    restart=st.integers(1, 200),
    base=st.floats(0, 100),
    cap=st.floats(0, 1000),
    jitter=st.floats(0, 1),
    rand=st.floats(0, 1, exclude_max=True),
)
def test_backoff_is_bounded_by_the_cap_and_the_jitter(restart, base, cap, jitter, rand):
    d = min(cap, base * 2 ** min(restart - 1, 63))
    delay = restart_backoff(restart, base, cap, jitter, rand)
    assert (1 - jitter) * d - 1e-9 <= delay <= d + 1e-9
    assert 0 <= delay <= cap + 1e-9


def test_backoff_doubles_without_jitter():
    assert [restart_backoff(r, 1.0, 10.0, 0.0, 0.7) for r in range(0, 7)] == [0, 1, 2, 4, 8, 10, 10]
    assert restart_backoff(3, 1.0, 60.0, 0.5, 0.999999) == pytest.approx(2.0, rel=1e-5)


def test_exit_codes_and_failures():
    assert exit_code_of(0) == 0 and exit_code_of(3) == 3 and exit_code_of(-9) == 137 and exit_code_of(-15) == 143
    assert not is_failure(0) and not is_failure(0, signal.SIGTERM)
    assert is_failure(1) and is_failure(-9) and is_failure(-15)
    assert not is_failure(-15, signal.SIGTERM) and not is_failure(143, signal.SIGTERM)  # died of the forwarded one
    assert is_failure(-9, signal.SIGTERM) and is_failure(1, signal.SIGTERM)  # grace kill, or a crash while saving


def test_crash_loop_rule():
    # newest valid before/after, step resumed from, last step reported
    assert made_progress(10, 15, 10, None)  # a new checkpoint appeared
    assert made_progress(10, 10, 10, 11)  # trained past the step it resumed from
    assert made_progress(None, 5, None, None)
    assert not made_progress(10, 10, 10, 10) and not made_progress(10, 10, 10, None)
    assert not made_progress(None, None, None, None)
    streak = 0
    for failed, progressed in [(True, True), (True, False), (True, False), (True, False)]:
        streak = next_streak(streak, failed, progressed)
    assert streak == 3 and is_crash_loop(streak, 3) and not is_crash_loop(2, 3)
    assert next_streak(2, failed=False, progressed=False) == 0


def test_describe_exit():
    assert describe_exit(0) == "0" and describe_exit(3) == "3"
    assert describe_exit(-signal.SIGKILL) == "137 (killed by SIGKILL)"


def test_hang_verdict_needs_a_heartbeat_older_than_the_timeout():
    assert is_hung(10.5, 10) and not is_hung(10.0, 10) and not is_hung(3, 10)
    assert not is_hung(None, 10), "a job that never beat is never hung"
    assert not is_hung(1e9, None) and not is_hung(1e9, 0), "hang detection off"


def test_hang_target_is_the_beating_process_only_when_it_belongs_to_the_job():
    assert hang_target(12, [10, 11, 12]) == 12
    assert hang_target(99, [10, 11, 12]) == 10
    assert hang_target(None, [10]) == 10


def test_grace_expired():
    assert not grace_expired(None, 1000.0, 30)
    assert not grace_expired(100.0, 130.0, 30) and grace_expired(100.0, 130.5, 30)
