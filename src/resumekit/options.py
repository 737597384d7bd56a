"""The options of a :class:`~resumekit.manager.CheckpointManager` (a validated dataclass) and what its saves cost.

Kept apart from the manager so the facade stays about behaviour; ``resumekit.manager`` re-exports both.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .events import ENV_DUMP_SIGNAL, resolve_signal
from .policy import RetentionPolicy, SavePolicy
from .storage.lease import takeover_from_env


def _as_step(step: Any) -> int:
    """Steps are integers (numpy ints and 0-dim integer tensors are accepted); anything else is a clear error."""
    try:
        value = operator.index(step)
    except TypeError:
        raise ConfigError(f"step must be an integer, got {step!r} ({type(step).__name__})") from None
    if value < 0:
        raise ConfigError(f"step must be >= 0, got {value}")
    return value


@dataclass(kw_only=True)
class CheckpointOptions:
    """Everything a :class:`CheckpointManager` can be told. Unknown or invalid values fail at construction.

    Attributes:
        every_steps: save when ``step % every_steps == 0``.
        every_seconds: save when this many seconds passed since the last save (see README: Young's rule).
        keep_last: retention: keep the newest N checkpoints (None keeps all).
        keep_every: retention: also keep every step divisible by K.
        keep_best: retention: also keep the N best by ``best_metric``.
        best_metric: metric name (from ``metrics=``) ranking ``keep_best``.
        best_mode: ``"min"`` or ``"max"``.
        async_save: snapshot into host buffers and persist in the background (training blocks for the copy).
        resume: ``"auto"`` (newest valid, honouring ``RESUMEKIT_RESUME_FROM``), ``"never"``, or a path to a
            checkpoint (or to a run directory, whose newest valid checkpoint is used).
        init_from: a checkpoint of *another* run to start from when this run has none (fine-tuning).
        init_keys: entries to load from ``init_from`` (e.g. ``["model"]``); the step restarts at 0.
        save_rng: save and restore python, numpy, torch and CUDA RNG states.
        strict: every entry of the state passed to ``restore`` must be in the checkpoint.
        handle_sigterm: on SIGTERM, save at the next ``maybe_save`` call (preemption).
        exit_on_preemption: after that save, exit the process with status 0.
        heartbeat_interval: seconds between heartbeat touches (for ``resumekit run --hang-timeout``).
        metrics_every: log ``metrics`` passed to ``maybe_save`` every N steps to the event log (0: never).
        metrics_interval: and at most once per this many seconds (0: every time ``metrics_every`` says so), so the
            log costs nothing per step however fast the steps are.
        read_only: only restore (an evaluator beside a live run): no writer lease, nothing removed, ``save``
            refused.
        takeover: take the root's writer lease even though the process holding it looks alive (it is known dead,
            on another host); default: ``RESUMEKIT_TAKEOVER`` (``resumekit run --force``). A lease whose holder is
            gone from this host is taken over without it.
        dump_signal: the signal on which, under ``resumekit run``, every thread's stack is printed (``faulthandler``,
            chained to a handler already installed, e.g. SLURM's or Lightning's SIGUSR1). Default:
            ``RESUMEKIT_DUMP_SIGNAL`` or ``"SIGUSR1"``; ``"none"`` installs nothing.
        heartbeat_stall: while a save or a wait blocks, the heartbeat keeps beating as long as bytes move, and for
            at most this many seconds without (a save stuck in I/O or a collective then shows as hung).
        local_tier: a fast local directory that saves commit to (training waits only for it) while a background
            uploader copies each committed step to ``directory`` (e.g. ``s3://bucket/run``); ``restore`` takes the
            newest valid checkpoint of either tier, downloading a newer remote one first. Retention applies to
            both tiers. See :mod:`resumekit.storage.tiered`.
        distributed: save modules and optimizers as sharded torch.distributed.checkpoint files, every rank its own,
            with rank agreement on saves and signals (see :mod:`resumekit.checkpointers.dcp`). None (default): when
            ``torch.distributed`` is initialised. Every rank must create the manager and call its methods at the
            same steps.
    """

    every_steps: int | None = None
    every_seconds: float | None = None
    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    best_metric: str | None = None
    best_mode: str = "min"
    async_save: bool = False
    resume: str = "auto"
    init_from: str | None = None
    init_keys: Sequence[str] | None = None
    save_rng: bool = True
    strict: bool = True
    handle_sigterm: bool = True
    exit_on_preemption: bool = True
    heartbeat_interval: float = 1.0
    metrics_every: int = 1
    metrics_interval: float = 1.0
    read_only: bool = False
    takeover: bool | None = None
    dump_signal: str | None = None
    heartbeat_stall: float = 300.0
    local_tier: str | None = None
    distributed: bool | None = None
    save_policy: SavePolicy = field(init=False)
    retention: RetentionPolicy = field(init=False)
    dump_signum: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.save_policy = SavePolicy(every_steps=self.every_steps, every_seconds=self.every_seconds)
        self.retention = RetentionPolicy(
            keep_last=self.keep_last,
            keep_every=self.keep_every,
            keep_best=self.keep_best,
            best_metric=self.best_metric,
            best_mode=self.best_mode,
        )
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError(f"CheckpointOptions.resume must be 'auto', 'never' or a path, got {self.resume!r}")
        if self.init_keys is not None and isinstance(self.init_keys, str):
            raise ConfigError("CheckpointOptions.init_keys must be a list of entry names, not a string")
        if self.heartbeat_interval < 0:
            raise ConfigError("CheckpointOptions.heartbeat_interval must be >= 0")
        if self.metrics_every < 0:
            raise ConfigError("CheckpointOptions.metrics_every must be >= 0")
        if not (isinstance(self.metrics_interval, (int, float)) and self.metrics_interval >= 0):
            raise ConfigError("CheckpointOptions.metrics_interval must be a number of seconds >= 0")
        if not (isinstance(self.heartbeat_stall, (int, float)) and self.heartbeat_stall >= 0):
            raise ConfigError("CheckpointOptions.heartbeat_stall must be a number of seconds >= 0")
        if self.takeover is None:
            self.takeover = takeover_from_env()
        self.dump_signum = resolve_signal(self.dump_signal or os.environ.get(ENV_DUMP_SIGNAL) or "SIGUSR1")


@dataclass
class SaveCost:
    """What saving costs this run: blocking time (the training stall) and background persist time."""

    saves: int = 0
    blocking_s_total: float = 0.0
    persist_s_total: float = 0.0
    last_blocking_s: float = 0.0
    last_persist_s: float = 0.0
    bytes_last: int = 0

    @property
    def blocking_s_mean(self) -> float:
        return self.blocking_s_total / self.saves if self.saves else 0.0

    @property
    def persist_s_mean(self) -> float:
        return self.persist_s_total / self.saves if self.saves else 0.0


__all__ = ["CheckpointOptions", "SaveCost"]
