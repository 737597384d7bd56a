"""One process-wide deadline for remote transfers, set when a preemption signal arrives.

A preempted job has a grace period (``resumekit run --grace``, exported to the job as ``RESUMEKIT_GRACE``; a
scheduler's own grace otherwise) before it is killed. A transfer stuck on an unresponsive store would otherwise run
out that period and the job would die by SIGKILL mid-save with no word said. Once the deadline is set, every remote
request is cut at it and no retry starts past it, so a stuck save fails with one line in time for the process to
exit on its own; the store's previous checkpoint stays valid because the manifest of the unfinished one was never
written.

Pure state and arithmetic: no I/O, no signal handling (the manager's signal handler calls :func:`start_grace`).
"""

from __future__ import annotations

import os
import threading
import time

#: The environment variable ``resumekit run`` exports with its ``--grace`` (seconds).
ENV_GRACE = "RESUMEKIT_GRACE"
#: The grace assumed without ``resumekit run``: Kubernetes' default ``terminationGracePeriodSeconds``.
DEFAULT_GRACE = 30.0

_lock = threading.Lock()
_deadline: float | None = None
_reason = ""


def grace_seconds(environ: dict | None = None) -> float:
    """The grace period of this process: ``RESUMEKIT_GRACE`` when set to a positive number, else 30 s."""
    raw = (os.environ if environ is None else environ).get(ENV_GRACE, "")
    try:
        value = float(raw)
    except ValueError:
        return DEFAULT_GRACE
    return value if value > 0 else DEFAULT_GRACE


def transfer_budget(grace: float) -> float:
    """Seconds of a grace period that transfers may use: all but a margin (half of it, at most 5 s) kept for the
    process to report the failure and exit before the supervisor's SIGKILL. Exiting takes time: a process that
    imported torch needed about 2 s to finish on a loaded machine."""
    return max(0.0, grace - min(5.0, 0.5 * grace))


def start_grace(now: float | None = None, grace: float | None = None) -> float:
    """Start the grace period (called from a preemption signal handler; idempotent: the first signal counts).

    Returns:
        The deadline, in ``time.monotonic()`` seconds.
    """
    global _deadline, _reason
    g = grace_seconds() if grace is None else grace
    at = (time.monotonic() if now is None else now) + transfer_budget(g)
    # No lock here: a signal handler runs in the main thread between bytecodes and could find the lock held by
    # the very thread it interrupted. Assigning two globals is atomic enough: readers only compare.
    if _deadline is None or at < _deadline:
        _reason = f"the preemption grace period ({ENV_GRACE}={g:g} s) ends"
        _deadline = at
    return _deadline


def set_deadline(at: float | None, reason: str = "the deadline passed") -> None:
    """Set (or with None clear) the deadline directly; tests and embedders use it."""
    global _deadline, _reason
    with _lock:
        _deadline, _reason = at, reason


def remaining(now: float | None = None) -> float | None:
    """Seconds left before the deadline (negative once past), or None when no deadline is set."""
    d = _deadline
    if d is None:
        return None
    return d - (time.monotonic() if now is None else now)


def reason() -> str:
    """Why the deadline exists, for messages (e.g. "the preemption grace period (RESUMEKIT_GRACE=30 s) ends")."""
    return _reason


__all__ = [
    "ENV_GRACE",
    "DEFAULT_GRACE",
    "grace_seconds",
    "transfer_budget",
    "start_grace",
    "set_deadline",
    "remaining",
    "reason",
]
