"""The supervisor's decisions as pure functions (no I/O, no clock reads), unit-tested without processes.

Where to find a rule:

* how long to wait before a restart (immediate after progress, else backing off): :func:`restart_backoff`;
* whether a job gets a warm standby at all: :func:`standby_worthwhile`; whether a restart waits for one still
  importing: :func:`wait_for_standby`;
* what exit code ``resumekit run`` reports for a job's exit: :func:`exit_code_of`;
* whether an exit was a failure: :func:`is_failure`;
* whether a failed attempt got anywhere: :func:`made_progress`;
* why a job died, from its exit and its last stderr: :func:`exit_cause` (with :func:`has_traceback` and
  :func:`child_signal`);
* what a failed attempt says about the checkpoint it loaded: :func:`evidence_of`, and what a streak of such
  failures calls for: :func:`crash_loop_verdict` (the old count-only rule: :func:`next_streak`,
  :func:`is_crash_loop`);
* whether a job is hung, and which of its processes to dump: :func:`hang_reason` (:func:`is_hung` for the
  heartbeat alone) and :func:`hang_target`;
* when a preempted job's grace period is over: :func:`grace_expired`.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Sequence

from .proctree import signal_name

#: signals that come from outside the job: the OOM killer and preemption (SIGKILL), schedulers and people
#: (SIGTERM, SIGINT, SIGHUP). A death by one of them says nothing about the checkpoint the job loaded.
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

#: exit causes (:func:`exit_cause`)
CAUSE_OK = "ok"
CAUSE_PREEMPTED = "preempted"
CAUSE_HANG = "hang"
CAUSE_OUTSIDE = "outside-signal"
CAUSE_CRASH = "crash"

#: crash-loop evidence (:func:`evidence_of`) besides a checkpoint path
FROM_SCRATCH = "<from scratch>"
UNKNOWN = "<unknown>"

_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):", re.M)
# torchrun's error report names each failed worker's exit: "exitcode  : -9 (pid: 1234)".
_CHILD_EXIT = re.compile(r"exitcode\s*:\s*(-?\d+)")

#: exit code of ``resumekit run`` when a pre-check fails (or the supervisor gives up before any job ran)
EXIT_PRECHECK = 1
#: shell conventions for a command that cannot be started
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


def restart_backoff(
    restart: int,
    base: float,
    cap: float,
    jitter: float,
    rand: float,
    *,
    progressed: bool = False,
    progress_jitter: float = 0.0,
) -> float:
    """Seconds to wait before a restart.

    After an attempt that made progress (:func:`made_progress`: it trained past the step it resumed from, or left
    a newer valid checkpoint) the restart is immediate but for a small random delay in ``[0, min(progress_jitter,
    base)]``: the job was healthy, so waiting buys nothing, and the jitter keeps many nodes that lost the same
    switch from hitting the scheduler and the storage in the same instant (never longer than a first backoff).
    Only failures without progress back off: the delay doubles with every such restart in a row (``base``,
    ``2*base``, ``4*base``, ...) up to ``cap``, then a random fraction up to ``jitter`` of it is taken off.

    Args:
        restart: 1-based number of the restart among the failures without progress in a row.
        base: delay of the first restart, seconds.
        cap: the largest delay, seconds.
        jitter: fraction in [0, 1] of the delay that may be removed at random.
        rand: a uniform random number in [0, 1).
        progressed: the failed attempt made progress.
        progress_jitter: the largest delay after an attempt that made progress, seconds.

    Returns:
        ``rand * min(progress_jitter, base)`` after progress; else a delay in ``[(1 - jitter) * d, d]`` where
        ``d = min(cap, base * 2 ** (restart - 1))`` (0 for ``restart < 1``).
    """
    r = min(max(rand, 0.0), 1.0)
    if progressed:
        return max(min(progress_jitter, base), 0.0) * r
    if restart < 1:
        return 0.0
    exp = min(restart - 1, 63)  # 2**63 * base overflows nothing but is far past any cap
    d = min(cap, base * float(2**exp))
    return d * (1.0 - jitter * r)


def standby_worthwhile(cold_startup_s: float | None, min_s: float) -> bool:
    """Whether a warm standby can gain this job anything, from how long a fresh start of it took.

    A standby saves at most a fresh interpreter's start-up and imports, and costs an idle interpreter's memory and
    a slower exit (tearing down the modules it imported). A job whose cold start reached its first heartbeat in
    under ``min_s`` (a torch-free script) gains less than that, so it gets none.

    Args:
        cold_startup_s: seconds from a cold attempt's start to its first heartbeat (None: not measured).
        min_s: the least start-up worth a standby.

    Returns:
        True to keep a standby (also when nothing was measured: a job that does not beat its heartbeat).
    """
    return cold_startup_s is None or cold_startup_s >= min_s


def wait_for_standby(elapsed_s: float, ready_s: float | None, cold_startup_s: float | None) -> bool:
    """Whether a restart should wait for a warm standby that is still importing, rather than start cold.

    A standby imports what a fresh interpreter of a torch job would import anyway, so it is never behind one that
    starts now; but for a job that needs less than the preloaded modules (a torch-free script) a fresh start may be
    up before the standby is. Decided on what was measured in this run: the last standby's time from spawn to
    ready, and the last cold attempt's time from start to its first heartbeat. Either unknown: wait (the standby
    is at least as far along as a fresh start of a torch job).

    Args:
        elapsed_s: seconds since this standby was spawned.
        ready_s: seconds the last standby took to be ready (None: none was yet).
        cold_startup_s: seconds from a cold attempt's start to its first heartbeat (None: not measured).

    Returns:
        True to wait for the standby.
    """
    if ready_s is None or cold_startup_s is None:
        return True
    return ready_s - elapsed_s < cold_startup_s


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


def is_failure(returncode: int, preempt_signal: int | None = None) -> bool:
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
    return not (preempt_signal is not None and returncode in (-preempt_signal, 128 + preempt_signal))


def made_progress(
    before_step: int | None, after_step: int | None, resumed_step: int | None, last_step: int | None
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
    return last_step is not None and last_step > (resumed_step if resumed_step is not None else -1)


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


def has_traceback(stderr_tail: str) -> bool:
    """Whether a job's last stderr holds a Python traceback (it raised, rather than being killed).

    Args:
        stderr_tail: the end of the job's stderr.

    Returns:
        True when a traceback header is there.
    """
    return bool(_TRACEBACK.search(stderr_tail))


def child_signal(stderr_tail: str) -> int | None:
    """The signal that killed a worker, from ``torchrun``'s failure report (``exitcode  : -9``); None without one.

    torchrun exits 1 with a ``ChildFailedError`` traceback when a worker was SIGKILLed (the OOM killer, a
    preemption): the worker's own exit is the one that tells why.

    Args:
        stderr_tail: the end of the job's stderr.

    Returns:
        The first negative worker exit code's signal number, or None.
    """
    for m in _CHILD_EXIT.finditer(stderr_tail):
        code = int(m.group(1))
        if code < 0:
            return -code
    return None


def death_signal(returncode: int) -> int | None:
    """The signal a job died of: ``-N`` from ``Popen``, or ``128 + N`` from a shell or launcher in between.

    Args:
        returncode: ``Popen.returncode``.

    Returns:
        The signal number, or None for an ordinary exit.
    """
    if returncode < 0:
        return -returncode
    if 128 < returncode < 128 + 65:
        return returncode - 128
    return None


def exit_cause(
    returncode: int, *, preempted: bool = False, hung: bool = False, traceback: bool = False, worker_signal=None
) -> str:
    """Why an attempt ended, as far as the supervisor can tell.

    ``outside-signal``: killed by a signal that comes from outside the job (:data:`OUTSIDE_SIGNALS`: the OOM
    killer, a preemption, a person) with no Python traceback, or a ``torchrun`` whose worker was; such a death
    says nothing about the checkpoint. ``crash``: anything else that failed (an exception, ``sys.exit(1)``,
    SIGSEGV/SIGABRT/SIGBUS in the job). ``hang`` and ``preempted``: ended by the supervisor itself.

    Args:
        returncode: ``Popen.returncode``.
        preempted: a preemption signal was forwarded to it.
        hung: the hang detector killed it.
        traceback: its stderr ends with a Python traceback (:func:`has_traceback`).
        worker_signal: the signal a ``torchrun`` worker died of (:func:`child_signal`).

    Returns:
        One of :data:`CAUSE_OK`, :data:`CAUSE_PREEMPTED`, :data:`CAUSE_HANG`, :data:`CAUSE_OUTSIDE`,
        :data:`CAUSE_CRASH`.
    """
    if returncode == 0:
        return CAUSE_OK
    if preempted:
        return CAUSE_PREEMPTED
    if hung:
        return CAUSE_HANG
    if worker_signal in OUTSIDE_SIGNALS:
        return CAUSE_OUTSIDE
    if death_signal(returncode) in OUTSIDE_SIGNALS and not traceback:
        return CAUSE_OUTSIDE
    return CAUSE_CRASH


def evidence_of(
    cause: str, progressed: bool, restore_reported: bool, loaded: str | None, had_candidates: bool
) -> str | None:
    """What one attempt says about the checkpoint it started from (pure).

    Only a crash (:func:`exit_cause`) before any progress counts, and only what the job itself reported loading
    names a checkpoint: a death by an outside signal, a hang or a preemption is no evidence at all, and a job that
    reported nothing (a framework without a resumekit integration) leaves it unknown.

    Args:
        cause: the attempt's :func:`exit_cause`.
        progressed: it made progress (:func:`made_progress`).
        restore_reported: the job logged a ``restore`` event.
        loaded: the checkpoint path that event names (None: it started from scratch).
        had_candidates: a valid checkpoint existed for it to load.

    Returns:
        None when the attempt leaves the streak as it is (``""`` when it ends it: success or progress), else the
        checkpoint path, :data:`FROM_SCRATCH` or :data:`UNKNOWN`.
    """
    if cause == CAUSE_OK or progressed:
        return ""
    if cause != CAUSE_CRASH:
        return None
    if restore_reported:
        return loaded or FROM_SCRATCH
    return UNKNOWN if had_candidates else FROM_SCRATCH


def crash_loop_verdict(streak: Sequence[str], limit: int) -> tuple[str, str | None]:
    """What a streak of failures without progress calls for (pure).

    Args:
        streak: the evidence of each failure in a row (:func:`evidence_of`), oldest first.
        limit: ``SupervisorOptions.crash_loop``.

    Returns:
        ``("continue", None)`` below the limit; ``("quarantine", path)`` when the last ``limit`` failures all
        followed loading that checkpoint; ``("give-up", FROM_SCRATCH)`` when they all started from scratch;
        ``("give-up", UNKNOWN)`` when the job did not say what it loaded (or said different things): the
        supervisor then quarantines nothing.
    """
    if len(streak) < limit:
        return "continue", None
    last = list(streak[-limit:])
    if all(e == last[0] for e in last) and last[0] not in (FROM_SCRATCH, UNKNOWN):
        return "quarantine", last[0]
    if all(e == FROM_SCRATCH for e in last):
        return "give-up", FROM_SCRATCH
    return "give-up", UNKNOWN


def hang_reason(
    timeout: float | None,
    now: float,
    heartbeat_age: float | None,
    last_output: float,
    last_file_activity: float,
) -> str | None:
    """The hang verdict for every job (pure): why it counts as hung, or None.

    With a heartbeat (the job beat at least once: an integration is present) the job is hung when the heartbeat
    is older than ``timeout``; without one, when it wrote nothing to stdout/stderr for ``timeout``. Either way a
    job whose checkpoint directory grew within ``timeout`` (a save still writing) is not hung.

    Args:
        timeout: ``SupervisorOptions.hang_timeout`` (None or 0: off).
        now: wall time now.
        heartbeat_age: seconds since the last heartbeat; None when the job never beat.
        last_output: wall time of the job's last output (its start when it wrote none).
        last_file_activity: wall time files under the checkpoint directory last changed (the start when none).

    Returns:
        One line saying what was silent for how long, or None.
    """
    if not timeout:
        return None
    files_idle = now - last_file_activity
    if files_idle <= timeout:
        return None
    if heartbeat_age is not None:
        if heartbeat_age <= timeout:
            return None
        return f"no heartbeat for {heartbeat_age:.1f} s and no checkpoint file activity for {files_idle:.1f} s"
    out_idle = now - last_output
    if out_idle <= timeout:
        return None
    return f"no output for {out_idle:.1f} s and no checkpoint file activity for {files_idle:.1f} s (no heartbeat)"


def preempted_exit_code(
    received: int | None, returncode: int, forwarded: int | None, override: int | None = None
) -> int:
    """The exit status of ``resumekit run`` after it forwarded a preemption or interrupt to the job.

    A job that stopped as asked (exit 0 after saving, or death by the forwarded signal) reports ``128 + N`` for the
    signal ``N`` the supervisor received (130 for SIGINT, 143 for SIGTERM), as a shell does, so
    ``resumekit run ... && evaluate`` does not carry on after Ctrl-C; ``override`` (``--preempt-exit-code``)
    replaces that. A job that failed on the way out keeps its own status.

    Args:
        received: the signal the supervisor received (None: unknown, SIGTERM assumed).
        returncode: the job's ``Popen.returncode``.
        forwarded: the signal forwarded to the job.
        override: ``SupervisorOptions.preempt_exit_code``.

    Returns:
        The exit status.
    """
    if is_failure(returncode, forwarded):
        return exit_code_of(returncode)
    if override is not None:
        return override
    return 128 + (received or signal.SIGTERM)


def resets_budget(progressed: bool, duration_s: float, window_s: float) -> bool:
    """Whether an attempt gives the restart budget and the backoff back: it made progress (:func:`made_progress`)
    and ran for at least ``window_s`` seconds (``SupervisorOptions.reset_after``).

    Without it, a job that gets somewhere on every attempt but fails now and then over days would see its delay
    double up to the cap and its budget run out, as if it crashed at once every time.

    Args:
        progressed: the attempt made progress.
        duration_s: how long it ran.
        window_s: the window.

    Returns:
        True when the count of restarts starts again from zero.
    """
    return progressed and duration_s >= window_s


def is_hung(heartbeat_age: float | None, hang_timeout: float | None) -> bool:
    """The hang verdict: the job has beaten at least once and not for more than ``hang_timeout`` seconds.

    A job that never beat (no heartbeat file) is never judged hung: it may not use the heartbeat at all.

    Args:
        heartbeat_age: seconds since the last heartbeat; None when there is none.
        hang_timeout: ``SupervisorOptions.hang_timeout`` (None or 0: hang detection off).

    Returns:
        True when the job counts as hung.
    """
    return bool(hang_timeout) and heartbeat_age is not None and heartbeat_age > hang_timeout  # type: ignore[operator]


def hang_target(beat_pid: int | None, tree: Sequence[int]) -> int:
    """Which process of a hung job to dump: the one that wrote the heartbeat when it belongs to the job's tree
    (under ``torchrun`` that is a rank, not the launcher), else the job's root.

    Args:
        beat_pid: the ``pid`` the heartbeat names, if any.
        tree: the job's root pid followed by its descendants.

    Returns:
        A pid from ``tree``.
    """
    return beat_pid if beat_pid in tree else tree[0]  # type: ignore[return-value]


def grace_expired(preempted_at: float | None, now: float, grace: float) -> bool:
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
    "OUTSIDE_SIGNALS",
    "CAUSE_OK",
    "CAUSE_PREEMPTED",
    "CAUSE_HANG",
    "CAUSE_OUTSIDE",
    "CAUSE_CRASH",
    "FROM_SCRATCH",
    "UNKNOWN",
    "has_traceback",
    "child_signal",
    "death_signal",
    "exit_cause",
    "evidence_of",
    "crash_loop_verdict",
    "hang_reason",
    "preempted_exit_code",
    "resets_budget",
    "EXIT_PRECHECK",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "restart_backoff",
    "standby_worthwhile",
    "wait_for_standby",
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
