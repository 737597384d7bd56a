"""How ``resumekit run`` supervises a command: :class:`SupervisorOptions`, every field checked on construction."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import ConfigError

#: a dotted Python module name (``--preload``)
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


@dataclass(kw_only=True)
class SupervisorOptions:
    """How ``resumekit run`` supervises a command. Every field is checked in ``__post_init__``."""

    command: Sequence[str]
    """The command to supervise, e.g. ``["python", "train.py", "--lr", "1e-3"]``."""

    directory: str | None = None
    """Checkpoint root (path or ``s3://bucket/prefix``); default: ``config``'s ``output_dir``. Without either there
    is no resume hand-off and no storage pre-check; the supervisor still restarts the job."""

    layout: str = "auto"
    """Checkpoint layout used to find the newest valid checkpoint (``auto`` detects before every start)."""

    config: str | None = None
    """A LLaMA-Factory / HF YAML whose ``resume_from_checkpoint`` is set before every start (through
    :func:`resumekit.yamlconfig.resolve_config`: comments and order kept, atomic write)."""

    resume: str = "auto"
    """``auto``: newest valid checkpoint under ``directory``; ``never``: always start fresh; or a checkpoint path
    used for the first start (restarts then resume from checkpoints this run wrote)."""

    max_restarts: int = 10
    """Restarts allowed (failed pre-checks that are retried count too)."""

    hang_timeout: float | None = None
    """Seconds without a heartbeat after which a job that has beaten at least once counts as hung (None: off)."""

    grace: float = 30.0
    """Seconds a preempted job gets to save and exit before its process group is SIGKILLed."""

    gpus: int = 0
    """Accelerators that must be visible and run a tiny kernel before each start (0: no hardware check)."""

    crash_loop: int = 3
    """Failures in a row without progress after which the checkpoint resumed from is quarantined."""

    backoff: float = 1.0
    """Delay before the first restart in seconds; doubles with every restart."""

    backoff_max: float = 60.0
    """The largest backoff delay in seconds."""

    reset_after: float = 600.0
    """An attempt that made progress and ran at least this many seconds resets the backoff to ``backoff`` and gives
    back the restart budget: ``max_restarts`` then counts restarts since the last such window of progress, so a long
    job that fails now and then, but gets somewhere every time, is not given up on (0: reset after any progress)."""

    preempt_exit_code: int | None = None
    """Exit status of ``resumekit run`` after it forwarded SIGTERM/SIGINT and the job saved and stopped: None (the
    default) for ``128 + signal`` (130 after SIGINT, 143 after SIGTERM), so ``resumekit run ... && next`` stops
    there; 0 to report such a stop as success."""

    force: bool = False
    """Let the first start take the checkpoint root's writer lease from a holder that looks alive (it is known to
    be dead, on another host): exported to the job as ``RESUMEKIT_TAKEOVER=1``."""

    jitter: float = 0.5
    """Fraction of each backoff delay that may be removed at random (0: none)."""

    progress_jitter: float = 0.25
    """After an attempt that made progress the restart is immediate but for a random delay of up to this many
    seconds (and at most ``backoff``), so many nodes that failed together do not restart in the same instant; the
    exponential ``backoff`` applies only to failures without progress."""

    warm: bool = True
    """Warm restart: while a ``python script.py`` / ``python -m module`` job (or a Python console script such as
    ``torchrun``) runs, keep a standby interpreter that has already imported torch, numpy, resumekit and
    ``preload``; a restart runs the command in it at once instead of starting a fresh interpreter. Other commands
    start cold. See :mod:`resumekit.supervisor.standby`."""

    preload: Sequence[str] = ()
    """More modules the standby imports ahead (e.g. ``transformers``); one that is not installed is skipped."""

    warm_delay: float = 10.0
    """Seconds after an attempt started by which its standby is started even when the job has not reported any
    progress yet (a job that reports starts it at its first heartbeat, after its start-up and restore)."""

    min_free: int | None = None
    """Free bytes required at a local checkpoint root (the floor; 2x the last checkpoint's size also applies)."""

    local_tier: str | None = None
    """A fast local directory in front of ``directory`` (the job uses ``CheckpointManager(directory,
    local_tier=...)``). Before every start the newest valid checkpoint of either tier is chosen; a newer remote one
    is first downloaded into it (verified, tmp dir + rename), so the job resumes from local disk. Exported as
    ``RESUMEKIT_LOCAL_TIER``; the event log and heartbeat default to it for remote roots."""

    events: str | None = None
    """Event log path; default ``<directory>/events.jsonl`` for local roots, a local temp dir otherwise."""

    hardware_timeout: float = 180.0
    """Seconds the ``gpus`` check may take (a stuck driver fails it)."""

    remote_timeout: float = 60.0
    """Seconds the reachability check of a remote root may take."""

    poll_interval: float = 0.1
    """How often the job, its heartbeat and signals are looked at, seconds."""

    env: Mapping[str, str] | None = None
    """Extra environment for the job (on top of the supervisor's own)."""

    seed: int | None = None
    """Seed of the backoff jitter (None: random)."""

    subreaper: bool = True
    """Make the supervisor a child subreaper (Linux) so grandchildren that detach are still found and killed."""

    quiet: bool = False
    """No progress lines on stderr (the summary is still returned)."""

    def __post_init__(self) -> None:
        if isinstance(self.command, str) or not self.command or not all(isinstance(c, str) for c in self.command):
            raise ConfigError(
                "SupervisorOptions.command must be a non-empty list of strings (resumekit run [options] -- CMD ARGS...)"
            )
        self.command = list(self.command)
        if self.directory is not None:
            if not str(self.directory).strip():
                raise ConfigError("SupervisorOptions.directory must not be empty; leave it unset for no checkpoints")
            self.directory = str(self.directory)
        if not isinstance(self.resume, str) or not self.resume:
            raise ConfigError("SupervisorOptions.resume must be 'auto', 'never' or a checkpoint path")
        for name in ("max_restarts", "gpus", "crash_loop"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "crash_loop" else 0):
                low = 1 if name == "crash_loop" else 0
                raise ConfigError(f"SupervisorOptions.{name} must be an integer >= {low}, got {v!r}")
        for name in ("grace", "backoff", "backoff_max", "hardware_timeout", "remote_timeout", "reset_after"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"SupervisorOptions.{name} must be a number of seconds >= 0, got {v!r}")
        if self.preempt_exit_code is not None and not (
            isinstance(self.preempt_exit_code, int)
            and not isinstance(self.preempt_exit_code, bool)
            and 0 <= self.preempt_exit_code <= 255
        ):
            raise ConfigError(
                "SupervisorOptions.preempt_exit_code must be an exit status 0-255 or None, "
                f"got {self.preempt_exit_code!r}"
            )
        if self.backoff_max < self.backoff:
            raise ConfigError(f"SupervisorOptions.backoff_max ({self.backoff_max}) must be >= backoff ({self.backoff})")
        if self.hang_timeout is not None and not (
            isinstance(self.hang_timeout, (int, float)) and math.isfinite(self.hang_timeout) and self.hang_timeout > 0
        ):
            raise ConfigError(
                f"SupervisorOptions.hang_timeout must be a positive number of seconds or None, "
                f"got {self.hang_timeout!r}"
            )
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter <= 1.0):
            raise ConfigError(f"SupervisorOptions.jitter must be a fraction in [0, 1], got {self.jitter!r}")
        if not (
            isinstance(self.progress_jitter, (int, float))
            and not isinstance(self.progress_jitter, bool)
            and math.isfinite(self.progress_jitter)
            and 0 <= self.progress_jitter <= 60
        ):
            raise ConfigError(
                "SupervisorOptions.progress_jitter must be a number of seconds in [0, 60], "
                f"got {self.progress_jitter!r}"
            )
        if not isinstance(self.warm, bool):
            raise ConfigError(f"SupervisorOptions.warm must be True or False, got {self.warm!r}")
        if isinstance(self.preload, str) or not all(isinstance(m, str) and _MODULE.match(m) for m in self.preload):
            raise ConfigError(
                "SupervisorOptions.preload must be a list of module names such as 'transformers' or 'my_pkg.models', "
                f"got {self.preload!r}"
            )
        self.preload = list(dict.fromkeys(self.preload))
        if not (
            isinstance(self.warm_delay, (int, float))
            and not isinstance(self.warm_delay, bool)
            and math.isfinite(self.warm_delay)
            and self.warm_delay >= 0
        ):
            raise ConfigError(f"SupervisorOptions.warm_delay must be a number of seconds >= 0, got {self.warm_delay!r}")
        if not (isinstance(self.poll_interval, (int, float)) and 0 < self.poll_interval <= 10):
            raise ConfigError(f"SupervisorOptions.poll_interval must be in (0, 10] seconds, got {self.poll_interval!r}")
        if self.min_free is not None and (not isinstance(self.min_free, int) or self.min_free < 0):
            raise ConfigError(f"SupervisorOptions.min_free must be a number of bytes >= 0, got {self.min_free!r}")
        if self.local_tier is not None:
            if not str(self.local_tier).strip() or self.directory is None:
                raise ConfigError(
                    "SupervisorOptions.local_tier needs a directory (the remote root it sits in front "
                    "of) and must not be empty"
                )
            self.local_tier = os.path.abspath(os.path.expanduser(str(self.local_tier)))
        if self.layout != "auto":
            from ..layouts import get_layout

            get_layout(self.layout)  # raises ConfigError naming the valid choices


__all__ = ["SupervisorOptions"]
