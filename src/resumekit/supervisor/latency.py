"""Where a restart's seconds go (pure arithmetic): the restart-latency breakdown of ``resumekit run``.

Each restart costs, in order (each figure from evidence, ``None`` = "unknown", never guessed):

``detect``
    From the job's death to the supervisor seeing it. A hang: from the last sign of life (the heartbeat's, else the
    output's or the checkpoint directory's last activity) to the kill, the ``hang_timeout`` included. An exit: the
    supervisor polls the job every ``poll_interval``, so the death was seen at most that long after it happened;
    the exact figure is unknown (``detect_s`` null) and ``detect_max_s`` holds the bound.
``supervisor``
    From the observed exit to the next launch, less the backoff and the pre-checks: killing what the job left
    behind, draining its output, the accounting (measured by the supervisor).
``backoff``, ``pre-check``
    Slept and spent by the supervisor before the launch (measured by it).
``spawn + imports``
    From the launch to the job's restore beginning (the ``restore`` event's time less its ``seconds``): a fresh
    interpreter, the imports, the job's own set-up. Without a timed restore event, to the job's first event
    (``job_init``: the :class:`~resumekit.CheckpointManager` or an integration was constructed).
``restore``
    The job's own ``restore`` event's ``seconds``.
``first step``
    From the end of the restore (the ``restore`` event's time) to the first training step the job reported
    (``first_step``, ``metrics`` or ``step`` events).
``redone work``
    The steps between the previous attempt's last reported step and this attempt's resume step, times the step
    time measured from the job's own step reports; unknown when the job reports no steps.
``save stalls``
    Training time the attempt that ended spent blocked in saves (its ``save`` events' ``blocking_s``): the premium
    paid for the insurance that this restart cashed in.

``kill_to_next_step_s`` is the headline figure: from the observed exit to the next attempt's first reported step
(``supervisor + backoff + pre-check + spawn + restore + first step``). Times are the job's and the supervisor's
wall clocks: on one host they agree; across hosts their skew enters the job-side figures.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: the stacked bar's segments, in the order a restart pays them (field name, label)
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("detect_s", "detect"),
    ("supervisor_s", "supervisor"),
    ("backoff_s", "backoff"),
    ("precheck_s", "pre-check"),
    ("spawn_s", "spawn + imports"),
    ("restore_s", "restore"),
    ("first_step_s", "first step"),
    ("redone_s", "redone work"),
    ("save_stalls_s", "save stalls"),
)
#: the job's events that report a training step (the ``restore`` event is not one: nothing was trained yet)
FIRST_STEP_EVENTS = ("first_step", "metrics", "step")
#: the job's events that say which step it reached (a save reports its step when it is durable)
STEP_REPORTS = ("first_step", "metrics", "step", "save", "restore", "restored")
#: the job's event announcing it is up (the manager or an integration was constructed)
INIT_EVENT = "job_init"


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


@dataclass(frozen=True)
class JobTimings:
    """What one attempt's job reported about its own timeline; None where it reported nothing.

    Attributes:
        init_time: wall time of its ``job_init`` event.
        restore_start: wall time its restore began (``restore`` event time less its ``seconds``).
        restore_end: wall time of its ``restore`` event.
        restore_s: the ``restore`` event's ``seconds``.
        first_step_time: wall time of the first training step it reported after its restore.
        step_s: seconds per step, from the times and steps of its step reports (at least two distinct steps).
        steps_timed: how many steps that measurement spans (0: none).
        save_stalls_s: sum of its ``save`` events' ``blocking_s``; None when it logged no event at all.
        last_report_time: wall time of its last report of a step (an event; the supervisor adds the heartbeat's).
    """

    init_time: float | None = None
    restore_start: float | None = None
    restore_end: float | None = None
    restore_s: float | None = None
    first_step_time: float | None = None
    step_s: float | None = None
    steps_timed: int = 0
    save_stalls_s: float | None = None
    last_report_time: float | None = None


def job_timings(events: Sequence[Mapping[str, Any]]) -> JobTimings:
    """The job's own timeline from the events of one attempt (the supervisor's are ignored).

    Args:
        events: the events appended during the attempt, in order.

    Returns:
        The timings; a job that logged nothing gets all None.
    """
    init = restore_start = restore_end = restore_s = first = last = None
    stalls, reported = 0.0, False
    points: list[tuple[float, int]] = []
    for ev in events:
        if ev.get("source") == "supervisor":
            continue
        reported = True
        name, t = ev.get("event"), _num(ev.get("time"))
        if t is None:
            continue
        if name == INIT_EVENT and init is None:
            init = t
        elif name in ("restore", "restored") and restore_end is None:
            restore_end = t
            secs = _num(ev.get("seconds"))
            if secs is not None and secs >= 0:
                restore_s, restore_start = secs, t - secs
        elif name == "save":
            blocked = _num(ev.get("blocking_s"))
            stalls += blocked if blocked is not None and blocked > 0 else 0.0
        if name in STEP_REPORTS and isinstance(ev.get("step"), int):
            last = t if last is None else max(last, t)
        if name in FIRST_STEP_EVENTS:
            step = ev.get("step")
            if first is None and (restore_end is None or t >= restore_end):
                first = t
            if isinstance(step, int) and not isinstance(step, bool):
                points.append((t, step))
    step_s, spanned = None, 0
    if points:
        (t0, s0), (t1, s1) = min(points, key=lambda p: p[1]), max(points, key=lambda p: p[1])
        if s1 > s0 and t1 >= t0:
            step_s, spanned = (t1 - t0) / (s1 - s0), s1 - s0
    return JobTimings(
        init_time=init,
        restore_start=restore_start,
        restore_end=restore_end,
        restore_s=restore_s,
        first_step_time=first,
        step_s=step_s,
        steps_timed=spanned,
        save_stalls_s=stalls if reported else None,
        last_report_time=last,
    )


def attempt_fields(timings: JobTimings, start: float) -> dict[str, float | None]:
    """The job-side figures of one attempt for its ``exit`` event (seconds, None = unknown).

    ``spawn_s`` (launch to the restore beginning), ``restore_s``, ``first_step_s`` (restore end to the first
    reported step), ``save_stalls_s`` and ``step_s`` (measured seconds per step).
    """
    begun = timings.restore_start if timings.restore_start is not None else timings.init_time
    first = None
    if timings.first_step_time is not None and timings.restore_end is not None:
        first = max(0.0, timings.first_step_time - timings.restore_end)
    fields = {
        "spawn_s": None if begun is None else max(0.0, begun - start),
        "restore_s": timings.restore_s,
        "first_step_s": first,
        "save_stalls_s": timings.save_stalls_s,
        "step_s": timings.step_s,
    }
    return {k: (None if v is None else round(v, 6 if k == "step_s" else 3)) for k, v in fields.items()}


def hang_detect_s(events: Sequence[Mapping[str, Any]], end: float) -> float | None:
    """For an attempt killed as hung: seconds from its last sign of life to its observed exit (None: unknown).

    The supervisor's ``hang`` event says when it judged the job hung (``detected_time``) and how long the job had
    been silent then (``heartbeat_age_s``, else ``output_idle_s``).

    Args:
        events: the events appended during the attempt.
        end: wall time of the observed exit (after the kill).
    """
    for ev in events:
        if ev.get("source") != "supervisor" or ev.get("event") != "hang":
            continue
        detected = _num(ev.get("detected_time")) or _num(ev.get("time"))
        age = _num(ev.get("heartbeat_age_s"))
        if age is None:
            age = _num(ev.get("output_idle_s"))
        if detected is None or age is None:
            return None
        return max(0.0, end - (detected - age))
    return None


def run_step_s(timings: Sequence[JobTimings]) -> float | None:
    """Seconds per step over the run: the attempts' measured step times weighted by the steps each spans."""
    spanned = sum(t.steps_timed for t in timings if t.step_s is not None)
    if not spanned:
        return None
    return sum(t.step_s * t.steps_timed for t in timings if t.step_s is not None) / spanned


