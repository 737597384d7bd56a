"""What every part of a supervised run shares: :class:`RunContext` (the options, where things are kept, the event
log, the progress output), :class:`RunPaths` (the checkpoint root, the event log, the heartbeat) and
:class:`StartPlan` (what one start hands the job: made by the planner, read by the monitor and the crash-loop
guard)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from ..events import EVENTS_FILE, HEARTBEAT_FILE, EventLog
from .options import SupervisorOptions

#: ModelArts restart counters, recorded in the supervisor's start events when present
MODELARTS_COUNTERS = ("MA_PROC_START_CNT", "MA_SCHEDULE_CNT")


def modelarts_counters() -> Dict[str, str]:
    """ModelArts' own restart counters from the environment (lower-cased names), for the start events."""
    return {k.lower(): os.environ[k] for k in MODELARTS_COUNTERS if k in os.environ}


def dir_from_config(config: Optional[str]) -> Optional[str]:
    """The ``output_dir`` of a ``--config`` YAML (expanded), so ``run --config x.yaml`` needs no ``--dir``.

    Any problem here is left for the ``--config`` pre-check to report in one line.

    Args:
        config: the YAML path, or None.

    Returns:
        The directory the YAML's own checkpoint search looks in; None when there is no config or it cannot be read.
    """
    if not config:
        return None
    try:
        from ..yamlconfig import resolve_config

        result = resolve_config(config, dry_run=True, full=False)
    except Exception:  # noqa: BLE001 - reported by the --config pre-check before the first start
        return None
    searched = getattr(result, "searched", None) or []
    return str(searched[0]) if searched else None


@dataclass(frozen=True)
class RunPaths:
    """The places a run reads and writes, fixed once when the supervisor is made.

    Attributes:
        directory: the checkpoint root: ``--dir``, else the ``output_dir`` of ``--config``; None without either.
        remote: ``directory`` is an object-store URI (``s3://``, ``obs://``), not a path.
        local_dir: ``directory`` as an absolute local path; None when remote or absent.
        events_path: the JSONL event log the supervisor and the job append to.
        state_dir: a directory local to the job's node: the heartbeat and hang stack dumps go here.
        heartbeat_path: the file the job touches every step.
    """

    directory: Optional[str]
    remote: bool
    local_dir: Optional[str]
    events_path: str
    state_dir: str
    heartbeat_path: str

    @classmethod
    def for_options(cls, options: SupervisorOptions) -> "RunPaths":
        """Work out every place from the options; creates the local tier, or a temp dir for the event log of a
        remote root without one.

        Args:
            options: the run's options.

        Returns:
            The run's paths.
        """
        d = options.directory or dir_from_config(options.config)
        remote = bool(d) and "://" in d and not d.startswith("file://")  # type: ignore[operator]
        local_dir = (
            None
            if (not d or remote)
            else os.path.abspath(os.path.expanduser(d[len("file://") :] if d.startswith("file://") else d))
        )
        if options.events:
            events_path = os.path.abspath(os.path.expanduser(options.events))
        elif local_dir:
            events_path = os.path.join(local_dir, EVENTS_FILE)
        elif options.local_tier:
            os.makedirs(options.local_tier, exist_ok=True)
            events_path = os.path.join(options.local_tier, EVENTS_FILE)
        else:
            events_path = os.path.join(tempfile.mkdtemp(prefix="resumekit-run-"), EVENTS_FILE)
        # The heartbeat must be local to the job's node: the checkpoint dir when it is local, else beside the log.
        state_dir = local_dir or options.local_tier or os.path.dirname(events_path)
        return cls(
            directory=d,
            remote=remote,
            local_dir=local_dir,
            events_path=events_path,
            state_dir=state_dir,
            heartbeat_path=os.path.join(state_dir, HEARTBEAT_FILE),
        )


@dataclass
class StartPlan:
    """What one start hands the job."""

    resume_path: str = ""
    resume_step: Optional[int] = None
    resume_name: Optional[str] = None  # relative to resume_root (or --dir) when discovered (quarantinable)
    resume_root: Optional[str] = None  # where resume_name lives when it is not under --dir (found via --config)
    newest_step: Optional[int] = None  # newest valid step under the root at this start
    precheck_s: float = 0.0


@dataclass(frozen=True)
class RunContext:
    """Handed to the planner, the monitor and the crash-loop guard by the supervisor.

    Attributes:
        options: the run's options.
        paths: where the run keeps things.
        log: the supervisor's event log (``"source": "supervisor"``).
        say: prints one progress line (``resumekit run: ...``) unless ``options.quiet``.
    """

    options: SupervisorOptions
    paths: RunPaths
    log: EventLog
    say: Callable[[str], None]


__all__ = ["MODELARTS_COUNTERS", "RunContext", "RunPaths", "StartPlan", "dir_from_config", "modelarts_counters"]
