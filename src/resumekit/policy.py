"""When to save and what to keep: small dataclasses with pure decision functions (no I/O, no clock reads).

The manager feeds them the facts (current step, current time, the list of committed checkpoints) and acts on the
answer, so every rule here is unit-tested without a file system.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class SavePolicy:
    """When a checkpoint is due. With neither field set, only explicit saves (and preemption) save.

    Attributes:
        every_steps: save when ``step % every_steps == 0``.
        every_seconds: save when this many seconds have passed since the last save (or since the start).
    """

    every_steps: int | None = None
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.every_steps is not None and (not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise ConfigError(f"SavePolicy.every_steps must be a positive integer, got {self.every_steps!r}")
        if self.every_seconds is not None and not (self.every_seconds > 0 and math.isfinite(self.every_seconds)):
            raise ConfigError(f"SavePolicy.every_seconds must be a positive number, got {self.every_seconds!r}")

    def due(self, step: int, now: float, last_save_time: float, last_saved_step: int | None) -> bool:
        """Whether ``step`` should be saved. A step already saved is never due again."""
        if last_saved_step is not None and step <= last_saved_step:
            return False
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and now - last_save_time >= self.every_seconds


def young_interval(save_cost_s: float, mtbf_s: float) -> float:
    """Young's optimal checkpoint interval: sqrt(2 * save cost * mean time between failures), in seconds."""
    if save_cost_s < 0 or mtbf_s <= 0:
        raise ValueError("save cost must be >= 0 and MTBF > 0")
    return math.sqrt(2.0 * save_cost_s * mtbf_s)


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """Which committed checkpoints to keep. A checkpoint kept by any rule survives; with no rule set, all do.

    Attributes:
        keep_last: keep the newest N valid checkpoints.
        keep_every: also keep every checkpoint whose step is a multiple of K (long-term history).
        keep_best: also keep the N best checkpoints by ``best_metric``.
        best_metric: metadata key the ``keep_best`` rule ranks by (e.g. ``"loss"``).
        best_mode: ``"min"`` or ``"max"``.
    """

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"RetentionPolicy.{name} must be a positive integer, got {v!r}")
        if self.keep_best is not None and not self.best_metric:
            raise ConfigError("RetentionPolicy.keep_best needs best_metric (the metric name to rank by)")
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"RetentionPolicy.best_mode must be 'min' or 'max', got {self.best_mode!r}")

    @property
    def active(self) -> bool:
        return self.keep_last is not None or self.keep_every is not None or self.keep_best is not None

    def to_delete(
        self,
        valid_steps: Sequence[int],
        metrics: Mapping[int, Mapping[str, float]] | None = None,
        protected: Iterable[int] = (),
    ) -> list[int]:
        """The valid steps to delete, oldest first.

        The newest valid step and every ``protected`` step (being written, being uploaded, being resumed from)
        are never returned, whatever the rules say.
        """
        if not self.active or not valid_steps:
            return []
        steps = sorted(set(valid_steps))
        keep: set[int] = set(protected)
        keep.add(steps[-1])
        if self.keep_last is not None:
            keep.update(steps[-self.keep_last :])
        if self.keep_every is not None:
            keep.update(s for s in steps if s % self.keep_every == 0)
        if self.keep_best is not None and self.best_metric:
            metric, metrics = self.best_metric, metrics or {}  # a local: the lambda would lose the narrowing
            ranked = [s for s in steps if _finite(metrics.get(s, {}).get(metric))]
            ranked.sort(key=lambda s: metrics[s][metric], reverse=(self.best_mode == "max"))
            keep.update(ranked[: self.keep_best])
        return [s for s in steps if s not in keep]


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
