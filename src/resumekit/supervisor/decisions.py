"""The supervisor's decisions as pure functions (no I/O, no clock reads), unit-tested without processes.

Where to find a rule:

* how long to wait before a restart: :func:`restart_backoff`;
* what exit code ``resumekit run`` reports for a job's exit: :func:`exit_code_of`;
* whether an exit was a failure: :func:`is_failure`;
* whether a failed attempt got anywhere: :func:`made_progress`;
* the crash-loop rule (quarantine after ``crash_loop`` failures in a row without progress): :func:`next_streak`
  and :func:`is_crash_loop`;
* whether a job is hung, and which of its processes to dump: :func:`is_hung` and :func:`hang_target`;
* when a preempted job's grace period is over: :func:`grace_expired`.
"""

from __future__ import annotations

from typing import Optional, Sequence

from .proctree import signal_name

#: exit code of ``resumekit run`` when a pre-check fails (or the supervisor gives up before any job ran)
EXIT_PRECHECK = 1
#: shell conventions for a command that cannot be started
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


def restart_backoff(restart: int, base: float, cap: float, jitter: float, rand: float) -> float:
    """Seconds to wait before restart number ``restart`` (1 for the first restart).

    The delay doubles with every restart (``base``, ``2*base``, ``4*base``, ...) up to ``cap``, then a random
    fraction up to ``jitter`` of it is taken off, so many jobs that failed together (a node, a switch) do not all
    hammer the scheduler or the storage in the same second.

    Args:
        restart: 1-based restart number.
        base: delay of the first restart, seconds.
        cap: the largest delay, seconds.
        jitter: fraction in [0, 1] of the delay that may be removed at random.
        rand: a uniform random number in [0, 1).

    Returns:
        A delay in ``[(1 - jitter) * d, d]`` where ``d = min(cap, base * 2 ** (restart - 1))``.
    """
    if restart < 1:
        return 0.0
    exp = min(restart - 1, 63)  # 2**63 * base overflows nothing but is far past any cap
    d = min(cap, base * float(2**exp))
    return d * (1.0 - jitter * min(max(rand, 0.0), 1.0))


def exit_code_of(returncode: int) -> int:
    """The shell's exit code for a ``Popen.returncode``: ``128 + N`` for death by signal ``N``.

    Args:
        returncode: ``Popen.returncode`` (negative: killed by that signal).

    Returns:
        The exit code a shell would report.
    """
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """``"1"``, or ``"137 (killed by SIGKILL)"`` for a death by signal: an exit as people read it.

    Args:
        returncode: ``Popen.returncode``.

    Returns:
        One short phrase.
    """
    return f"{exit_code_of(returncode)} (killed by {signal_name(-returncode)})" if returncode < 0 else str(returncode)


def is_failure(returncode: int, preempt_signal: Optional[int] = None) -> bool:
    """Whether a job exit counts as a failure.

    Exit 0 never does. After a forwarded preemption signal, a job that died of that very signal (a script without
    a handler) ended as asked, so it is not a failure either; anything else non-zero is (a preempted job that did
    not save within the grace period and was SIGKILLed did fail).

    Args:
        returncode: ``Popen.returncode``.
        preempt_signal: the signal forwarded to the job, if any.

    Returns:
        True for a failure.
    """
    if returncode == 0:
        return False
    if preempt_signal is not None and returncode in (-preempt_signal, 128 + preempt_signal):
        return False
    return True


def made_progress(
    before_step: Optional[int], after_step: Optional[int], resumed_step: Optional[int], last_step: Optional[int]
) -> bool:
    """Whether a failed attempt got anywhere, which clears the checkpoint it resumed from of suspicion.

    Progress is a valid checkpoint newer than the newest one at the start of the attempt, or a reported step
    (heartbeat or events) beyond the step it resumed from: a checkpoint that loaded and trained is not the cause
    of the crash, so it must not be quarantined.

    Args:
        before_step: newest valid step when the attempt started (None: there was none).
        after_step: newest valid step now.
        resumed_step: the step the attempt resumed from (None: from scratch).
        last_step: the highest step the attempt reported (None: it reported none).

    Returns:
        True when the attempt made progress.
    """
    if after_step is not None and (before_step is None or after_step > before_step):
        return True
    if last_step is not None and last_step > (resumed_step if resumed_step is not None else -1):
        return True
    return False


def next_streak(streak: int, failed: bool, progressed: bool) -> int:
    """Consecutive failures without progress, after one more attempt.

    Args:
        streak: the count before this attempt.
        failed: the attempt failed.
        progressed: the attempt made progress (:func:`made_progress`).

    Returns:
        The new count: 0 after a success or any progress.
    """
    if not failed or progressed:
        return 0
    return streak + 1


def is_crash_loop(streak: int, limit: int) -> bool:
    """The crash-loop rule: ``limit`` failures in a row without progress.

    Args:
        streak: consecutive failures without progress (:func:`next_streak`).
        limit: ``SupervisorOptions.crash_loop``.

    Returns:
        True when the checkpoint resumed from must be quarantined.
    """
    return streak >= limit


def is_hung(heartbeat_age: Optional[float], hang_timeout: Optional[float]) -> bool:
    """The hang verdict: the job has beaten at least once and not for more than ``hang_timeout`` seconds.

    A job that never beat (no heartbeat file) is never judged hung: it may not use the heartbeat at all.

    Args:
        heartbeat_age: seconds since the last heartbeat; None when there is none.
        hang_timeout: ``SupervisorOptions.hang_timeout`` (None or 0: hang detection off).

    Returns:
        True when the job counts as hung.
    """
    return bool(hang_timeout) and heartbeat_age is not None and heartbeat_age > hang_timeout  # type: ignore[operator]


def hang_target(beat_pid: Optional[int], tree: Sequence[int]) -> int:
    """Which process of a hung job to dump: the one that wrote the heartbeat when it belongs to the job's tree
    (under ``torchrun`` that is a rank, not the launcher), else the job's root.

    Args:
        beat_pid: the ``pid`` the heartbeat names, if any.
        tree: the job's root pid followed by its descendants.

    Returns:
        A pid from ``tree``.
    """
    return beat_pid if beat_pid in tree else tree[0]  # type: ignore[return-value]


def grace_expired(preempted_at: Optional[float], now: float, grace: float) -> bool:
    """Whether a preempted job has used up its grace period to save and exit.

    Args:
        preempted_at: monotonic time the preemption signal was forwarded (None: not preempted).
        now: monotonic time now.
        grace: ``SupervisorOptions.grace``.

    Returns:
        True when the job must be killed.
    """
    return preempted_at is not None and now - preempted_at > grace


__all__ = [
    "EXIT_PRECHECK",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "restart_backoff",
    "exit_code_of",
    "describe_exit",
    "is_failure",
    "made_progress",
    "next_streak",
    "is_crash_loop",
    "is_hung",
    "hang_target",
    "grace_expired",
]
