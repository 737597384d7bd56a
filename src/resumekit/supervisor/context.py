"""What every part of a supervised run shares: :class:`RunContext` (the options, where things are kept, the event
log, the progress output), :class:`RunPaths` (the checkpoint root, the event log, the heartbeat) and
:class:`StartPlan` (what one start hands the job: made by the planner, read by the monitor and the crash-loop
guard)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..events import EVENTS_FILE, HEARTBEAT_FILE, EventLog
from .options import SupervisorOptions

#: ModelArts restart counters, recorded in the supervisor's start events when present
MODELARTS_COUNTERS = ("MA_PROC_START_CNT", "MA_SCHEDULE_CNT")


def modelarts_counters() -> dict[str, str]:
    """ModelArts' own restart counters from the environment (lower-cased names), for the start events."""
    return {k.lower(): os.environ[k] for k in MODELARTS_COUNTERS if k in os.environ}


def dir_from_config(config: str | None) -> str | None:
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


_VERSION_DIR = re.compile(r"^version_\d+$")


def lightning_version_dir(path: str | None) -> str | None:
    """The logger directory when ``path`` is a Lightning logger run directory (``.../version_N`` or
    ``.../version_N/checkpoints``) that does not exist yet; None otherwise.

    Lightning's loggers pick ``version_N`` as one more than the highest existing one, so anything the supervisor
    created there before the first start (its event log, a writability probe) would push the job to
    ``version_N+1``; the supervisor's own files then go to the logger directory instead.

    Args:
        path: the local checkpoint root.

    Returns:
        The directory holding ``version_N`` (e.g. ``lightning_logs``), or None.
    """
    if not path or os.path.exists(path):
        return None
    parts = os.path.normpath(path).split(os.sep)
    if len(parts) >= 2 and parts[-1] == "checkpoints" and _VERSION_DIR.match(parts[-2]):
        return os.sep.join(parts[:-2]) or os.sep
    if _VERSION_DIR.match(parts[-1]):
        return os.sep.join(parts[:-1]) or os.sep
    return None


@dataclass(frozen=True)
class RunPaths:
    """The places a run reads and writes, fixed once when the supervisor is made.

    Attributes:
        directory: the checkpoint root: ``--dir``, else the ``output_dir`` of ``--config``; None without either.
        remote: ``directory`` is an object-store URI (``s3://``, ``obs://``), not a path.
        local_dir: ``directory`` as an absolute local path; None when remote or absent.
        events_path: the JSONL event log the supervisor and the job append to.
        state_dir: a directory local to the job's node: the heartbeat and hang stack dumps go here (the
            ``--local-tier``, else beside an explicit ``--events``, else a local checkpoint dir, else beside the
            event log).
        heartbeat_path: the file the job touches every step.
        watch_dir: the local directory whose file growth counts as the job's activity (a save in progress is
            never a hang): the checkpoint root, else the local tier; None for a remote root without one.
        lightning_logger_dir: set when ``directory`` is a Lightning ``version_N`` directory that does not exist
            yet (see :func:`lightning_version_dir`); the supervisor's files then live there.
    """

    directory: str | None
    remote: bool
    local_dir: str | None
    events_path: str
    state_dir: str
    heartbeat_path: str
    watch_dir: str | None = None
    lightning_logger_dir: str | None = None

    @classmethod
    def for_options(cls, options: SupervisorOptions) -> RunPaths:
        """Work out every place from the options; creates the local tier, or a temp dir for the event log of a
        remote root without one.

        Args:
            options: the run's options.

        Returns:
            The run's paths.
        """
        d = options.directory or dir_from_config(options.config)
        remote = d is not None and "://" in d and not d.startswith("file://")
        local_dir = (
            None
            if (not d or remote)
            else os.path.abspath(os.path.expanduser(d[len("file://") :] if d.startswith("file://") else d))
        )
        logger_dir = lightning_version_dir(local_dir)
        own_dir = logger_dir or local_dir  # never create a Lightning version_N before the job does
        if options.events:
            events_path = os.path.abspath(os.path.expanduser(options.events))
        elif own_dir:
            events_path = os.path.join(own_dir, EVENTS_FILE)
        elif options.local_tier:
            os.makedirs(options.local_tier, exist_ok=True)
            events_path = os.path.join(options.local_tier, EVENTS_FILE)
        else:
            events_path = os.path.join(tempfile.mkdtemp(prefix="resumekit-run-"), EVENTS_FILE)
        # The heartbeat must be local to the job's node. The checkpoint dir of a job on several nodes is shared:
        # every node's supervisor would read (and clear) one heartbeat, and a live node's beats would hide a hung
        # one. A --local-tier is node-local by definition, and an explicit --events is where the user keeps this
        # supervisor's own files; otherwise the checkpoint dir when it is local, else beside the log.
        state_dir = (
            options.local_tier
            or (os.path.dirname(events_path) if options.events else None)
            or own_dir
            or os.path.dirname(events_path)
        )
        return cls(
            directory=d,
            remote=remote,
            local_dir=local_dir,
            events_path=events_path,
            state_dir=state_dir,
            heartbeat_path=os.path.join(state_dir, HEARTBEAT_FILE),
            watch_dir=local_dir or options.local_tier,
            lightning_logger_dir=logger_dir,
        )


