"""``resumekit.supervisor.decisions``: the restart backoff, exit codes, failures and the crash-loop rule (pure)."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resumekit.supervisor import exit_code_of, is_crash_loop, is_failure, made_progress, next_streak, restart_backoff
from resumekit.supervisor.decisions import (
    describe_exit,
    grace_expired,
    hang_target,
    is_hung,
    standby_worthwhile,
    wait_for_standby,
)


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
    assert [restart_backoff(r, 1.0, 10.0, 0.0, 0.7) for r in range(7)] == [0, 1, 2, 4, 8, 10, 10]
    assert restart_backoff(3, 1.0, 60.0, 0.5, 0.999999) == pytest.approx(2.0, rel=1e-5)


@given(
    restart=st.integers(-3, 200),
    base=st.floats(0, 100),
    cap=st.floats(0, 1000),
    jitter=st.floats(0, 1),
    rand=st.floats(0, 1, exclude_max=True),
    progress_jitter=st.floats(0, 60),
)
def test_after_progress_the_restart_is_immediate_but_for_a_bounded_jitter(
    restart, base, cap, jitter, rand, progress_jitter
):
    delay = restart_backoff(restart, base, cap, jitter, rand, progressed=True, progress_jitter=progress_jitter)
    # Whatever the count of earlier restarts: no exponential growth, never more than the jitter cap or a first backoff.
    assert 0 <= delay <= min(progress_jitter, base) + 1e-9
    assert delay == pytest.approx(rand * min(progress_jitter, base))
    slow = restart_backoff(restart, base, cap, jitter, rand, progress_jitter=progress_jitter)
    assert slow == restart_backoff(restart, base, cap, jitter, rand)  # without progress: the old rule


def test_progress_restarts_spread_over_the_jitter_window():
    delays = [restart_backoff(9, 1.0, 60.0, 0.5, r / 100, progressed=True, progress_jitter=0.25) for r in range(100)]
    assert max(delays) < 0.25 and min(delays) == 0.0 and len(set(delays)) == 100  # many nodes do not stampede
    assert restart_backoff(9, 1.0, 60.0, 0.0, 0.5) == 60.0  # the same restart without progress backs off fully


@given(
    elapsed=st.floats(0, 1000),
    ready=st.one_of(st.none(), st.floats(0, 1000)),
    cold=st.one_of(st.none(), st.floats(0, 1000)),
)
def test_wait_for_a_standby_only_when_it_is_expected_first(elapsed, ready, cold):
    wait = wait_for_standby(elapsed, ready, cold)
    if ready is None or cold is None:
        assert wait  # nothing measured: a standby is never behind a fresh start of a torch job
    else:
        assert wait == (ready - elapsed < cold)


@given(cold=st.one_of(st.none(), st.floats(0, 100)), low=st.floats(0, 10))
def test_a_standby_only_for_a_job_whose_fresh_start_is_slow(cold, low):
    assert standby_worthwhile(cold, low) == (cold is None or cold >= low)


def test_wait_for_standby_examples():
    assert not wait_for_standby(0.5, 10.0, 0.3)  # a torch-free job: cold beats a standby that imports torch
    assert wait_for_standby(0.5, 4.0, 6.0)  # a torch job: the standby is ahead
    assert wait_for_standby(9.9, 10.0, 0.3)  # almost ready


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


def test_exit_cause_tells_outside_kills_from_crashes():
    from resumekit.supervisor.decisions import child_signal, exit_cause, has_traceback

    tb = 'x\nTraceback (most recent call last):\n  File "t.py", line 1\nRuntimeError: boom\n'
    assert has_traceback(tb) and not has_traceback("Killed\n")
    assert exit_cause(0) == "ok"
    assert exit_cause(-signal.SIGKILL) == "outside-signal"  # OOM killer, preemption: no traceback
    assert exit_cause(137) == "outside-signal" and exit_cause(143) == "outside-signal"  # through a shell
    assert exit_cause(-signal.SIGKILL, traceback=True) == "crash"
    assert exit_cause(1, traceback=True) == "crash" and exit_cause(1) == "crash"
    assert exit_cause(-signal.SIGSEGV) == "crash" and exit_cause(-signal.SIGBUS) == "crash"
    assert exit_cause(-signal.SIGKILL, hung=True) == "hang" and exit_cause(-15, preempted=True) == "preempted"
    torchrun = tb + "Root Cause (first observed failure):\n  exitcode  : -9 (pid: 4242)\n"
    assert child_signal(torchrun) == signal.SIGKILL and child_signal("exitcode  : 1 (pid: 1)") is None
    assert exit_cause(1, traceback=True, worker_signal=child_signal(torchrun)) == "outside-signal"


def test_crash_loop_counts_only_crashes_after_a_reported_load():
    from resumekit.supervisor.decisions import FROM_SCRATCH, UNKNOWN, crash_loop_verdict, evidence_of

    ck = "/ckpt/step_10"
    assert evidence_of("crash", False, True, ck, True) == ck
    assert evidence_of("crash", True, True, ck, True) == ""  # progress ends the streak
    assert evidence_of("ok", False, True, ck, True) == ""
    for cause in ("outside-signal", "hang", "preempted"):
        assert evidence_of(cause, False, True, ck, True) is None  # no evidence either way
    assert evidence_of("crash", False, True, None, True) == FROM_SCRATCH
    assert evidence_of("crash", False, False, None, True) == UNKNOWN  # the job said nothing
    assert evidence_of("crash", False, False, None, False) == FROM_SCRATCH  # there was nothing to load
    assert crash_loop_verdict([ck, ck], 3) == ("continue", None)
    assert crash_loop_verdict([ck, ck, ck], 3) == ("quarantine", ck)
    assert crash_loop_verdict([UNKNOWN, ck, ck], 2) == ("quarantine", ck)
    assert crash_loop_verdict([ck, UNKNOWN, ck], 3) == ("give-up", UNKNOWN)
    assert crash_loop_verdict([FROM_SCRATCH] * 2, 2) == ("give-up", FROM_SCRATCH)


def test_hang_reason_heartbeat_output_and_file_activity():
    from resumekit.supervisor.decisions import hang_reason

    now = 1000.0
    assert hang_reason(None, now, 99.0, 0.0, 0.0) is None  # off
    assert "no heartbeat for 11.0 s" in hang_reason(10, now, 11.0, now, 0.0)  # output does not count with a beat
    assert hang_reason(10, now, 11.0, 0.0, now - 5) is None  # a save still writing is not a hang
    assert hang_reason(10, now, 9.0, 0.0, 0.0) is None
    assert "no output for 11.0 s" in hang_reason(10, now, None, now - 11, now - 12)
    assert hang_reason(10, now, None, now - 9, now - 12) is None
