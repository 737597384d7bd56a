"""The restart loop behind ``resumekit run``: it brings a training job back by itself. Imports no torch.

The supervisor runs any command (a script using resumekit, ``llamafactory-cli train``, ``torchrun ...``) and talks
to it only through the environment, the heartbeat file and the event log, so it works for every framework:

* **Before every start** it runs pre-checks (checkpoint directory writable, enough free space, newest checkpoint
  verifies, remote storage reachable, ``--gpus`` accelerators answer), repairs the layout's tracker or rewrites
  ``--config``, and exports where to resume from::

      RESUMEKIT_RESUME_FROM   path of the newest valid checkpoint, "" when there is none (or --resume never)
      RESUMEKIT_RESTART_COUNT 0 on the first start, then 1, 2, ...
      RESUMEKIT_DIR           the checkpoint root (path or URI)
      RESUMEKIT_HEARTBEAT     the file the job touches every step (events.Heartbeat)
      RESUMEKIT_EVENTS        the JSONL event log the job appends to (events.EventLog)

* **While it runs** the job lives in its own session and process group. A job whose heartbeat is older than
  ``hang_timeout`` is stack-dumped (py-spy, else SIGUSR1 for ``faulthandler``) and killed with every descendant.
  SIGTERM/SIGINT to the supervisor are forwarded to the job's process group as SIGTERM (the signal training
  libraries treat as preemption); the job saves at the next step and exits 0; after ``grace`` seconds the group is
  SIGKILLed (a second SIGINT kills at once). A preempted job is not restarted.
* **After a failure** (non-zero exit or death by a signal) it restarts after an exponential backoff with jitter,
  up to ``max_restarts``. A job that fails ``crash_loop`` times in a row without progress (no new valid
  checkpoint, no step beyond the one it resumed from) has its checkpoint quarantined (renamed, never deleted) and
  resumes from the previous one.

Every start, exit, restart, hang, preemption and quarantine is a line in the event log; the run ends with a summary
(restarts, failures, hangs, lost steps, time in saves and restarts, effective training time ratio).

What the supervisor reads from the job (all optional; a job that provides none is still restarted, just never
judged hung and summarised with less detail):

* the heartbeat file, JSON ``{"time": ..., "step": <completed steps>, "pid": <the beating process>}`` replaced
  atomically (``events.Heartbeat``); its mtime is the liveness signal, ``step`` the progress, ``pid`` the process
  whose stacks are dumped on a hang;
* job events in the log: ``restore`` (``step`` resumed from, 0 when fresh), ``save`` (``step``, ``blocking_s``),
  ``metrics`` (``step``, ``loss``, ``step_time``; see :mod:`resumekit.report`).

Supervisor events (``"source": "supervisor"``): ``supervisor_start``, ``precheck_failed``, ``hardware_check``,
``skip_invalid``, ``repair``, ``config_resolved``, ``start``, ``start_failed``, ``preempt``, ``hang``, ``kill``,
``cleanup``, ``exit``, ``restart``, ``quarantine``, ``give_up``, ``summary``.

The decisions (backoff schedule, what is a failure, the crash-loop rule, summary arithmetic) are pure functions at
the top of this module; the process handling is in :class:`Supervisor`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

from .errors import ConfigError
from .events import (
    ENV_DIR,
    ENV_EVENTS,
    ENV_HEARTBEAT,
    ENV_LOCAL_TIER,
    ENV_RESTART_COUNT,
    ENV_RESUME_FROM,
    ENV_RESUME_MODE,
    EVENTS_FILE,
    HEARTBEAT_FILE,
    EventLog,
    heartbeat_age,
)
from .format import QUARANTINE_PREFIX

#: exit code of ``resumekit run`` when a pre-check fails (or the supervisor gives up before any job ran)
EXIT_PRECHECK = 1
#: shell conventions for a command that cannot be started
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127

#: ModelArts restart counters, recorded in start events when present
MODELARTS_COUNTERS = ("MA_PROC_START_CNT", "MA_SCHEDULE_CNT")

_PR_SET_CHILD_SUBREAPER = 36

# ----------------------------------------------------------------------------------------------------------------
# Pure decision logic (no I/O, no clock reads): unit-tested without processes.
# ----------------------------------------------------------------------------------------------------------------


def backoff_delay(restart: int, base: float, cap: float, jitter: float, rand: float) -> float:
    """Seconds to wait before restart number ``restart`` (1 for the first restart).

    The delay doubles with every restart (``base``, ``2*base``, ``4*base``, ...) up to ``cap``, then a random
    fraction up to ``jitter`` of it is taken off, so many jobs that failed together (a node, a switch) do not all
    hammer the scheduler or the storage in the same second.

    Args:
        restart: 1-based restart number.
        base: delay of the first restart, seconds.
        cap: the largest delay, seconds.
        jitter: fraction in [0, 1] of the delay that may be removed at random.
        rand: a uniform random number in [0, 1).

    Returns:
        A delay in ``[(1 - jitter) * d, d]`` where ``d = min(cap, base * 2 ** (restart - 1))``.
    """
    if restart < 1:
        return 0.0
    exp = min(restart - 1, 63)  # 2**63 * base overflows nothing but is far past any cap
    d = min(cap, base * float(2 ** exp))
    return d * (1.0 - jitter * min(max(rand, 0.0), 1.0))


def exit_code_of(returncode: int) -> int:
    """The shell's exit code for a ``Popen.returncode``: ``128 + N`` for death by signal ``N``."""
    return 128 - returncode if returncode < 0 else returncode


def is_failure(returncode: int, preempt_signal: Optional[int] = None) -> bool:
    """Whether a job exit counts as a failure.

    Exit 0 never does. After a forwarded preemption signal, a job that died of that very signal (a script without
    a handler) ended as asked, so it is not a failure either; anything else non-zero is (a preempted job that did
    not save within the grace period and was SIGKILLed did fail).
    """
    if returncode == 0:
        return False
    if preempt_signal is not None and returncode in (-preempt_signal, 128 + preempt_signal):
        return False
    return True


def made_progress(before_step: Optional[int], after_step: Optional[int],
                  resumed_step: Optional[int], last_step: Optional[int]) -> bool:
    """Whether a failed attempt got anywhere, which clears the checkpoint it resumed from of suspicion.

    Progress is a valid checkpoint newer than the newest one at the start of the attempt, or a reported step
    (heartbeat or events) beyond the step it resumed from: a checkpoint that loaded and trained is not the cause
    of the crash, so it must not be quarantined.
    """
    if after_step is not None and (before_step is None or after_step > before_step):
        return True
    if last_step is not None and last_step > (resumed_step if resumed_step is not None else -1):
        return True
    return False


def next_streak(streak: int, failed: bool, progressed: bool) -> int:
    """Consecutive failures without progress, after one more attempt."""
    if not failed or progressed:
        return 0
    return streak + 1


def is_crash_loop(streak: int, limit: int) -> bool:
    """The crash-loop rule: ``limit`` failures in a row without progress."""
    return streak >= limit


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"500M"``, ``"10GiB"``, ``"2.5G"``, ``"1TB"``.

    ``K``/``M``/``G``/``T`` with or without ``iB`` are powers of 1024; ``KB``/``MB``/``GB``/``TB`` powers of 1000.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTkmgt]?)(i?[Bb]?)\s*", str(text))
    if not m or (m.group(3).lower() == "i"):
        raise ConfigError(f"cannot read size {text!r}: use bytes or a unit, e.g. 500M, 10GiB, 1TB")
    num, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    radix = 1000 if (suffix.upper() == "B" and unit) else 1024
    return int(num * radix ** power)