@dataclass
class Breakdown:
    """Where one restart's seconds went (see the module docstring for each figure; None = unknown).

    Attributes:
        attempt: the attempt this restart started (2 for the first restart).
        after: why the previous attempt ended (``crash``, ``outside-signal``, ``hang``, ...).
        detect_s: death to observed exit; None for an exit (see ``detect_max_s``).
        detect_max_s: an upper bound of ``detect_s`` (the poll interval for an exit); None when unknown.
        supervisor_s: observed exit to launch, less backoff and pre-checks.
        backoff_s: slept before the launch.
        precheck_s: pre-checks before the launch.
        spawn_s: launch to the job's restore beginning.
        restore_s: the job's restore.
        first_step_s: restore end to the first reported step.
        lost_steps: steps redone, as far as the job reported them; None when the job reports no steps.
        redone_s: ``lost_steps`` times the measured step time: a lower bound, the steps after the job's last
            report (up to one heartbeat interval of them) are not seen.
        redone_max_s: an upper bound: ``redone_s`` plus the time from the job's last report to its observed exit
            (it may have trained all of it); None when unknown.
        save_stalls_s: the previous attempt's save stalls.
        kill_to_next_step_s: observed exit to this attempt's first reported step.
        warm: this attempt started in a warm standby interpreter (warm restart).
    """

    attempt: int
    after: str = ""
    warm: bool = False
    detect_s: float | None = None
    detect_max_s: float | None = None
    supervisor_s: float | None = None
    backoff_s: float | None = None
    precheck_s: float | None = None
    spawn_s: float | None = None
    restore_s: float | None = None
    first_step_s: float | None = None
    lost_steps: int | None = None
    redone_s: float | None = None
    redone_max_s: float | None = None
    save_stalls_s: float | None = None
    kill_to_next_step_s: float | None = None

    def unknown(self) -> list[str]:
        """The labels of the segments that are unknown."""
        return [label for name, label in COMPONENTS if getattr(self, name) is None]

    def known_total_s(self) -> float:
        """The sum of the known segments (a lower bound of the restart's cost when some are unknown)."""
        return sum(v for name, _ in COMPONENTS if (v := getattr(self, name)) is not None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: seconds rounded to milliseconds, unknown as None."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def restart_breakdown(
    *,
    attempt: int,
    after: str,
    prev_end: float,
    prev_detect_s: float | None,
    prev_detect_max_s: float | None,
    prev_save_stalls_s: float | None,
    start: float,
    prev_last_report: float | None = None,
    backoff_s: float,
    precheck_s: float,
    timings: JobTimings,
    lost_steps: int | None,
    step_s: float | None,
    warm: bool = False,
) -> Breakdown:
    """One restart's breakdown from what was measured around it (pure arithmetic, no clock reads).

    Args:
        attempt: the attempt the restart started.
        after: why the previous attempt ended.
        prev_end: wall time of the previous attempt's observed exit.
        prev_detect_s: its death-to-exit time, if known (a hang).
        prev_detect_max_s: its upper bound.
        prev_save_stalls_s: its save stalls.
        prev_last_report: wall time of its last report of a step (bounds the steps it did not report).
        start: wall time of this launch.
        backoff_s: slept before it.
        precheck_s: pre-checks before it.
        timings: what this attempt's job reported (:func:`job_timings`).
        lost_steps: steps redone at this restart (:func:`~resumekit.supervisor.summary.lost_steps_of`).
        step_s: the run's measured seconds per step (:func:`run_step_s`).
        warm: this attempt started in a warm standby.

    Returns:
        The breakdown.
    """

    def since(t: float | None, t0: float | None) -> float | None:
        # max(0): the job's clock ticks on its own; a few microseconds of disorder is not a negative duration.
        return None if t is None or t0 is None else max(0.0, t - t0)

    begun = timings.restore_start if timings.restore_start is not None else timings.init_time
    redone = (
        None if lost_steps is None else (0.0 if lost_steps == 0 else (None if step_s is None else lost_steps * step_s))
    )
    return Breakdown(
        attempt=attempt,
        after=after,
        warm=warm,
        detect_s=prev_detect_s,
        detect_max_s=prev_detect_max_s if prev_detect_s is None else prev_detect_s,
        supervisor_s=max(0.0, start - prev_end - backoff_s - precheck_s),
        backoff_s=backoff_s,
        precheck_s=precheck_s,
        spawn_s=since(begun, start),
        restore_s=timings.restore_s,
        first_step_s=since(timings.first_step_time, timings.restore_end),
        lost_steps=lost_steps,
        redone_s=redone,
        redone_max_s=None
        if redone is None or prev_last_report is None
        else redone + max(0.0, prev_end - prev_last_report),
        save_stalls_s=prev_save_stalls_s,
        kill_to_next_step_s=since(timings.first_step_time, prev_end),
    )


