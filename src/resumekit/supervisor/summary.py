"""The run's account: one :class:`AttemptRecord` per start, summed up into a :class:`RunSummary` (pure arithmetic).

``resumekit run`` prints the summary at the end and emits it as the ``summary`` event: restarts, failures, hangs,
lost steps, time in saves and restarts, and the effective training time ratio.

A figure the supervisor cannot know is ``None`` (``null`` in JSON, "unknown" in the text), never 0 or a guess:
lost steps need the job to report its steps (heartbeat, ``restore``/``step``/``metrics``/``save`` events), time in
saves needs its ``save`` events, and the effective ratio needs both. A run whose job reported steps but never got
past one trained nothing: its effective ratio is 0.

Each restart also gets its latency breakdown (:mod:`.latency`: detect, supervisor, backoff, pre-check, spawn +
imports, restore, first step, redone work, save stalls), listed per restart in ``breakdown`` with medians and
totals, and the median time from an observed exit to the next attempt's first step (``kill_to_next_step_s``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

from .latency import (
    Breakdown,
    JobTimings,
    format_breakdown,
    median_breakdown,
    restart_breakdown,
    run_step_s,
    total_breakdown,
)


@dataclass
class AttemptRecord:
    """What happened to one start of the job (pure data for :func:`summarize`).

    Attributes:
        index: 1 for the first start.
        resume_step: the step it resumed from (what the job reported restoring, else what it was handed);
            None when it started from scratch.
        last_step: the highest step it reported (heartbeat, save/metrics events); None when it reported none.
        start: wall time of the start (epoch seconds).
        end: wall time of the exit.
        returncode: ``Popen.returncode`` (negative: killed by that signal).
        failure: whether the exit counts as a failure (see :func:`is_failure`).
        hung: killed by the hang detector.
        preempted: a preemption signal was forwarded to it.
        backoff_s: the backoff slept before this start.
        precheck_s: time spent in pre-checks before this start.
        startup_s: from the start to its first sign of training (heartbeat or restore event); None if unknown.
        cause: why it ended (:func:`~resumekit.supervisor.decisions.exit_cause`): ``ok``, ``crash``,
            ``outside-signal``, ``hang``, ``preempted``; "" when not classified.
        reported: the job reported anything (an event or a heartbeat) during this attempt.
        restore_reported: the job logged which checkpoint it loaded (a ``restore`` event).
        loaded: the checkpoint that event names (None: from scratch, or not reported).
        had_candidates: a valid checkpoint existed for this start to load.
        timings: what the job reported about its own timeline (:func:`~resumekit.supervisor.latency.job_timings`).
        detect_s: from its death to its observed exit, when known (a hang: from its last sign of life to the kill).
        detect_max_s: an upper bound of that (for an exit: the supervisor's poll interval); None when unknown.
        warm: it started in a warm standby interpreter (warm restart), not a fresh one.
    """

    index: int
    resume_step: int | None
    last_step: int | None
    start: float
    end: float
    returncode: int
    failure: bool
    hung: bool = False
    preempted: bool = False
    backoff_s: float = 0.0
    precheck_s: float = 0.0
    startup_s: float | None = None
    cause: str = ""
    reported: bool = True
    restore_reported: bool = False
    loaded: str | None = None
    had_candidates: bool = False
    timings: JobTimings = field(default_factory=JobTimings)
    detect_s: float | None = None
    detect_max_s: float | None = None
    warm: bool = False


@dataclass
class RunSummary:
    """The end-of-run account printed by ``resumekit run`` (and emitted as the ``summary`` event).

    Attributes:
        exit_code: the exit code of ``resumekit run`` (the job's final one).
        outcome: ``"success"``, ``"preempted"``, ``"failed"`` or ``"gave-up"``.
        reason: one line saying why the run ended.
        starts: how many times the job was started.
        restarts: starts after the first one.
        failures: failed exits (non-zero or killed); ``killed_by_signal`` of them died by a signal.
        outside_kills: failures by a signal from outside the job (OOM killer, preemption, a person) with no
            traceback: never held against a checkpoint.
        hangs: kills by the hang detector.
        preemptions: preemption signals forwarded.
        quarantined: checkpoints quarantined after a crash loop.
        hidden_invalid: invalid checkpoints moved out of the framework's sight before starts.
        precheck_retries: starts skipped because a retryable pre-check (hardware, remote) failed.
        lost_steps: steps redone: for each restart, the last step reached before it minus the step resumed from;
            None when the job reported no steps.
        save_blocking_s: training time blocked by saves (sum of ``blocking_s`` of the job's ``save`` events); None
            when the job reported nothing.
        backoff_s: time slept between attempts.
        startup_s: time from a restart to its first sign of training, summed over restarts; None when unknown.
        precheck_s: pre-check time before restarts.
        restart_s: ``backoff_s + startup_s + precheck_s``, raised to each restart's measured exit-to-first-step
            time where the job reported its first step, plus a hang's silence before its kill; None when
            ``startup_s`` is.
        redone_s: estimated time spent redoing lost steps; None when ``lost_steps`` is.
        wall_s: wall time from the first start to the end.
        effective_ratio: ``1 - (restart_s + redone_s + save_blocking_s) / wall_s``, clamped to [0, 1]; 0 when no
            step was trained; None when a part of it is unknown.
        breakdown: one restart-latency breakdown per restart (:class:`~resumekit.supervisor.latency.Breakdown`
            as a dict; None where unknown).
        breakdown_median: per figure, its median over the restarts where it is known (and the count, ``*_n``).
        breakdown_total: per segment, its sum over the restarts; None when a restart's figure is unknown.
        kill_to_next_step_s: median over the restarts of the time from the observed exit to the next attempt's
            first reported step; None when no restart reported one.
    """

    exit_code: int
    outcome: str
    reason: str = ""
    starts: int = 0
    restarts: int = 0
    failures: int = 0
    killed_by_signal: int = 0
    outside_kills: int = 0
    hangs: int = 0
    preemptions: int = 0
    quarantined: int = 0
    hidden_invalid: int = 0
    precheck_retries: int = 0
    lost_steps: int | None = 0
    save_blocking_s: float | None = 0.0
    backoff_s: float = 0.0
    startup_s: float | None = 0.0
    precheck_s: float = 0.0
    restart_s: float | None = 0.0
    redone_s: float | None = 0.0
    wall_s: float = 0.0
    effective_ratio: float | None = 1.0
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    breakdown_median: dict[str, Any] = field(default_factory=dict)
    breakdown_total: dict[str, float | None] = field(default_factory=dict)
    kill_to_next_step_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict, seconds rounded to milliseconds."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def format_text(self) -> str:
        """A few human lines for stderr; figures that cannot be known read "unknown"."""
        lost = (
            "lost steps unknown (the job reported no steps)"
            if self.lost_steps is None
            else f"lost steps {self.lost_steps} (~{_secs(self.redone_s, '.1f')} redone)"
        )
        ratio = (
            "effective training time unknown"
            if self.effective_ratio is None
            else f"effective training time {100 * self.effective_ratio:.1f}%"
        )
        return "\n".join(
            [
                f"resumekit run: {self.outcome}, exit code {self.exit_code}: {self.reason}",
                f"  starts {self.starts} (restarts {self.restarts}), failures {self.failures} "
                f"({self.killed_by_signal} killed by a signal, {self.outside_kills} from outside), hangs {self.hangs}, "
                f"preemptions {self.preemptions}, quarantined {self.quarantined}, invalid moved aside "
                f"{self.hidden_invalid}, pre-check retries {self.precheck_retries}",
                f"  {lost}, time in saves {_secs(self.save_blocking_s, '.2f')}, in restarts "
                f"{_secs(self.restart_s, '.1f')} (backoff {self.backoff_s:.1f} s, startup "
                f"{_secs(self.startup_s, '.1f')}, pre-checks {self.precheck_s:.1f} s)",
                f"  {ratio} of {self.wall_s:.1f} s",
            ]
            + ([f"  {format_breakdown(self.breakdown_median)}"] if self.breakdown else [])
        )


def _secs(value: float | None, spec: str) -> str:
    return "unknown" if value is None else f"{format(value, spec)} s"


def reports_steps(attempts: Sequence[AttemptRecord]) -> bool:
    """Whether the job reports its steps at all (some attempt reported one): without that, lost steps are unknown."""
    return any(a.last_step is not None for a in attempts)


def lost_steps_of(attempts: Sequence[AttemptRecord]) -> list[int] | None:
    """Steps redone at each restart: last step reached by the attempt before minus the step resumed from.

    When the job reports steps, an attempt that reported none died before training (it reports its restore first)
    and lost nothing; a restart from scratch resumes from step 0. When it never reports any, nothing can be said.

    Args:
        attempts: the run's attempts, in order.

    Returns:
        One count per restart (``len(attempts) - 1`` of them); None when the job reports no steps.
    """
    if len(attempts) > 1 and not reports_steps(attempts):
        return None
    out = []
    for prev, cur in pairwise(attempts):
        if prev.last_step is None:
            out.append(0)
            continue
        out.append(max(0, prev.last_step - (cur.resume_step or 0)))
    return out


def summarize(
    attempts: Sequence[AttemptRecord],
    *,
    exit_code: int,
    outcome: str,
    reason: str = "",
    wall_s: float,
    save_blocking_s: float | None = 0.0,
    quarantined: int = 0,
    precheck_retries: int = 0,
    extra_backoff_s: float = 0.0,
    hidden_invalid: int = 0,
) -> RunSummary:
    """The run's account from its attempts (pure arithmetic; see :class:`RunSummary` for each field).

    Args:
        attempts: the run's attempts, in order.
        exit_code: the exit code of ``resumekit run``.
        outcome: ``"success"``, ``"preempted"``, ``"failed"`` or ``"gave-up"``.
        reason: one line saying why the run ended.
        wall_s: wall time of the whole run.
        save_blocking_s: training time blocked by saves; None when unknown (the job reported nothing).
        quarantined: checkpoints quarantined.
        precheck_retries: retried pre-checks.
        extra_backoff_s: backoff slept after failed pre-checks, which belongs to no attempt.
        hidden_invalid: invalid checkpoints moved out of the framework's sight.

    Returns:
        The summary.
    """
    restarts = attempts[1:]
    lost = lost_steps_of(attempts)
    known = reports_steps(attempts)
    # Seconds per step, from the attempts that reported steps: how long redoing a lost step took.
    train_s, advanced = 0.0, 0
    for a in attempts:
        if a.last_step is not None:
            steps = a.last_step - (a.resume_step or 0)
            if steps > 0:
                advanced += steps
                train_s += max(0.0, a.end - a.start - (a.startup_s or 0.0))
    step_s = train_s / advanced if advanced else 0.0
    backoff = sum(a.backoff_s for a in restarts) + extra_backoff_s
    startup: float | None = 0.0
    for a in restarts:
        if a.startup_s is not None:
            startup += a.startup_s  # type: ignore[operator]
        elif known:
            startup += max(0.0, a.end - a.start)  # type: ignore[operator]  # never got past its start-up
        else:
            startup = None
            break
    precheck = sum(a.precheck_s for a in restarts)
    restart_s = None if startup is None else backoff + startup + precheck
    redone_s = None if lost is None else sum(lost) * step_s
    items = breakdowns_of(attempts, lost)
    if restart_s is not None:
        for a, b in zip(restarts, items, strict=True):
            # Where the job reported its first step, the exit-to-first-step time is measured whole: what the parts
            # above miss (the supervisor's clean-up, the restore, the first step) is lost time too. So is a hang's
            # silence before the kill.
            if b.kill_to_next_step_s is not None:
                up = a.startup_s if a.startup_s is not None else max(0.0, a.end - a.start)
                restart_s += max(0.0, b.kill_to_next_step_s - (a.backoff_s + a.precheck_s + up))
            restart_s += b.detect_s or 0.0
    ratio: float | None = None
    if restart_s is not None and redone_s is not None and save_blocking_s is not None and wall_s > 0:
        if known and advanced == 0:
            ratio = 0.0  # the job reported steps but trained none
        elif known or not attempts:
            ratio = min(1.0, max(0.0, 1.0 - (restart_s + redone_s + save_blocking_s) / wall_s))
    return RunSummary(
        exit_code=exit_code,
        outcome=outcome,
        reason=reason,
        starts=len(attempts),
        restarts=len(restarts),
        failures=sum(a.failure for a in attempts),
        killed_by_signal=sum(1 for a in attempts if a.failure and a.returncode < 0),
        outside_kills=sum(1 for a in attempts if a.failure and a.cause == "outside-signal"),
        hangs=sum(a.hung for a in attempts),
        preemptions=sum(a.preempted for a in attempts),
        quarantined=quarantined,
        hidden_invalid=hidden_invalid,
        precheck_retries=precheck_retries,
        lost_steps=None if lost is None else sum(lost),
        save_blocking_s=save_blocking_s,
        backoff_s=backoff,
        startup_s=startup,
        precheck_s=precheck,
        restart_s=restart_s,
        redone_s=redone_s,
        wall_s=wall_s,
        effective_ratio=ratio,
        breakdown=[b.as_dict() for b in items],
        breakdown_median=median_breakdown(items) if items else {},
        breakdown_total=total_breakdown(items) if items else {},
        kill_to_next_step_s=median_breakdown(items)["kill_to_next_step_s"] if items else None,
    )


def breakdowns_of(attempts: Sequence[AttemptRecord], lost: Sequence[int] | None = None) -> list[Breakdown]:
    """The restart-latency breakdown of each restart (pure; see :mod:`.latency`).

    Args:
        attempts: the run's attempts, in order.
        lost: :func:`lost_steps_of` the attempts (computed when not given).

    Returns:
        One breakdown per restart (``len(attempts) - 1``).
    """
    lost = lost_steps_of(attempts) if lost is None else lost
    step_s = run_step_s([a.timings for a in attempts])
    return [
        restart_breakdown(
            attempt=cur.index,
            after=prev.cause,
            prev_end=prev.end,
            prev_detect_s=prev.detect_s,
            prev_detect_max_s=prev.detect_max_s,
            prev_save_stalls_s=prev.timings.save_stalls_s,
            prev_last_report=prev.timings.last_report_time,
            start=cur.start,
            backoff_s=cur.backoff_s,
            precheck_s=cur.precheck_s,
            timings=cur.timings,
            lost_steps=None if lost is None else lost[i],
            step_s=step_s,
            warm=cur.warm,
        )
        for i, (prev, cur) in enumerate(pairwise(attempts))
    ]


__all__ = ["AttemptRecord", "RunSummary", "breakdowns_of", "lost_steps_of", "reports_steps", "summarize"]