def human_bytes(n: Optional[float]) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


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
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def format_text(self) -> str:
        """A few human lines for stderr."""
        return "\n".join([
            f"resumekit run: {self.outcome}, exit code {self.exit_code}: {self.reason}",
            f"  starts {self.starts} (restarts {self.restarts}), failures {self.failures} "
            f"({self.killed_by_signal} killed by a signal), hangs {self.hangs}, preemptions {self.preemptions}, "
            f"quarantined {self.quarantined}, pre-check retries {self.precheck_retries}",
            f"  lost steps {self.lost_steps} (~{self.redone_s:.1f} s redone), "
            f"time in saves {self.save_blocking_s:.2f} s, in restarts {self.restart_s:.1f} s (backoff {self.backoff_s:.1f} s, startup {self.startup_s:.1f} s, "
            f"pre-checks {self.precheck_s:.1f} s)",
            f"  effective training time {100 * self.effective_ratio:.1f}% of {self.wall_s:.1f} s",
        ])


def lost_steps_of(attempts: Sequence[AttemptRecord]) -> List[int]:
    """Steps redone at each restart: last step reached by the attempt before minus the step resumed from.

    An attempt that reported no step lost nothing we can count; a restart from scratch resumes from step 0.
    """
    out = []
    for prev, cur in zip(attempts, attempts[1:]):
        if prev.last_step is None:
            out.append(0)
            continue
        out.append(max(0, prev.last_step - (cur.resume_step or 0)))
    return out