def median_breakdown(items: Sequence[Breakdown]) -> dict[str, Any]:
    """Per figure, the median over the restarts where it is known, and how many those were.

    Returns:
        ``{"restarts": n, "warm": warm starts, "<figure>": median or None, "<figure>_n": known count, ...}`` for
        every segment and ``kill_to_next_step_s``.
    """
    out: dict[str, Any] = {"restarts": len(items), "warm": sum(b.warm for b in items)}
    for name in [n for n, _ in COMPONENTS] + ["detect_max_s", "redone_max_s", "kill_to_next_step_s"]:
        known = [v for b in items if (v := getattr(b, name)) is not None]
        out[name] = round(statistics.median(known), 3) if known else None
        out[f"{name}_n"] = len(known)
    return out


def total_breakdown(items: Sequence[Breakdown]) -> dict[str, float | None]:
    """Per segment, the sum over the restarts; None when any restart's figure is unknown (a partial sum would
    read as the whole)."""
    out: dict[str, float | None] = {}
    for name, _ in COMPONENTS:
        values = [getattr(b, name) for b in items]
        out[name] = None if any(v is None for v in values) else round(sum(values), 3)
    return out


def format_breakdown(median: Mapping[str, Any]) -> str:
    """One line: the median of each segment over the restarts ("unknown" where never measured)."""
    n = median.get("restarts", 0)
    parts = []
    for name, label in COMPONENTS:
        v = median.get(name)
        if name == "detect_s" and v is None and median.get("detect_max_s") is not None:
            parts.append(f"{label} <= {median['detect_max_s']:.2f} s")
        elif name == "redone_s" and v is not None and (most := median.get("redone_max_s")) is not None and most > v:
            parts.append(f"{label} {v:.2f} s (<= {most:.2f})")
        else:
            parts.append(f"{label} {'unknown' if v is None else f'{v:.2f} s'}")
    k2s = median.get("kill_to_next_step_s")
    warm = f" ({median['warm']} warm)" if median.get("warm") else ""
    head = f"restart latency, median of {n} restart{'s' if n != 1 else ''}{warm}: "
    return head + ", ".join(parts) + f"; kill to next step {'unknown' if k2s is None else f'{k2s:.2f} s'}"