def directory_warnings(options: SupervisorOptions, paths: RunPaths) -> list[str]:
    """Lines saying where the run would watch a directory the job may not write to.

    Args:
        options: the run's options.
        paths: where the run keeps things.

    Returns:
        One line per finding (empty when there is none).
    """
    out = []
    if paths.lightning_logger_dir:
        out.append(
            f"--dir {paths.directory} is a Lightning logger version directory that does not exist yet; Lightning's "
            "default logger starts a new version_N on every start, so a restart's checkpoints would land beside it, "
            "not in it. Pass the Trainer's default_root_dir as --dir instead (resumekit looks in every "
            f"version_N/checkpoints/ under it), or fix the logger's version. Event log and heartbeat: "
            f"{paths.lightning_logger_dir}"
        )
    if options.config and options.directory and paths.local_dir:
        own = dir_from_config(options.config)
        if own and os.path.realpath(own) != os.path.realpath(paths.local_dir):
            out.append(
                f"--dir {paths.directory} is not the output_dir of --config {options.config} ({own}), where the job "
                "writes its checkpoints: checkpoints are looked for in --dir first, and file activity is watched "
                "there only"
            )
    return out


@dataclass
class StartPlan:
    """What one start hands the job.

    Attributes:
        resume_path: the checkpoint handed over ("" when none: ``RESUMEKIT_RESUME_FROM`` is then unset).
        resume_step: its step.
        newest_step: the newest valid step under the root at this start.
        precheck_s: seconds the pre-checks took.
        candidates: whether any valid checkpoint existed for the job to load (False: whatever the job reports,
            it can only have started from scratch).
        verified: the ``RESUMEKIT_VERIFIED`` token for the checkpoint handed over (None: the job hashes it while
            reading; see :mod:`resumekit.storage.verified`).
    """

    resume_path: str = ""
    resume_step: int | None = None
    newest_step: int | None = None
    precheck_s: float = 0.0
    candidates: bool = False
    verified: str | None = None


@dataclass(frozen=True)
class RunContext:
    """Handed to the planner, the monitor and the crash-loop guard by the supervisor.

    Attributes:
        options: the run's options.
        paths: where the run keeps things.
        log: the supervisor's event log (``"source": "supervisor"``).
        say: prints one progress line (``resumekit run: ...``) unless ``options.quiet``.
        job_stdout: where the job's stdout is passed on to (None: the supervisor's ``sys.stdout``).
        job_stderr: where the job's stderr is passed on to (None: the supervisor's ``sys.stderr``).
    """

    options: SupervisorOptions
    paths: RunPaths
    log: EventLog
    say: Callable[[str], None]
    job_stdout: Any | None = None
    job_stderr: Any | None = None


__all__ = [
    "MODELARTS_COUNTERS",
    "RunContext",
    "RunPaths",
    "StartPlan",
    "dir_from_config",
    "directory_warnings",
    "lightning_version_dir",
    "modelarts_counters",
]
