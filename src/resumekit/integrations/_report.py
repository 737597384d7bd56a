"""What a framework job tells the supervisor: the event log and the heartbeat, shared by every integration.

``resumekit run`` acts on evidence the job gives it, not on guesses: which checkpoint the job loaded (a ``restore``
event with its ``step`` and ``path``; step 0 and no path for a start from scratch), how far it got (``metrics``
events and the heartbeat's ``step``), what it saved (``save`` events). The heartbeat also tells a live job from a
hung one (``--hang-timeout``). The same vocabulary as :class:`resumekit.CheckpointManager`, so the supervisor and
``resumekit report`` read every job alike.

In a multi-process job the event log is written by global rank 0 only and the heartbeat by each node's local rank
0: a hung rank stalls rank 0 at its next collective, so the node's heartbeat still goes stale.
"""

from __future__ import annotations

import faulthandler
import math
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

from ..events import ENV_DIR, EventLog, Heartbeat

#: event names, as :class:`resumekit.CheckpointManager` writes them
RESTORE_EVENT = "restore"
SAVE_EVENT = "save"
METRICS_EVENT = "metrics"
PREEMPTED_EVENT = "preempted"
INIT_EVENT = "job_init"
FIRST_STEP_EVENT = "first_step"
# Fields every event already has; a metric of that name is renamed rather than overwrite them.
_RESERVED = ("time", "event", "source", "pid", "host", "step", "framework")


class JobReporter:
    """Writes one job's ``job_init``/``restore``/``first_step``/``save``/``metrics`` events and beats its heartbeat.

    Args:
        framework: the integration's name, recorded in every event (``"lightning"``, ``"hf"``, ``"deepspeed"``).
        directory: where ``events.jsonl`` goes when ``RESUMEKIT_EVENTS`` is unset (default: ``RESUMEKIT_DIR``).
        leads_job: this process writes the event log (global rank 0).
        leads_node: this process beats the heartbeat (local rank 0).
        heartbeat_interval: seconds between heartbeat touches.
        metrics_every: write a ``metrics`` event every N steps (0: never); the heartbeat is beaten at every step.
    """

    def __init__(
        self,
        framework: str,
        *,
        directory: str | None = None,
        leads_job: bool = True,
        leads_node: bool = True,
        heartbeat_interval: float = 1.0,
        metrics_every: int = 1,
    ):
        self.framework = framework
        directory = directory or os.environ.get(ENV_DIR) or None
        self.events = EventLog.for_dir(directory, "job") if leads_job else EventLog(None, "job")
        self.heartbeat = Heartbeat.from_env(heartbeat_interval) if leads_node else Heartbeat(None)
        self.metrics_every = metrics_every
        if self.heartbeat.path and hasattr(signal, "SIGUSR1") and threading.current_thread() is threading.main_thread():
            # Under `resumekit run --hang-timeout`, SIGUSR1 dumps every thread's stack before the kill.
            faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)
        # The earliest instant the integration sees: under `resumekit run` it ends "spawn + imports" in the
        # restart-latency breakdown (for these jobs that span includes the framework's own set-up, and the
        # framework's restore when it happens before its first callback: the breakdown says what it measured).
        self.events.emit(INIT_EVENT, framework=framework)
        self._first_step_pending = True

    def restored(self, step: int, path: str | None, **fields: Any) -> None:
        """The job loaded ``path`` at ``step`` (``path`` None and step 0: it starts from scratch)."""
        self.events.emit(RESTORE_EVENT, step=int(step), path=path, framework=self.framework, **fields)
        self.heartbeat.beat(int(step), force=True)

    def step(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """One training step done: beat the heartbeat; every ``metrics_every`` steps, log ``metrics``.

        Args:
            step: completed steps.
            metrics: numbers to log (loss, learning rate, ...); tensors and numpy scalars are converted.
        """
        step = int(step)
        self.heartbeat.beat(step)
        if self._first_step_pending:
            # This process's first training step ends "first step" in the breakdown, whatever metrics_every is.
            self._first_step_pending = False
            self.events.emit(FIRST_STEP_EVENT, step=step, framework=self.framework)
        if self.metrics_due(step):
            self.metrics(step, metrics or {})

    def metrics_due(self, step: int) -> bool:
        """Whether :meth:`step` logs a ``metrics`` event at ``step`` (compute costly metrics only then)."""
        return bool(self.metrics_every) and int(step) % self.metrics_every == 0

    def metrics(self, step: int, values: Mapping[str, Any]) -> None:
        """Log a ``metrics`` event now; non-numeric values are left out."""
        fields = {}
        for k, v in values.items():
            num = _number(v)
            if num is not None:
                fields[f"metric_{k}" if k in _RESERVED else str(k)] = num
        self.events.emit(METRICS_EVENT, step=int(step), framework=self.framework, **fields)

    def beat(self, step: int | None = None) -> None:
        """Beat the heartbeat only (evaluation loops, long saves in steps of their own)."""
        self.heartbeat.beat(step)

    def saved(self, step: int, path: str, **fields: Any) -> None:
        """A checkpoint of ``step`` is complete at ``path``."""
        self.events.emit(SAVE_EVENT, step=int(step), path=path, framework=self.framework, **fields)
        self.heartbeat.beat(int(step), force=True)

    def preempted(self, step: int) -> None:
        """The job saved ``step`` on a stop request and is about to exit."""
        self.events.emit(PREEMPTED_EVENT, step=int(step), framework=self.framework)


def _number(v: Any) -> float | None:
    """A finite int or float from a number, a one-element tensor or a numpy scalar; None for anything else."""
    if hasattr(v, "item") and callable(v.item):
        try:
            v = v.item()
        except (ValueError, RuntimeError):  # more than one element
            return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v