def extrapolate_effective(
    *, interval_s: float, restart_s: float, save_cost_s: float, save_interval_s: float, redone_fraction: float = 0.5
) -> float:
    """Effective training time with one failure every ``interval_s`` seconds of training, from measured components.

    Each cycle is ``interval_s`` of training followed by ``restart_s`` (the failure to the next step). Of the
    training, ``save_cost_s / save_interval_s`` is lost to save stalls and ``redone_fraction * save_interval_s``
    redoes lost steps (a failure lands, on average, half-way through a save interval)::

        effective = ((1 - save_cost_s / save_interval_s) * interval_s - redone_fraction * save_interval_s)
                    / (interval_s + restart_s)

    Args:
        interval_s: seconds of training between failures.
        restart_s: seconds from a failure to the next step.
        save_cost_s: training time one save blocks.
        save_interval_s: seconds between saves.
        redone_fraction: the measured mean redone work per failure over the save interval (0.5 in theory).

    Returns:
        The ratio, clamped to [0, 1].
    """
    if interval_s <= 0 or save_interval_s <= 0:
        raise ValueError("intervals must be > 0")
    stalls = min(1.0, max(0.0, save_cost_s / save_interval_s))
    useful = (1.0 - stalls) * interval_s - max(0.0, redone_fraction) * save_interval_s
    return min(1.0, max(0.0, useful / (interval_s + max(0.0, restart_s))))


__all__ = [
    "COMPONENTS",
    "Breakdown",
    "attempt_fields",
    "FIRST_STEP_EVENTS",
    "INIT_EVENT",
    "STEP_REPORTS",
    "JobTimings",
    "extrapolate_effective",
    "format_breakdown",
    "hang_detect_s",
    "job_timings",
    "median_breakdown",
    "restart_breakdown",
    "run_step_s",
    "total_breakdown",
]
