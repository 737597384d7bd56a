"""What an attempt of the job reported about itself and how it ended (pure): the evidence the crash-loop rule and
the run summary act on.

The job speaks through the heartbeat and its own events: ``restore``/``restored`` (``step``, and ``path``: what it
loaded, None when it started from scratch), ``step``, ``metrics``, ``save``. What it did not say stays unknown
(None), and the end of its stderr tells a crash (a Python traceback) from a death by an outside signal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .context import StartPlan
from .decisions import child_signal, describe_exit, exit_cause, has_traceback, is_failure
from .latency import hang_detect_s, job_timings
from .summary import AttemptRecord

#: the job's events that name the checkpoint it loaded (the manager writes "restore"; "restored" is accepted too)
RESTORE_EVENTS = ("restore", "restored")
#: the job's events that report a step it reached
STEP_EVENTS = ("save", "metrics", "step", "first_step") + RESTORE_EVENTS


def read_heartbeat(path: str) -> dict[str, Any]:
    """The heartbeat's JSON (``time``, ``step``, ``pid``); {} when missing or torn.

    Args:
        path: the heartbeat file.

    Returns:
        Its content.
    """
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


@dataclass
class JobReport:
    """What an attempt reported about itself (:func:`job_report`); None where it reported nothing.

    Attributes:
        restored_step: the step it said it restored (0: from scratch).
        restored_path: the checkpoint it said it loaded (None: from scratch, or not said).
        restore_reported: it logged a ``restore`` event.
        last_step: the highest step it reported (heartbeat, ``save``/``metrics``/``step``/``restore`` events).
        first_sign: wall time of its first sign of training.
        reported: it reported anything at all (an event or a heartbeat).
    """

    restored_step: int | None = None
    restored_path: str | None = None
    restore_reported: bool = False
    last_step: int | None = None
    first_sign: float | None = None
    reported: bool = False


def job_report(beat: Mapping[str, Any], events: Sequence[Mapping[str, Any]], first_sign: float | None) -> JobReport:
    """What an attempt reported about itself, from its last heartbeat and its own events (pure).

    Args:
        beat: the last heartbeat (:func:`read_heartbeat`).
        events: the events appended during the attempt.
        first_sign: the heartbeat's first mtime, if seen.

    Returns:
        The report.
    """
    rep = JobReport(first_sign=first_sign, reported=bool(beat))
    steps: list[int] = []
    if isinstance(beat.get("step"), int):
        steps.append(beat["step"])
    for ev in events:
        if ev.get("source") == "supervisor":
            continue
        rep.reported = True
        step = ev.get("step")
        name = ev.get("event")
        if name in RESTORE_EVENTS:
            rep.restore_reported = True
            rep.restored_step = step if isinstance(step, int) else None
            path = ev.get("path")
            rep.restored_path = str(path) if path else None
        if isinstance(step, int) and name in STEP_EVENTS:
            steps.append(step)
        if name in STEP_EVENTS and isinstance(ev.get("time"), (int, float)):
            rep.first_sign = min(rep.first_sign, ev["time"]) if rep.first_sign else ev["time"]
    rep.last_step = max(steps) if steps else None
    return rep


def attempt_evidence(
    beat: Mapping[str, Any], events: Sequence[Mapping[str, Any]], first_sign: float | None
) -> tuple[int | None, int | None, float | None]:
    """``(step it restored, highest step reported, time of its first sign of training)``: :func:`job_report` in
    the older tuple form; None where unknown."""
    rep = job_report(beat, events, first_sign)
    return rep.restored_step, rep.last_step, rep.first_sign


def account_attempt(
    *,
    index: int,
    plan: StartPlan,
    start: float,
    end: float,
    returncode: int,
    backoff_s: float,
    preempt_signal: int | None,
    hung: bool,
    first_sign: float | None,
    stderr_tail: str,
    beat: Mapping[str, Any],
    events: Sequence[Mapping[str, Any]],
    poll_interval: float | None = None,
) -> tuple[AttemptRecord, JobReport]:
    """The record of an attempt that ended, from what was seen of it (pure).

    Args:
        index: 1 for the first start.
        plan: what it was started with.
        start: wall time of the start.
        end: wall time of the exit.
        returncode: its ``Popen.returncode``.
        backoff_s: the backoff slept before it.
        preempt_signal: the signal forwarded to it, if any.
        hung: the hang detector killed it.
        first_sign: the heartbeat's first mtime, if seen.
        stderr_tail: the end of its stderr.
        beat: its last heartbeat.
        events: the events appended during the attempt.
        poll_interval: how often the supervisor polled the job: an exit was seen at most this long after it
            happened (the bound of its detection time); None: unknown.

    Returns:
        ``(record, what the job reported)``.
    """
    rep = job_report(beat, events, first_sign)
    failure = is_failure(returncode, preempt_signal)
    cause = exit_cause(
        returncode,
        preempted=preempt_signal is not None and not failure,
        hung=hung,
        traceback=has_traceback(stderr_tail),
        worker_signal=child_signal(stderr_tail),
    )
    rec = AttemptRecord(
        index=index,
        resume_step=rep.restored_step if rep.restored_step is not None else plan.resume_step,
        last_step=rep.last_step,
        start=start,
        end=end,
        returncode=returncode,
        failure=failure,
        hung=hung,
        preempted=preempt_signal is not None,
        backoff_s=backoff_s,
        precheck_s=plan.precheck_s,
        startup_s=(max(0.0, rep.first_sign - start) if rep.first_sign else None),
        cause=cause,
        reported=rep.reported,
        restore_reported=rep.restore_reported,
        loaded=rep.restored_path,
        had_candidates=plan.candidates,
        timings=job_timings(events),
    )
    beat_time = beat.get("time")
    if isinstance(beat_time, (int, float)) and isinstance(beat.get("step"), int):
        # The heartbeat carries the step too, and beats more often than the rate-limited events.
        last = rec.timings.last_report_time
        rec.timings = replace(rec.timings, last_report_time=beat_time if last is None else max(last, beat_time))
    if hung:
        # Judged hung: the silence before the verdict, the stack dump and the kill are all detection time.
        rec.detect_s = hang_detect_s(events, end)
        rec.detect_max_s = rec.detect_s
    elif poll_interval is not None and not rec.preempted:
        # The exit itself is seen by polling: somewhere within one poll interval of the death, no more precisely.
        rec.detect_max_s = poll_interval
    return rec, rep


def failure_line(rec: AttemptRecord, rep: JobReport, hung: bool) -> str:
    """One progress line for a failed attempt: how it exited, why, how far it got and what it loaded."""
    what = "was killed as hung" if hung else "failed"
    why = {
        "outside-signal": "killed from outside (no traceback): not held against the checkpoint",
        "crash": "crashed",
    }.get(rec.cause, rec.cause)
    loaded = f"loaded {rep.restored_path or 'nothing (from scratch)'}" if rep.restore_reported else "loaded unknown"
    last = "unknown" if rec.last_step is None else rec.last_step
    return (
        f"the job {what}: exit {describe_exit(rec.returncode)} after {rec.end - rec.start:.1f} s, {why} "
        f"(last step {last}, {loaded})"
    )


__all__ = [
    "JobReport",
    "RESTORE_EVENTS",
    "STEP_EVENTS",
    "account_attempt",
    "attempt_evidence",
    "failure_line",
    "job_report",
    "read_heartbeat",
]
