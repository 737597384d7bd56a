"""The run's account: one :class:`AttemptRecord` per start, summed up into a :class:`RunSummary` (pure arithmetic).

``resumekit run`` prints the summary at the end and emits it as the ``summary`` event: restarts, failures, hangs,
lost steps, time in saves and restarts, and the effective training time ratio.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence


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
    """

    index: int
    resume_step: Optional[int]
    last_step: Optional[int]
    start: float
    end: float
    returncode: int
    failure: bool
    hung: bool = False
    preempted: bool = False
    backoff_s: float = 0.0
    precheck_s: float = 0.0
    startup_s: Optional[float] = None


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
        hangs: kills by the hang detector.
        preemptions: preemption signals forwarded.
        quarantined: checkpoints quarantined after a crash loop.
        precheck_retries: starts skipped because a retryable pre-check (hardware, remote) failed.
        lost_steps: steps redone: for each restart, the last step reached before it minus the step resumed from.
        save_blocking_s: training time blocked by saves (sum of ``blocking_s`` of the job's ``save`` events).
        backoff_s: time slept between attempts.
        startup_s: time from a restart to its first sign of training, summed over restarts.
        precheck_s: pre-check time before restarts.
        restart_s: ``backoff_s + startup_s + precheck_s``.
        redone_s: estimated time spent redoing lost steps.
        wall_s: wall time from the first start to the end.
        effective_ratio: ``1 - (restart_s + redone_s + save_blocking_s) / wall_s``, clamped to [0, 1].
    """

    exit_code: int
    outcome: str
    reason: str = ""
    starts: int = 0
    restarts: int = 0
    failures: int = 0
    killed_by_signal: int = 0
    hangs: int = 0
    preemptions: int = 0
    quarantined: int = 0
    precheck_retries: int = 0
    lost_steps: int = 0
    save_blocking_s: float = 0.0
    backoff_s: float = 0.0
    startup_s: float = 0.0
    precheck_s: float = 0.0
    restart_s: float = 0.0
    redone_s: float = 0.0
    wall_s: float = 0.0
    effective_ratio: float = 1.0

    def as_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict, seconds rounded to milliseconds."""
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def format_text(self) -> str:
        """A few human lines for stderr."""
        return "\n".join(
            [
                f"resumekit run: {self.outcome}, exit code {self.exit_code}: {self.reason}",
                f"  starts {self.starts} (restarts {self.restarts}), failures {self.failures} "
                f"({self.killed_by_signal} killed by a signal), hangs {self.hangs}, preemptions {self.preemptions}, "
                f"quarantined {self.quarantined}, pre-check retries {self.precheck_retries}",
                f"  lost steps {self.lost_steps} (~{self.redone_s:.1f} s redone), "
                f"time in saves {self.save_blocking_s:.2f} s, in restarts {self.restart_s:.1f} s "
                f"(backoff {self.backoff_s:.1f} s, startup {self.startup_s:.1f} s, pre-checks {self.precheck_s:.1f} s)",
                f"  effective training time {100 * self.effective_ratio:.1f}% of {self.wall_s:.1f} s",
            ]
        )


def lost_steps_of(attempts: Sequence[AttemptRecord]) -> List[int]:
    """Steps redone at each restart: last step reached by the attempt before minus the step resumed from.

    An attempt that reported no step lost nothing we can count; a restart from scratch resumes from step 0.

    Args:
        attempts: the run's attempts, in order.

    Returns:
        One count per restart (``len(attempts) - 1`` of them).
    """
    out = []
    for prev, cur in zip(attempts, attempts[1:]):
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
    save_blocking_s: float = 0.0,
    quarantined: int = 0,
    precheck_retries: int = 0,
    extra_backoff_s: float = 0.0,
) -> RunSummary:
    """The run's account from its attempts (pure arithmetic; see :class:`RunSummary` for each field).

    Args:
        attempts: the run's attempts, in order.
        exit_code: the exit code of ``resumekit run``.
        outcome: ``"success"``, ``"preempted"``, ``"failed"`` or ``"gave-up"``.
        reason: one line saying why the run ended.
        wall_s: wall time of the whole run.
        save_blocking_s: training time blocked by saves.
        quarantined: checkpoints quarantined.
        precheck_retries: retried pre-checks.
        extra_backoff_s: backoff slept after failed pre-checks, which belongs to no attempt.

    Returns:
        The summary.
    """
    restarts = attempts[1:]
    lost = lost_steps_of(attempts)
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
    startup = sum(a.startup_s or 0.0 for a in restarts)
    precheck = sum(a.precheck_s for a in restarts)
    restart_s = backoff + startup + precheck
    redone_s = sum(lost) * step_s
    overhead = restart_s + redone_s + save_blocking_s
    ratio = 1.0 if wall_s <= 0 else min(1.0, max(0.0, 1.0 - overhead / wall_s))
    return RunSummary(
        exit_code=exit_code,
        outcome=outcome,
        reason=reason,
        starts=len(attempts),
        restarts=len(restarts),
        failures=sum(a.failure for a in attempts),
        killed_by_signal=sum(1 for a in attempts if a.failure and a.returncode < 0),
        hangs=sum(a.hung for a in attempts),
        preemptions=sum(a.preempted for a in attempts),
        quarantined=quarantined,
        precheck_retries=precheck_retries,
        lost_steps=sum(lost),
        save_blocking_s=save_blocking_s,
        backoff_s=backoff,
        startup_s=startup,
        precheck_s=precheck,
        restart_s=restart_s,
        redone_s=redone_s,
        wall_s=wall_s,
        effective_ratio=ratio,
    )


__all__ = ["AttemptRecord", "RunSummary", "lost_steps_of", "summarize"]