def summarize(attempts: Sequence[AttemptRecord], *, exit_code: int, outcome: str, reason: str = "",
              wall_s: float, save_blocking_s: float = 0.0, quarantined: int = 0, precheck_retries: int = 0,
              extra_backoff_s: float = 0.0) -> RunSummary:
    """The run's account from its attempts (pure arithmetic; see :class:`RunSummary` for each field).

    ``extra_backoff_s`` is backoff slept after failed pre-checks, which belongs to no attempt.
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
        exit_code=exit_code, outcome=outcome, reason=reason, starts=len(attempts), restarts=len(restarts),
        failures=sum(a.failure for a in attempts),
        killed_by_signal=sum(1 for a in attempts if a.failure and a.returncode < 0),
        hangs=sum(a.hung for a in attempts), preemptions=sum(a.preempted for a in attempts),
        quarantined=quarantined, precheck_retries=precheck_retries, lost_steps=sum(lost),
        save_blocking_s=save_blocking_s, backoff_s=backoff, startup_s=startup, precheck_s=precheck,
        restart_s=restart_s, redone_s=redone_s, wall_s=wall_s, effective_ratio=ratio,
    )


# ----------------------------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SupervisorOptions:
    """How ``resumekit run`` supervises a command. Every field is checked in ``__post_init__``."""

    command: Sequence[str]
    """The command to supervise, e.g. ``["python", "train.py", "--lr", "1e-3"]``."""

    directory: Optional[str] = None
    """Checkpoint root (path or ``s3://bucket/prefix``); default: ``config``'s ``output_dir``. Without either there
    is no resume hand-off and no storage pre-check; the supervisor still restarts the job."""

    layout: str = "auto"
    """Checkpoint layout used to find the newest valid checkpoint (``auto`` detects before every start)."""

    config: Optional[str] = None
    """A LLaMA-Factory / HF YAML whose ``resume_from_checkpoint`` is set before every start (through
    :func:`resumekit.yamlconfig.resolve_config`: comments and order kept, atomic write)."""

    resume: str = "auto"
    """``auto``: newest valid checkpoint under ``directory``; ``never``: always start fresh; or a checkpoint path
    used for the first start (restarts then resume from checkpoints this run wrote)."""

    max_restarts: int = 10
    """Restarts allowed (failed pre-checks that are retried count too)."""

    hang_timeout: Optional[float] = None
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

    jitter: float = 0.5
    """Fraction of each backoff delay that may be removed at random (0: none)."""

    min_free: Optional[int] = None
    """Free bytes required at a local checkpoint root (the floor; 2x the last checkpoint's size also applies)."""

    local_tier: Optional[str] = None
    """A fast local directory in front of ``directory`` (the job uses ``CheckpointManager(directory,
    local_tier=...)``). Before every start the newest valid checkpoint of either tier is chosen; a newer remote one
    is first downloaded into it (verified, tmp dir + rename), so the job resumes from local disk. Exported as
    ``RESUMEKIT_LOCAL_TIER``; the event log and heartbeat default to it for remote roots."""

    events: Optional[str] = None
    """Event log path; default ``<directory>/events.jsonl`` for local roots, a local temp dir otherwise."""

    hardware_timeout: float = 180.0
    """Seconds the ``gpus`` check may take (a stuck driver fails it)."""

    remote_timeout: float = 60.0
    """Seconds the reachability check of a remote root may take."""

    poll_interval: float = 0.1
    """How often the job, its heartbeat and signals are looked at, seconds."""

    env: Optional[Mapping[str, str]] = None
    """Extra environment for the job (on top of the supervisor's own)."""

    seed: Optional[int] = None
    """Seed of the backoff jitter (None: random)."""

    subreaper: bool = True
    """Make the supervisor a child subreaper (Linux) so grandchildren that detach are still found and killed."""

    quiet: bool = False
    """No progress lines on stderr (the summary is still returned)."""

    def __post_init__(self) -> None:
        if isinstance(self.command, str) or not self.command or not all(isinstance(c, str) for c in self.command):
            raise ConfigError("SupervisorOptions.command must be a non-empty list of strings "
                              "(resumekit run [options] -- CMD ARGS...)")
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
        for name in ("grace", "backoff", "backoff_max", "hardware_timeout", "remote_timeout"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"SupervisorOptions.{name} must be a number of seconds >= 0, got {v!r}")
        if self.backoff_max < self.backoff:
            raise ConfigError(f"SupervisorOptions.backoff_max ({self.backoff_max}) must be >= backoff "
                              f"({self.backoff})")
        if self.hang_timeout is not None and not (isinstance(self.hang_timeout, (int, float))
                                                  and math.isfinite(self.hang_timeout) and self.hang_timeout > 0):
            raise ConfigError(f"SupervisorOptions.hang_timeout must be a positive number of seconds or None, "
                              f"got {self.hang_timeout!r}")
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter <= 1.0):
            raise ConfigError(f"SupervisorOptions.jitter must be a fraction in [0, 1], got {self.jitter!r}")
        if not (isinstance(self.poll_interval, (int, float)) and 0 < self.poll_interval <= 10):
            raise ConfigError(f"SupervisorOptions.poll_interval must be in (0, 10] seconds, got {self.poll_interval!r}")
        if self.min_free is not None and (not isinstance(self.min_free, int) or self.min_free < 0):
            raise ConfigError(f"SupervisorOptions.min_free must be a number of bytes >= 0, got {self.min_free!r}")
        if self.local_tier is not None:
            if not str(self.local_tier).strip() or self.directory is None:
                raise ConfigError("SupervisorOptions.local_tier needs a directory (the remote root it sits in front "
                                  "of) and must not be empty")
            self.local_tier = os.path.abspath(os.path.expanduser(str(self.local_tier)))
        if self.layout != "auto":
            from .layouts import get_layout

            get_layout(self.layout)  # raises ConfigError naming the valid choices


# ----------------------------------------------------------------------------------------------------------------
# Process helpers (Linux first; everything degrades to a no-op elsewhere)
# ----------------------------------------------------------------------------------------------------------------


def _proc_children_map() -> Dict[int, List[int]]:
    """ppid -> [pid] from /proc, the fallback when psutil is not installed."""
    children: Dict[int, List[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return children
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may itself contain spaces or ')'.
        rest = data.rsplit(b")", 1)[-1].split()
        if len(rest) >= 2:
            children.setdefault(int(rest[1]), []).append(int(name))
    return children


def descendants(pid: int) -> List[int]:
    """Every live descendant of ``pid`` (children first), via psutil when importable, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None  # type: ignore[assignment]
    if psutil is not None:
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return []
    tree = _proc_children_map()
    out: List[int] = []
    todo = list(tree.get(pid, []))
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _signal(pid: int, sig: int, group: bool = False) -> bool:
    try:
        (os.killpg if group else os.kill)(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _set_subreaper(on: bool) -> bool:
    """Become (or stop being) a child subreaper: orphans of the job are re-parented to us, not to init."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap(pids: Sequence[int]) -> None:
    """Collect exited children among ``pids`` so they do not linger as zombies."""
    for p in pids:
        try:
            os.waitpid(p, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def quarantine(storage: Any, info: Any, now: Optional[float] = None) -> str:
    """Move a checkpoint aside so no discovery finds it again; it is renamed, never deleted.

    ``step_000000100`` becomes ``quarantined-step_000000100-20250101T120000``. The time goes last so suffix-based
    discovery (``*.ckpt``, ``ckpt_N.pth``) no longer matches, and the prefix so ``^step_\\d+$``-style patterns
    do not either. Works for directories and single-file checkpoints, through ``storage.rename``.

    Returns:
        The new name relative to the storage root.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now if now is not None else time.time()))
    head, _, base = info.name.rstrip("/").rpartition("/")
    new_base = f"{QUARANTINE_PREFIX}{base}-{stamp}"
    new = f"{head}/{new_base}" if head else new_base
    n = 1
    while storage.exists(new):  # a second quarantine of the same name within one second
        n += 1
        new = f"{head}/{new_base}-{n}" if head else f"{new_base}-{n}"
    storage.rename(info.name, new)
    return new


# ----------------------------------------------------------------------------------------------------------------
# Pre-checks
# ----------------------------------------------------------------------------------------------------------------


class PrecheckError(Exception):
    """A pre-check failed. ``retry`` says whether starting again later may help (hardware, network)."""

    def __init__(self, check: str, message: str, retry: bool = False):
        self.check = check
        self.message = message
        self.retry = retry
        super().__init__(message)


def check_directory(path: str) -> None:
    """The checkpoint directory exists or can be created, and a file can be written and removed in it."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise PrecheckError("directory", f"cannot create checkpoint directory {path}: {e.strerror or e}; "
                                         "choose a writable --dir or fix its permissions") from None
    if not os.path.isdir(path):
        raise PrecheckError("directory", f"checkpoint directory {path} is not a directory; choose another --dir")
    probe = os.path.join(path, f".resumekit-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        try:
            os.unlink(probe)
        except OSError:
            pass
        raise PrecheckError("directory", f"checkpoint directory {path} is not writable ({e.strerror or e}); "
                                         "choose a writable --dir or fix its permissions") from None


def check_free_space(where: str, free: Optional[int], last_size: int, min_free: Optional[int]) -> None:
    """At least twice the last checkpoint's size (a save writes a new one beside it) and ``min_free`` are free."""
    if free is None:
        return
    need = max(2 * last_size, min_free or 0)
    if free < need:
        why = (f"2x the last checkpoint, {human_bytes(last_size)}" if 2 * last_size >= (min_free or 0)
               else "--min-free")
        have_h, need_h = human_bytes(free), human_bytes(need)
        if have_h == need_h:  # rounding would print "2.0 KiB free, need 2.0 KiB"
            have_h, need_h = f"{free} B", f"{need} B"
        raise PrecheckError("free-space", f"not enough free space at {where}: {have_h} free, need {need_h} "
                                          f"({why}); free some space (resumekit gc) or lower --min-free")


def check_remote(uri: str, timeout: float) -> None:
    """The remote root answers a listing within ``timeout`` seconds (through the storage backend)."""
    result: Dict[str, BaseException] = {}

    def probe() -> None:
        try:
            from .storage import open_storage

            open_storage(uri, create=False).listdir("")
        except BaseException as e:  # noqa: BLE001 - reported to the main thread as a one-line message
            result["error"] = e

    t = threading.Thread(target=probe, name="resumekit-remote-check", daemon=True)
    t.start()
    t.join(timeout)
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the default endpoint"
    if t.is_alive():
        raise PrecheckError("remote", f"cannot reach {uri}: no answer from {endpoint} within {timeout:.0f} s; "
                                      "check AWS_ENDPOINT_URL and the network", retry=True)
    err = result.get("error")
    if err is None:
        return
    if isinstance(err, ImportError):
        raise PrecheckError("remote", f"cannot reach {uri}: the remote storage backend is not available "
                                      f"({_one_line(err)}); install it with pip install 'resumekit[s3]'")
    from .errors import StorageError

    # StorageError: a missing bucket or wrong credentials, which no restart fixes; network trouble may pass.
    retry = not isinstance(err, (StorageError, PermissionError, ValueError, TypeError, KeyError))
    raise PrecheckError("remote", f"cannot reach {uri} at {endpoint}: {_one_line(err)}; check AWS_ENDPOINT_URL, "
                                  "the bucket name and the credentials", retry=retry)


#: Run by ``python -c`` so the supervisor never imports torch: count accelerators and run a tiny kernel on each.
HARDWARE_CHECK = r"""
import json, sys
need = int(sys.argv[1])
import torch
kind, count = "cuda", 0
if torch.cuda.is_available():
    count = torch.cuda.device_count()
else:
    try:
        import torch_npu  # noqa: F401  (Ascend NPUs, e.g. on ModelArts)
        if torch.npu.is_available():
            kind, count = "npu", torch.npu.device_count()
    except Exception:
        pass
out = {"kind": kind, "count": count, "need": need, "bad": []}
if count >= need:
    for i in range(need):
        try:
            x = torch.arange(1024, dtype=torch.float32, device=torch.device(kind, i))
            if float((x * 2).sum().item()) != 1047552.0:  # .item() waits for the kernel
                out["bad"].append([i, "wrong result"])
        except Exception as e:
            out["bad"].append([i, repr(e)[:200]])
print("RESUMEKIT-HW " + json.dumps(out))
sys.exit(0 if count >= need and not out["bad"] else 3)
"""


def check_hardware(gpus: int, timeout: float, python: Optional[str] = None) -> Dict[str, Any]:
    """``gpus`` accelerators are visible and each runs a small kernel; checked in a child Python with torch."""
    python = python or sys.executable
    try:
        proc = subprocess.run([python, "-c", HARDWARE_CHECK, str(gpus)], capture_output=True, text=True,
                              timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired:
        raise PrecheckError("hardware", f"hardware check did not finish within {timeout:.0f} s "
                                        f"(a stuck driver or device?) for --gpus {gpus}", retry=True) from None
    except OSError as e:
        raise PrecheckError("hardware", f"cannot run the hardware check with {python}: {e}") from None
    report: Optional[Dict[str, Any]] = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESUMEKIT-HW "):
            report = json.loads(line[len("RESUMEKIT-HW "):])
    if report is None:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'torch'" in proc.stderr:
            raise PrecheckError("hardware", f"the --gpus check needs torch importable by {python}; install torch "
                                            "there or drop --gpus")
        raise PrecheckError("hardware", f"hardware check failed for --gpus {gpus}: {tail}", retry=True)
    if report["count"] < gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", os.environ.get("ASCEND_RT_VISIBLE_DEVICES"))
        raise PrecheckError("hardware", f"hardware check failed: --gpus {gpus} requested, {report['count']} "
                                        f"{report['kind']} device(s) visible (visible devices: {visible!r})",
                            retry=True)
    if report["bad"]:
        i, why = report["bad"][0]
        raise PrecheckError("hardware", f"hardware check failed: {report['kind']}:{i} cannot run a kernel ({why})",
                            retry=True)
    return report


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 300 else text[:297] + "..."


# ----------------------------------------------------------------------------------------------------------------
# The supervisor
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """What one start hands the job."""

    resume_path: str = ""
    resume_step: Optional[int] = None
    resume_name: Optional[str] = None  # relative to resume_root (or --dir) when discovered (quarantinable)
    resume_root: Optional[str] = None  # where resume_name lives when it is not under --dir (found via --config)
    newest_step: Optional[int] = None  # newest valid step under the root at this start
    precheck_s: float = 0.0


@dataclass
class _Running:
    """Book-keeping of the attempt in progress."""

    proc: subprocess.Popen
    index: int
    start: float
    events_offset: int
    plan: _Plan
    first_sign: Optional[float] = None
    preempt_signal: Optional[int] = None
    preempt_received: Optional[int] = None
    preempt_time: Optional[float] = None
    preempt_logged: bool = False
    kill_now: bool = False
    killed: Optional[str] = None
    hung: bool = False
    last_beat_step: Optional[int] = None
    baseline_children: set = field(default_factory=set)


class Supervisor:
    """Runs a command until it succeeds, is preempted, or the restart budget runs out.

    Example::

        opts = SupervisorOptions(command=["python", "train.py"], directory="/ckpt", hang_timeout=600)
        code = Supervisor(opts).run()

    ``run()`` installs SIGTERM/SIGINT handlers when called from the main thread (and restores the old ones).
    """

    def __init__(self, options: SupervisorOptions, *, stderr: Optional[TextIO] = None):
        self.opts = options
        self._err = stderr
        self._rng = random.Random(options.seed)
        self.summary: Optional[RunSummary] = None
        self.attempts: List[AttemptRecord] = []
        self._running: Optional[_Running] = None
        self._stop_signal: Optional[int] = None
        self._signals_seen = 0
        self._quarantined = 0
        self._precheck_retries = 0
        self._extra_backoff = 0.0
        self._streak = 0
        self._streak_attempt = 0
        self._budget_used = 0
        self._last_exit: Optional[int] = None
        self._initial_names: Optional[set] = None
        self._skips_logged: set = set()
        self._pending_backoff = 0.0
        self._last_plan = _Plan()
        self._start_error = ""
        self._events_offset0 = 0
        self._tmpdir: Optional[str] = None
        #: the checkpoint root: --dir, else the output_dir of --config
        self.directory: Optional[str] = options.directory or self._dir_from_config()
        self._setup_paths()

    def _dir_from_config(self) -> Optional[str]:
        """The ``output_dir`` of ``--config`` (expanded), so ``run --config x.yaml`` needs no ``--dir``.

        Any problem here is left for the ``--config`` pre-check to report in one line.
        """
        if not self.opts.config:
            return None
        try:
            from .yamlconfig import resolve_config

            result = _call_accepting(resolve_config, self.opts.config, dry_run=True, full=False)
        except Exception:  # noqa: BLE001 - reported by _resolve_config before the first start
            return None
        searched = getattr(result, "searched", None) or []
        return str(searched[0]) if searched else None

    # -- paths ---------------------------------------------------------------------------------------------------

    def _setup_paths(self) -> None:
        d = self.directory
        self.remote = bool(d) and "://" in d and not d.startswith("file://")
        self.local_dir = None if (not d or self.remote) else os.path.abspath(
            os.path.expanduser(d[len("file://"):] if d.startswith("file://") else d))
        if self.opts.events:
            self.events_path = os.path.abspath(os.path.expanduser(self.opts.events))
        elif self.local_dir:
            self.events_path = os.path.join(self.local_dir, EVENTS_FILE)
        elif self.opts.local_tier:
            os.makedirs(self.opts.local_tier, exist_ok=True)
            self.events_path = os.path.join(self.opts.local_tier, EVENTS_FILE)
        else:
            self._tmpdir = tempfile.mkdtemp(prefix="resumekit-run-")
            self.events_path = os.path.join(self._tmpdir, EVENTS_FILE)
        # The heartbeat must be local to the job's node: the checkpoint dir when it is local, else beside the log.
        self.state_dir = self.local_dir or self.opts.local_tier or os.path.dirname(self.events_path)
        self.heartbeat_path = os.path.join(self.state_dir, HEARTBEAT_FILE)
        self.log = EventLog(self.events_path, source="supervisor")

    # -- output --------------------------------------------------------------------------------------------------

    def _say(self, msg: str) -> None:
        if self.opts.quiet:
            return
        err = self._err or sys.stderr
        try:
            err.write(f"resumekit run: {msg}\n")
            err.flush()
        except (OSError, ValueError):
            pass

    # -- signals -------------------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Runs between two bytecodes of the main thread: only set flags and forward the signal (os.killpg is
        # async-signal-safe); logging, printing and killing happen in the monitor loop, which would otherwise
        # risk re-entering a half-done write or Popen's wait lock.
        if self._stop_signal is None:
            self._stop_signal = signum
        run = self._running
        if run is None or run.proc.returncode is not None:
            return
        if run.preempt_signal is None:
            # SIGINT goes on as SIGTERM: that is the signal training libraries (resumekit's manager, HF, Lightning)
            # treat as "save at the next step and exit 0"; SIGINT would raise KeyboardInterrupt mid-step instead.
            run.preempt_signal = signal.SIGTERM
            run.preempt_received = signum
            run.preempt_time = time.monotonic()
            _signal(run.proc.pid, signal.SIGTERM, group=True)
        elif signum == signal.SIGINT:
            run.kill_now = True  # a second Ctrl-C means "now": do not wait out the grace period

    def _install_signals(self) -> Dict[int, Any]:
        old: Dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return old
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, self._on_signal)
        return old

    # -- main loop -----------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise the command; returns the exit code for ``resumekit run`` (the job's final one)."""
        t0 = time.time()
        try:
            self._events_offset0 = os.path.getsize(self.events_path)
        except OSError:
            self._events_offset0 = 0
        old = self._install_signals()
        reaper = self.opts.subreaper and _set_subreaper(True)
        if self.directory and not self.opts.directory:
            self._say(f"checkpoint root from --config {self.opts.config}: {self.directory}")
        self.log.emit("supervisor_start", command=self.opts.command, directory=self.directory,
                      layout=self.opts.layout, resume=self.opts.resume, max_restarts=self.opts.max_restarts,
                      hang_timeout=self.opts.hang_timeout, grace=self.opts.grace, gpus=self.opts.gpus,
                      crash_loop=self.opts.crash_loop, events=self.events_path, heartbeat=self.heartbeat_path,
                      **self._modelarts())
        outcome, reason, code = "failed", "", EXIT_PRECHECK
        try:
            outcome, reason, code = self._loop()
        finally:
            if self._running is not None and self._running.proc.poll() is None:
                self._kill_tree(self._running)  # never leave a job behind (exceptions, KeyboardInterrupt)
            if reaper:
                _set_subreaper(False)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            self.summary = summarize(
                self.attempts, exit_code=code, outcome=outcome, reason=reason, wall_s=time.time() - t0,
                save_blocking_s=self._save_blocking(), quarantined=self._quarantined,
                precheck_retries=self._precheck_retries, extra_backoff_s=self._extra_backoff)
            self.log.emit("summary", **self.summary.as_dict())
            if not self.opts.quiet:
                err = self._err or sys.stderr
                err.write(self.summary.format_text() + "\n")
                err.flush()
        return code

    def _loop(self) -> Tuple[str, str, int]:
        """The restart loop; returns (outcome, reason, exit code)."""
        while True:
            if self._stop_signal is not None:
                return self._stopped_before_start()
            t_pre = time.monotonic()
            try:
                plan = self._prepare()
            except PrecheckError as e:
                self.log.emit("precheck_failed", check=e.check, message=e.message, retry=e.retry)
                self._say(e.message)
                if not e.retry:
                    return "failed", e.message, EXIT_PRECHECK
                if not self._take_budget():
                    return "gave-up", f"{e.message}; restart budget ({self.opts.max_restarts}) used up", \
                        self._last_exit if self._last_exit else EXIT_PRECHECK
                self._precheck_retries += 1
                self._say(f"retrying the pre-checks (restart {self._budget_used} of {self.opts.max_restarts})")
                self._extra_backoff += self._sleep_backoff()
                continue
            except _GiveUp as e:
                self.log.emit("give_up", reason=str(e))
                self._say(str(e))
                return "gave-up", str(e), self._last_exit if self._last_exit else EXIT_PRECHECK
            plan.precheck_s = time.monotonic() - t_pre
            if self._stop_signal is not None:
                return self._stopped_before_start()
            rec = self._run_once(plan)
            if rec is None:  # could not start the command at all
                return "failed", self._start_error, self._last_exit or EXIT_NOT_FOUND
            if not rec.failure:
                if rec.preempted:
                    return "preempted", f"stopped by {signal_name(self._stop_signal or signal.SIGTERM)}", \
                        exit_code_of(rec.returncode)
                return "success", "the job exited 0", 0
            if rec.preempted:
                why = ("killed after the grace period" if rec.returncode == -signal.SIGKILL
                       else f"exited {exit_code_of(rec.returncode)} after the preemption signal")
                return "preempted", f"not restarted: the job was preempted and {why}", exit_code_of(rec.returncode)
            if not self._take_budget():
                reason = (f"restart budget used up (--max-restarts {self.opts.max_restarts}); last exit "
                          f"{self._describe_exit(rec.returncode)}")
                self.log.emit("give_up", reason=reason)
                self._say(reason)
                return "gave-up", reason, exit_code_of(rec.returncode)
            self._pending_backoff = self._sleep_backoff(announce=rec)

    def _stopped_before_start(self) -> Tuple[str, str, int]:
        sig = self._stop_signal or signal.SIGTERM
        reason = f"{signal_name(sig)} received while no job was running; not starting it again"
        self.log.emit("preempt", attempt=None, signal=signal_name(sig), job_pid=None)
        self._say(reason)
        return "preempted", reason, self._last_exit if self._last_exit else 128 + sig

    def _take_budget(self) -> bool:
        if self._budget_used >= self.opts.max_restarts:
            return False
        self._budget_used += 1
        return True

    def _sleep_backoff(self, announce: Optional[AttemptRecord] = None) -> float:
        delay = backoff_delay(self._budget_used, self.opts.backoff, self.opts.backoff_max, self.opts.jitter,
                              self._rng.random())
        if announce is not None:
            self.log.emit("restart", attempt=announce.index + 1, restart_count=self._budget_used,
                          after_exit=exit_code_of(announce.returncode), delay_s=round(delay, 3),
                          budget_left=self.opts.max_restarts - self._budget_used)
            self._say(f"restarting in {delay:.2f} s (restart {self._budget_used} of {self.opts.max_restarts})")
        deadline = time.monotonic() + delay
        while self._stop_signal is None:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, self.opts.poll_interval))
        return delay

    @staticmethod
    def _describe_exit(rc: int) -> str:
        return f"{exit_code_of(rc)} (killed by {signal_name(-rc)})" if rc < 0 else str(rc)

    @staticmethod
    def _modelarts() -> Dict[str, str]:
        return {k.lower(): os.environ[k] for k in MODELARTS_COUNTERS if k in os.environ}

    # -- before a start ------------------------------------------------------------------------------------------

    def _prepare(self) -> _Plan:
        """Pre-checks, crash-loop handling and the choice of checkpoint for the next start."""
        plan = _Plan()
        prev = self.attempts[-1] if self.attempts else None
        storage = None
        if self.directory:
            if self.remote:
                check_remote(self.directory, self.opts.remote_timeout)
            else:
                check_directory(self.local_dir)  # type: ignore[arg-type]
            if self.opts.local_tier:
                check_directory(self.opts.local_tier)
            storage = self._open_storage()
        if self.opts.gpus:
            report = check_hardware(self.opts.gpus, self.opts.hardware_timeout)
            self.log.emit("hardware_check", **report)

        best = layout = None
        if storage is not None:
            layout, best = self._discover(storage)
            plan.newest_step = best.step if best else None
            if self._initial_names is None:
                self._initial_names = {i.name for i in layout.list(storage)}
            if prev is not None:
                best = self._crash_loop_check(storage, layout, best, prev)
                plan.newest_step = best.step if best else None
            if self.opts.local_tier and layout.name == "native":
                best = self._predownload(storage, best)
            free = storage.free_bytes()
            if free is not None:
                check_free_space(storage.uri, free, self._checkpoint_size(storage, best), self.opts.min_free)
            if self.opts.local_tier:
                from .storage.local import LocalStorage

                check_free_space(self.opts.local_tier, LocalStorage(self.opts.local_tier).free_bytes(),
                                 int(best.size or 0) if best else 0, self.opts.min_free)
            if layout.tracker_name:
                self._repair(storage, layout)
        elif prev is not None:
            self._crash_loop_check(None, None, None, prev)

        self._choose_resume(plan, storage, layout, best)
        if self.opts.config:
            self._resolve_config(plan)
        return plan

    def _predownload(self, storage, remote_best):
        """The newest valid checkpoint of either tier, as a local-tier path: a newer remote one is downloaded
        first (parallel ranged reads, checksums verified, tmp dir + rename), so the job never waits on the remote."""
        from .errors import CorruptCheckpointError
        from .layouts.base import CheckpointInfo
        from .layouts.native import NativeLayout
        from .storage.local import LocalStorage
        from .storage.tiered import copy_step

        local = LocalStorage(self.opts.local_tier)  # type: ignore[arg-type]
        layout = NativeLayout()
        local_best, skipped = layout.latest(local, full=True)
        for sk in skipped:
            key = (local.join(sk.name), sk.reason)
            if key not in self._skips_logged:
                self._skips_logged.add(key)
                self.log.emit("skip_invalid", step=sk.step, path=sk.path, layout="native", reason=sk.reason,
                              tier="local")
                self._say(f"skipping invalid checkpoint {sk.path}: {sk.reason}")
        if remote_best is None or (local_best is not None and local_best.step >= remote_best.step):
            return local_best
        # Newest first; one that fails verification on the way down is skipped like any invalid checkpoint.
        floor = local_best.step if local_best is not None else -1
        for cand in sorted((i for i in layout.list(storage) if floor < i.step <= remote_best.step),
                           key=lambda i: i.step, reverse=True):
            t0 = time.monotonic()
            try:
                man = copy_step(storage, local, cand.name, desc=f"download {cand.name}")
            except CorruptCheckpointError as e:
                key = (cand.path, e.reason)
                if key not in self._skips_logged:
                    self._skips_logged.add(key)
                    self.log.emit("skip_invalid", step=cand.step, path=cand.path, layout="native", reason=e.reason)
                    self._say(f"skipping invalid checkpoint {cand.path}: {e.reason}")
                continue
            except OSError as e:
                raise PrecheckError("remote", f"cannot download {cand.path} to {local.join(cand.name)}: "
                                              f"{_one_line(e)}", retry=True) from None
            secs = time.monotonic() - t0
            self.log.emit("download", step=cand.step, path=cand.path, to=local.join(cand.name),
                          bytes=man.total_bytes, seconds=round(secs, 3))
            self._say(f"downloaded {cand.path} to {local.join(cand.name)} ({human_bytes(man.total_bytes)} in "
                      f"{secs:.1f} s)")
            info = CheckpointInfo(step=cand.step, name=cand.name, path=local.join(cand.name), layout="native")
            return layout.validate(local, info, full=False)
        return local_best

    def _open_storage(self):
        from .storage import open_storage

        try:
            return open_storage(self.directory, create=False)  # type: ignore[arg-type]
        except ImportError as e:
            raise PrecheckError("remote", f"cannot open {self.directory}: {_one_line(e)}; install it with "
                                          "pip install 'resumekit[s3]'") from None
        except OSError as e:
            raise PrecheckError("directory", f"cannot open {self.directory}: {_one_line(e)}",
                                retry=self.remote) from None

    def _discover(self, storage):
        """Layout and newest valid checkpoint (checksums verified); newer invalid ones are logged once each."""
        from .layouts import resolve_layout

        try:
            layout = resolve_layout(storage, self.opts.layout)
            # With a local tier the newest remote checkpoint is verified while it is pre-downloaded: hashing it
            # here as well would read it from the remote twice.
            full = not (self.opts.local_tier and layout.name == "native")
            best, skipped = layout.latest(storage, full=full)
        except OSError as e:
            raise PrecheckError("checkpoint", f"cannot list checkpoints under {storage.uri}: {_one_line(e)}",
                                retry=self.remote) from None
        except Exception as e:  # noqa: BLE001 - a broken layout adapter stops the run in one line, not a traceback
            raise PrecheckError("checkpoint", f"cannot look for checkpoints under {storage.uri} (layout "
                                              f"{self.opts.layout}): {type(e).__name__}: {_one_line(e)}") from None
        for s in skipped:
            key = (s.name, s.reason)
            if key in self._skips_logged:
                continue
            self._skips_logged.add(key)
            self.log.emit("skip_invalid", step=s.step, path=s.path, layout=layout.name, reason=s.reason)
            self._say(f"skipping invalid checkpoint {s.path}: {s.reason}")
        return layout, best

    def _crash_loop_check(self, storage, layout, best, prev: AttemptRecord):
        """Update the failure streak from the last attempt; quarantine its checkpoint when it crash-loops."""
        last_plan = self._last_plan
        if self._streak_attempt == prev.index:  # a retried pre-check: this attempt was already counted
            return best
        self._streak_attempt = prev.index
        progressed = made_progress(last_plan.newest_step, best.step if best else None,
                                   prev.resume_step, prev.last_step)
        self._streak = next_streak(self._streak, prev.failure, progressed)
        if not is_crash_loop(self._streak, self.opts.crash_loop):
            return best
        k = self._streak
        own_root = last_plan.resume_root is None
        if not own_root:
            try:
                from .layouts import resolve_layout
                from .storage import open_storage

                storage = open_storage(last_plan.resume_root, create=False)
                layout = resolve_layout(storage, self.opts.layout)
            except Exception as e:  # noqa: BLE001 - reported as the reason we give up
                raise _GiveUp(f"crash loop: cannot open {last_plan.resume_root} to quarantine "
                              f"{last_plan.resume_path} ({_one_line(e)}); move it aside by hand") from None
        if last_plan.resume_name is None or storage is None:
            origin = (f"from {last_plan.resume_path}" if last_plan.resume_path else "from scratch")
            raise _GiveUp(f"crash loop: the job failed {k} times in a row starting {origin} without progress, "
                          "and there is no checkpoint left to quarantine; giving up")
        if own_root and self.opts.local_tier:
            # The job resumed from the local tier's copy: it goes aside too, or the next pre-download picks it again.
            self._quarantine_local(last_plan.resume_name, k)
        info = next((i for i in layout.list(storage) if i.name == last_plan.resume_name), None)
        if info is None:  # it vanished (gc, a person); nothing to quarantine, just go on with what is there
            self._streak = 0
            return best
        try:
            new = quarantine(storage, info)
        except OSError as e:
            raise _GiveUp(f"crash loop: cannot quarantine {info.path} ({_one_line(e)}); move it aside by hand "
                          "and start again") from None
        self._quarantined += 1
        self._streak = 0
        _, best2 = self._discover(storage)
        self.log.emit("quarantine", step=info.step, path=info.path, to=storage.join(new), failures=k,
                      layout=layout.name, reason=f"{k} failures in a row without progress",
                      next_step=best2.step if best2 else None, next_path=best2.path if best2 else None)
        nxt = f"resuming from {best2.path}" if best2 else "no valid checkpoint left: starting from scratch"
        self._say(f"crash loop: the job failed {k} times in a row after resuming from {info.path}; quarantined "
                  f"it as {storage.join(new)}; {nxt}")
        # A checkpoint found through --config lives outside --dir: the YAML's next search finds its predecessor.
        return best2 if own_root else best

    def _quarantine_local(self, name: str, failures: int) -> None:
        from .layouts.base import CheckpointInfo
        from .storage.local import LocalStorage

        local = LocalStorage(self.opts.local_tier)  # type: ignore[arg-type]
        if not local.exists(name):
            return
        try:
            new = quarantine(local, CheckpointInfo(step=-1, name=name, path=local.join(name), layout="native"))
        except OSError as e:
            raise _GiveUp(f"crash loop: cannot quarantine {local.join(name)} ({_one_line(e)}); move it aside by "
                          "hand and start again") from None
        self.log.emit("quarantine", path=local.join(name), to=local.join(new), failures=failures, tier="local",
                      reason=f"{failures} failures in a row without progress")

    def _checkpoint_size(self, storage, info) -> int:
        if info is None:
            return 0
        if info.size:
            return int(info.size)
        path = storage.local_path(info.name)
        if not path:
            return 0
        if os.path.isfile(path):
            return os.path.getsize(path)
        total = 0
        for root, _, files in os.walk(path):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        return total

    def _repair(self, storage, layout) -> None:
        try:
            res = layout.repair(storage)
        except Exception as e:  # noqa: BLE001 - a broken tracker repair is reported, the start goes on
            self.log.emit("repair", layout=layout.name, ok=False, error=_one_line(e))
            self._say(f"could not repair the {layout.name} tracker under {storage.uri}: {_one_line(e)}")
            return
        if res is None:
            return
        self.log.emit("repair", layout=layout.name, ok=True, tracker=res.tracker, old=res.old, new=res.new,
                      changed=res.changed, backup=res.backup, message=res.message)
        if res.changed:
            self._say(f"repaired {res.message}")

    def _choose_resume(self, plan: _Plan, storage, layout, best) -> None:
        mode = self.opts.resume
        if mode == "never":
            return
        if mode == "auto":
            if best is not None:
                plan.resume_path, plan.resume_step, plan.resume_name = best.path, best.step, best.name
            return
        # An explicit checkpoint: used until this run writes a newer one of its own.
        if best is not None and self._initial_names is not None and best.name not in self._initial_names:
            plan.resume_path, plan.resume_step, plan.resume_name = best.path, best.step, best.name
            return
        info = self._check_explicit(mode)
        plan.resume_path, plan.resume_step = info.path, info.step

    def _check_explicit(self, path: str):
        from .layouts import resolve_layout
        from .layouts.base import CheckpointInfo
        from .storage import open_storage

        path = path.rstrip("/")
        parent, _, name = path.rpartition("/")
        try:
            st = open_storage(parent or ".", create=False)
            lay = resolve_layout(st, self.opts.layout)
            found = {i.name: i for i in lay.list(st)}
            info = found.get(name) or CheckpointInfo(step=-1, name=name, path=st.join(name), layout=lay.name)
            checked = lay.validate(st, info, full=True)
        except (OSError, ImportError) as e:
            raise PrecheckError("resume", f"cannot read --resume {path}: {_one_line(e)}") from None
        if not checked.valid:
            raise PrecheckError("resume", f"--resume {path} is not a valid checkpoint: {checked.reason}; pass a "
                                          "valid one, or --resume auto")
        return checked

    def _resolve_config(self, plan: _Plan) -> None:
        """Point ``--config``'s ``resume_from_checkpoint`` at the chosen checkpoint (or let it search its own
        ``output_dir`` when we found none), and hand what it chose to the job as well."""
        # yamlconfig needs ruamel.yaml, an optional extra: imported here, only when --config is used.
        try:
            from .yamlconfig import resolve_config
        except ImportError as e:
            raise PrecheckError("config", f"--config {self.opts.config} needs resumekit.yamlconfig and ruamel.yaml "
                                          f"({_one_line(e)}); pip install 'resumekit[yaml]'") from None
        kwargs: Dict[str, Any] = {}
        if self.opts.layout != "auto":
            kwargs["layout"] = self.opts.layout
        if plan.resume_path:
            kwargs["checkpoint"] = plan.resume_path
        elif self.opts.resume == "never":
            kwargs["fresh"] = True
        try:
            result = _call_accepting(resolve_config, self.opts.config, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure to rewrite the YAML stops the start, in one line
            raise PrecheckError("config", f"cannot update --config {self.opts.config}: {_one_line(e)}") from None
        chosen = getattr(result, "checkpoint", None)
        if not plan.resume_path and self.opts.resume != "never" and chosen is not None and chosen.path:
            # Found by the YAML's own search (its output_dir): quarantinable there, if it crash-loops.
            plan.resume_path, plan.resume_step = chosen.path, chosen.step
            plan.resume_root, _, plan.resume_name = chosen.path.rstrip("/").rpartition("/")
        self.log.emit("config_resolved", config=self.opts.config, resume_from=plan.resume_path or None,
                      result=_jsonable(result))
        for sk in getattr(result, "skipped", None) or []:
            key = (getattr(sk, "name", ""), getattr(sk, "reason", ""))
            if key not in self._skips_logged:
                self._skips_logged.add(key)
                self.log.emit("skip_invalid", step=getattr(sk, "step", None), path=getattr(sk, "path", None),
                              reason=getattr(sk, "reason", ""), found_by="config")
                self._say(f"skipping invalid checkpoint {getattr(sk, 'path', '?')}: {getattr(sk, 'reason', '')}")

    # -- one start -----------------------------------------------------------------------------------------------

    def _job_env(self, plan: _Plan, index: int) -> Dict[str, str]:
        env = dict(os.environ)
        if self.opts.env:
            env.update(self.opts.env)
        env[ENV_RESUME_FROM] = plan.resume_path
        env[ENV_RESTART_COUNT] = str(index - 1)
        env[ENV_DIR] = self.local_dir or self.directory or ""
        env[ENV_HEARTBEAT] = self.heartbeat_path
        env[ENV_EVENTS] = self.events_path
        env[ENV_RESUME_MODE] = "never" if self.opts.resume == "never" else "auto"
        if self.opts.local_tier:
            env[ENV_LOCAL_TIER] = self.opts.local_tier
        if any(os.path.basename(str(a)) == "torchrun" or str(a) == "torch.distributed.run" for a in self.opts.command):
            # torch 2.x elastic restarts can reuse the previous attempt's rendezvous store and fail to connect
            # (pytorch#135712); a fresh store per restart avoids it.
            env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        return env

    def _clear_heartbeat(self) -> None:
        # A stale beat from the previous attempt would make a slow-starting job look hung (or alive).
        for name in (HEARTBEAT_FILE,):
            try:
                os.unlink(os.path.join(self.state_dir, name))
            except FileNotFoundError:
                pass
            except OSError as e:
                self._say(f"cannot remove the stale heartbeat {self.heartbeat_path}: {e.strerror}")
        try:
            for entry in os.listdir(self.state_dir):
                if entry.startswith(HEARTBEAT_FILE + ".") and entry.endswith(".tmp"):
                    try:
                        os.unlink(os.path.join(self.state_dir, entry))
                    except OSError:
                        pass
        except OSError:
            pass

    def _run_once(self, plan: _Plan) -> Optional[AttemptRecord]:
        index = len(self.attempts) + 1
        os.makedirs(self.state_dir, exist_ok=True)
        self._clear_heartbeat()
        try:
            offset = os.path.getsize(self.events_path)
        except OSError:
            offset = 0
        baseline = set(self._my_children())
        start = time.time()
        try:
            proc = subprocess.Popen(self.opts.command, env=self._job_env(plan, index), start_new_session=True)
        except FileNotFoundError as e:
            self._start_error = f"cannot start {self.opts.command[0]!r}: {e.strerror}; check the command and PATH"
            self._last_exit = EXIT_NOT_FOUND
            self._say(self._start_error)
            self.log.emit("start_failed", attempt=index, error=self._start_error)
            return None
        except PermissionError as e:
            self._start_error = f"cannot start {self.opts.command[0]!r}: {e.strerror}; is it executable?"
            self._last_exit = EXIT_NOT_EXECUTABLE
            self._say(self._start_error)
            self.log.emit("start_failed", attempt=index, error=self._start_error)
            return None
        run = _Running(proc=proc, index=index, start=start, events_offset=offset, plan=plan,
                       baseline_children=baseline)
        self._running = run
        self._last_plan = plan
        self.log.emit("start", attempt=index, restart_count=index - 1, pid=proc.pid, command=self.opts.command,
                      resume_from=plan.resume_path or None, resume_step=plan.resume_step,
                      newest_valid_step=plan.newest_step, precheck_s=round(plan.precheck_s, 3),
                      **self._modelarts())
        origin = f"resuming from {plan.resume_path}" if plan.resume_path else "from scratch"
        self._say(f"start {index} (pid {proc.pid}) {origin}")
        if self._stop_signal is not None and run.preempt_signal is None:
            # A signal that came while the job was being started: forward it now.
            run.preempt_signal, run.preempt_received = signal.SIGTERM, self._stop_signal
            run.preempt_time = time.monotonic()
            _signal(proc.pid, signal.SIGTERM, group=True)
        try:
            rc = self._monitor(run)
        finally:
            self._running = None
        end = time.time()
        self._cleanup_leftovers(run)
        rec = self._record(run, rc, start, end)
        self.attempts.append(rec)
        self._last_exit = exit_code_of(rc)
        return rec

    def _monitor(self, run: _Running) -> int:
        """Wait for the job while watching its heartbeat and the preemption grace period."""
        proc = run.proc
        next_reap = time.monotonic() + 1.0
        while True:
            self._log_preempt(run)
            rc = proc.poll()
            if rc is not None:
                self._log_preempt(run)  # the signal may have come during poll()
                return rc
            now = time.monotonic()
            if run.first_sign is None:
                try:
                    run.first_sign = os.stat(self.heartbeat_path).st_mtime
                except OSError:
                    pass
            if run.kill_now and run.killed is None:
                run.killed = "second SIGINT"
                self.log.emit("kill", attempt=run.index, pid=proc.pid, reason="second SIGINT")
                self._say("second SIGINT: killing the job now")
                self._kill_tree(run)
            elif (run.preempt_signal is not None and run.killed is None
                  and now - run.preempt_time > self.opts.grace):
                run.killed = "grace expired"
                self.log.emit("kill", attempt=run.index, pid=proc.pid, reason="grace period expired",
                              grace_s=self.opts.grace)
                self._say(f"the job did not exit within --grace {self.opts.grace:g} s: killing its process group")
                self._kill_tree(run)
            elif run.preempt_signal is None and run.killed is None and self.opts.hang_timeout:
                age = heartbeat_age(self.heartbeat_path)
                if age is not None and age > self.opts.hang_timeout:
                    self._handle_hang(run, age)
            if now >= next_reap:
                next_reap = now + 1.0
                _reap([p for p in self._my_children() if p != proc.pid and p not in run.baseline_children])
            time.sleep(self.opts.poll_interval)

    def _log_preempt(self, run: _Running) -> None:
        if run.preempt_signal is None or run.preempt_logged:
            return
        run.preempt_logged = True
        name = signal_name(run.preempt_received or run.preempt_signal)
        self.log.emit("preempt", attempt=run.index, signal=name, forwarded=signal_name(run.preempt_signal),
                      job_pid=run.proc.pid, grace_s=self.opts.grace)
        self._say(f"{name} received: sent SIGTERM to the job (pid {run.proc.pid}); it has {self.opts.grace:g} s "
                  "to save and exit")

    def _read_beat(self) -> Dict[str, Any]:
        try:
            with open(self.heartbeat_path) as f:
                doc = json.load(f)
            return doc if isinstance(doc, dict) else {}
        except (OSError, ValueError):
            return {}

    def _handle_hang(self, run: _Running, age: float) -> None:
        beat = self._read_beat()
        pid = beat.get("pid") if isinstance(beat.get("pid"), int) else None
        tree = [run.proc.pid] + descendants(run.proc.pid)
        target = pid if pid in tree else run.proc.pid
        detected = time.time()
        self._say(f"the job is hung: no heartbeat for {age:.1f} s (--hang-timeout {self.opts.hang_timeout:g}) "
                  f"at step {beat.get('step')}; dumping its stacks, then killing it and its children")
        dump_path, method = self._dump_stacks(run, target, tree)
        run.hung = True
        run.killed = "hang"
        self.log.emit("hang", attempt=run.index, pid=target, job_pid=run.proc.pid, step=beat.get("step"),
                      heartbeat_age_s=round(age, 3), detected_time=round(detected, 6),
                      hang_timeout_s=self.opts.hang_timeout, dump=method,
                      dump_path=dump_path)
        self._say(f"stacks of pid {target}: {dump_path or method}")
        killed = self._kill_tree(run)
        self.log.emit("kill", attempt=run.index, pid=run.proc.pid, reason="hang", pids=killed)

    def _dump_stacks(self, run: _Running, target: int, tree: List[int]) -> Tuple[Optional[str], str]:
        """Python stacks of the hung job before it is killed: py-spy when installed, else SIGUSR1."""
        pyspy = shutil.which("py-spy")
        stamp = time.strftime("%Y%m%dT%H%M%S")
        if pyspy:
            path = os.path.join(self.state_dir, f"hang-{run.index}-{target}-{stamp}.txt")
            pids = [target] + [p for p in tree if p != target][:15]
            try:
                with open(path, "w") as out:
                    for p in pids:
                        out.write(f"==== py-spy dump --pid {p}\n")
                        out.flush()
                        try:
                            subprocess.run([pyspy, "dump", "--pid", str(p)], stdout=out, stderr=subprocess.STDOUT,
                                           timeout=20)
                        except subprocess.TimeoutExpired:
                            out.write("(py-spy timed out)\n")
                return path, "py-spy"
            except OSError as e:
                self._say(f"py-spy dump failed: {e}")
        # faulthandler.register(SIGUSR1) in the job prints every thread's stack to its stderr; a job without it
        # dies of SIGUSR1, which is fine: it is about to be killed anyway.
        if _signal(target, signal.SIGUSR1):
            time.sleep(min(1.0, max(0.2, self.opts.poll_interval * 5)))
            return None, "SIGUSR1 (faulthandler output on the job's stderr)"
        return None, "none (process gone)"

    def _my_children(self) -> List[int]:
        try:
            import psutil
        except ImportError:
            return _proc_children_map().get(os.getpid(), [])
        try:
            return [c.pid for c in psutil.Process().children()]
        except psutil.Error:
            return []

    def _kill_tree(self, run: _Running) -> List[int]:
        """SIGKILL the job's process group and every descendant, including ones that left the group (setsid)."""
        pid = run.proc.pid
        tree = descendants(pid)
        _signal(pid, signal.SIGKILL, group=True)
        _signal(pid, signal.SIGKILL)
        for p in tree:
            _signal(p, signal.SIGKILL)
        try:
            run.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL of an uninterruptible (D state) process
            self._say(f"pid {pid} did not die within 10 s of SIGKILL (stuck in the kernel?)")
        self._wait_gone(tree, run)
        return [pid] + tree

    def _wait_gone(self, pids: Sequence[int], run: _Running, timeout: float = 5.0) -> None:
        # Orphans re-parent to us (subreaper) only after their parent died: reap until every one is gone.
        deadline = time.monotonic() + timeout
        left = list(pids)
        while left and time.monotonic() < deadline:
            _reap([p for p in self._my_children() if p not in run.baseline_children])
            left = [p for p in left if pid_alive(p)]
            if left:
                time.sleep(0.02)

    def _cleanup_leftovers(self, run: _Running) -> None:
        """Kill what the job left running (dataloader workers, detached helpers) before the next start."""
        pgid = run.proc.pid
        stray = [p for p in self._my_children() if p not in run.baseline_children and p != pgid]
        stray_all = stray + [d for p in stray for d in descendants(p)]
        group_alive = _signal(pgid, 0, group=True)
        if not stray_all and not group_alive:
            return
        _signal(pgid, signal.SIGKILL, group=True)
        for p in stray_all:
            _signal(p, signal.SIGKILL)
        self._wait_gone(stray_all, run)
        self.log.emit("cleanup", attempt=run.index, pids=stray_all, process_group=group_alive)

    # -- after an exit -------------------------------------------------------------------------------------------

    def _record(self, run: _Running, rc: int, start: float, end: float) -> AttemptRecord:
        beat = self._read_beat()
        steps: List[int] = []
        if isinstance(beat.get("step"), int):
            steps.append(beat["step"])
        restored: Optional[int] = None
        first_sign = run.first_sign
        for ev in _events_since(self.events_path, run.events_offset):
            if ev.get("source") == "supervisor":
                continue
            step = ev.get("step")
            name = ev.get("event")
            if name == "restore" and isinstance(step, int):
                restored = step
            if isinstance(step, int) and name in ("save", "metrics", "restore", "step"):
                steps.append(step)
            if name in ("restore", "metrics", "save") and isinstance(ev.get("time"), (int, float)):
                first_sign = min(first_sign, ev["time"]) if first_sign else ev["time"]
        resume_step = restored if restored is not None else run.plan.resume_step
        last_step = max(steps) if steps else None
        failure = is_failure(rc, run.preempt_signal)
        rec = AttemptRecord(
            index=run.index, resume_step=resume_step, last_step=last_step, start=start, end=end, returncode=rc,
            failure=failure, hung=run.hung, preempted=run.preempt_signal is not None,
            backoff_s=self._pending_backoff if run.index > 1 else 0.0, precheck_s=run.plan.precheck_s,
            startup_s=(max(0.0, first_sign - start) if first_sign else None))
        self._pending_backoff = 0.0
        self.log.emit("exit", attempt=run.index, pid=run.proc.pid, returncode=rc, exit_code=exit_code_of(rc),
                      signal=signal_name(-rc) if rc < 0 else None, failure=failure, hung=run.hung,
                      preempted=rec.preempted, killed=run.killed, duration_s=round(end - start, 3),
                      resume_step=resume_step, last_step=last_step)
        if failure:
            what = "was killed as hung" if run.hung else "failed"
            self._say(f"the job {what}: exit {self._describe_exit(rc)} after {end - start:.1f} s "
                      f"(last step {last_step}, resumed from {resume_step})")
        return rec

    def _save_blocking(self) -> float:
        """Training time blocked by this run's saves, from the job's ``save`` events."""
        total = 0.0
        for ev in _events_since(self.events_path, self._events_offset0):
            if (ev.get("event") == "save" and ev.get("source") != "supervisor"
                    and isinstance(ev.get("blocking_s"), (int, float))):
                total += float(ev["blocking_s"])
        return total


class _GiveUp(Exception):
    """Nothing is left to try (crash loop with no checkpoint to quarantine)."""


def _events_since(path: str, offset: int) -> List[Dict[str, Any]]:
    """Events appended after byte ``offset`` (this attempt's), skipping a torn last line."""
    out: List[Dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return out
    for raw in data.splitlines():
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    for attr in ("as_dict", "to_dict", "_asdict"):
        fn = getattr(value, attr, None)
        if callable(fn):
            try:
                return fn()
            except Exception:  # noqa: BLE001
                break
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def _call_accepting(fn: Callable[..., Any], first: Any, **kwargs: Any) -> Any:
    """Call ``fn(first, **kwargs)`` with only the keyword arguments its signature accepts (optional modules
    written separately may lag behind or run ahead of this one)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(first, **kwargs)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(first, **kwargs)


__all__ = [
    "SupervisorOptions", "Supervisor", "RunSummary", "AttemptRecord", "PrecheckError", "backoff_delay",
    "exit_code_of", "is_failure", "made_progress", "next_streak", "is_crash_loop", "lost_steps_of", "summarize",
    "parse_size", "quarantine", "check_directory", "check_free_space", "check_remote", "check_hardware",
    "descendants", "EXIT_PRECHECK",
]
