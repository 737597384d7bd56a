"""Warm restart: a standby interpreter that has already imported the heavy modules becomes the next attempt.

A restart spends seconds in a fresh interpreter importing torch and the job's libraries before the job's own
restore even begins. While an attempt runs, :class:`WarmStarter` keeps one standby: the job's own interpreter,
started exactly as the job is (same executable and flags, the job's environment without the per-attempt
hand-off, same working directory, its own session, output through an :class:`~.output.OutputPump`), which imports
torch, numpy, resumekit and ``--preload`` modules and then waits on a pipe. On the next start the supervisor sends
it the attempt's environment and working directory; it makes itself look like a fresh interpreter (environment,
cwd, argv, ``sys.path[0]``, signal dispositions and mask, fresh global RNGs, a new ``__main__``) and runs the job as
``python script.py`` / ``python -m module`` would (:mod:`.standby_child`). A new standby starts behind it.

When: a standby is started once the running attempt reports progress (its first heartbeat), or ``warm_delay``
seconds after it started for a job that does not report, so its imports do not compete with the job's own
start-up and restore for a small machine's CPUs; never for a job whose cold start reached its first heartbeat in
under :data:`MIN_COLD_STARTUP_S` (a torch-free script: nothing to gain, and the exit of an interpreter that
imported torch takes a second longer). A restart that finds its standby still importing waits for it
(bounded): it is already ahead of a fresh interpreter. Cost: the memory of one idle interpreter with those modules
imported (about 220 MiB with torch, numpy and resumekit on CPU), and its imports' CPU time once per attempt.

Cold (a fresh interpreter, as without warm restart) when: ``warm=False``; the command is not ``python [flags]
script.py ARGS``, ``python [flags] -m module ARGS`` or a Python console script (``#!/path/to/python``, e.g.
``torchrun``, whose agent is warm and whose workers start cold); a flag other than ``-u -B -O -b -s -E -q -d -R
-X -W``; the standby failed to start, import or activate (then warm restart is off for the rest of the run); or the
environment changed between attempts beyond the ``RESUMEKIT_*`` hand-off.

Bounded: a standby never outlives the supervisor (killed in the supervisor's ``finally``; ``PR_SET_PDEATHSIG``
and the control pipe's end of file as safety nets), readiness, the activation message and its acknowledgement all
have deadlines.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..events import ENV_RESTART_COUNT, ENV_RESUME_FROM
from .decisions import standby_worthwhile, wait_for_standby
from .output import OutputPump
from .proctree import kill_tree

#: the child's source, passed with ``-c`` (read once: a file that vanishes mid-run must not break restarts)
STANDBY_SOURCE = (Path(__file__).with_name("standby_child.py")).read_text()
#: always imported ahead when installed; ``--preload`` adds to them. ``torch._dynamo``: every optimizer's
#: constructor imports it on first use, seconds of a torch job's start-up.
DEFAULT_PRELOAD = ("torch", "torch._dynamo", "numpy", "resumekit", "resumekit.manager")
#: the environment a standby is started without: it changes with every attempt and is sent on activation
PER_ATTEMPT_ENV = (ENV_RESUME_FROM, ENV_RESTART_COUNT, "RESUMEKIT_TAKEOVER", "RESUMEKIT_VERIFIED")
#: a job whose cold start beat its heartbeat sooner than this gets no standby (:func:`standby_worthwhile`)
MIN_COLD_STARTUP_S = 1.0
#: seconds a restart waits for a standby that is still importing
READY_TIMEOUT_S = 120.0
#: seconds the activation message and its acknowledgement may take
ACTIVATE_TIMEOUT_S = 10.0

#: what warm restart does for torchrun (``torchrun`` or ``python -m torch.distributed.run``)
TORCHRUN_NOTE = "torchrun's agent is warm, its workers start cold (each a fresh interpreter it starts)"

_PYTHON = re.compile(r"^python(\d+(\.\d+)?)?$")
# Interpreter flags that change nothing about how the main script or module is found (the standby gets them too).
_SIMPLE_FLAGS = set("uBObsEqdR")
_ARG_FLAGS = ("-X", "-W")


@dataclass(frozen=True)
class WarmEntry:
    """How a command runs in a standby.

    Attributes:
        interpreter: the interpreter and its flags, as the job starts them.
        mode: ``script`` or ``module``.
        target: the script as given, or the module name.
        args: the job's arguments after the script or module.
        orig_argv: ``sys.orig_argv`` of a fresh start.
        note: what stays cold (torchrun's workers), or "".
    """

    interpreter: tuple[str, ...]
    mode: str
    target: str
    args: tuple[str, ...]
    orig_argv: tuple[str, ...]
    note: str = ""

    def spec(self, cwd: str) -> dict[str, Any]:
        """The static part of the standby's start (:mod:`.standby_child`): ``sys.argv``, ``sys.path[0]``, what to
        run, as a fresh interpreter started in ``cwd`` would have them."""
        if self.mode == "module":
            return {
                "mode": "module",
                "target": self.target,
                "argv": ["-m", *self.args],
                "path0": cwd,
                "orig_argv": list(self.orig_argv),
            }
        # CPython 3.9+: __file__ is the script joined to the cwd; sys.path[0] its real directory.
        file = os.path.join(cwd, self.target)
        return {
            "mode": "script",
            "target": file,
            "argv": [self.target, *self.args],
            "path0": os.path.dirname(os.path.realpath(file)),
            "orig_argv": list(self.orig_argv),
        }


def parse_python_command(command: Sequence[str]) -> tuple[WarmEntry | None, str]:
    """Whether ``command`` is ``python [flags] script.py ARGS`` or ``python [flags] -m module ARGS`` (pure).

    Args:
        command: the supervised command.

    Returns:
        ``(entry, "")``, or ``(None, why it starts cold)``.
    """
    if not command or not _PYTHON.match(os.path.basename(command[0])):
        return None, "not a Python interpreter"
    i, flags = 1, [command[0]]
    while i < len(command):
        a = command[i]
        if a in _ARG_FLAGS and i + 1 < len(command):
            flags += [a, command[i + 1]]
            i += 2
        elif a.startswith(_ARG_FLAGS) and len(a) > 2:
            flags.append(a)
            i += 1
        elif a == "-m" and i + 1 < len(command):
            note = TORCHRUN_NOTE if command[i + 1] == "torch.distributed.run" else ""
            return (
                WarmEntry(tuple(flags), "module", command[i + 1], tuple(command[i + 2 :]), tuple(command), note),
                "",
            )
        elif a.startswith("-") and len(a) > 1 and not a.startswith("--") and set(a[1:]) <= _SIMPLE_FLAGS:
            flags.append(a)
            i += 1
        elif a.startswith("-"):
            return None, f"interpreter option {a} is not supported by warm restart"
        else:
            return WarmEntry(tuple(flags), "script", a, tuple(command[i + 1 :]), tuple(command)), ""
    return None, "no script or -m module"


def console_script_entry(command: Sequence[str], path: str | None) -> tuple[WarmEntry | None, str]:
    """Whether ``command[0]`` is a Python console script (``#!/abs/python`` as its first line, e.g. ``torchrun``):
    the kernel runs it as ``python /full/path/script ARGS``, so it can run warm too.

    Args:
        command: the supervised command.
        path: the ``PATH`` the job's command is looked up in.

    Returns:
        ``(entry, "")``, or ``(None, why it starts cold)``.
    """
    exe = shutil.which(command[0], path=path) if command else None
    if not exe:
        return None, "command not found"
    try:
        with open(exe, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None, "not readable"
    if not first.startswith(b"#!"):
        return None, "not a Python program"
    words = first[2:].decode("utf-8", "replace").split()
    if len(words) != 1 or not os.path.isabs(words[0]) or not _PYTHON.match(os.path.basename(words[0])):
        return None, "not a Python program started by an absolute interpreter path"
    script = command[0] if "/" in command[0] else exe
    note = TORCHRUN_NOTE if os.path.basename(exe) == "torchrun" else ""
    return WarmEntry((words[0],), "script", script, tuple(command[1:]), (words[0], script, *command[1:]), note), ""


def warm_entry(command: Sequence[str], path: str | None) -> tuple[WarmEntry | None, str]:
    """How ``command`` runs warm, or why it starts cold (:func:`parse_python_command`, then
    :func:`console_script_entry`)."""
    entry, why = parse_python_command(command)
    if entry is not None or why != "not a Python interpreter":
        return entry, why
    entry, why = console_script_entry(command, path)
    return (entry, "") if entry is not None else (None, f"{command[0]!r} is not a Python interpreter ({why})")


def env_change(old: Mapping[str, str], new: Mapping[str, str]) -> list[str]:
    """Variables that differ between a standby's environment and an attempt's, outside the ``RESUMEKIT_*``
    hand-off a job reads at run time (pure): a non-empty list means the standby's imports may have seen a
    different environment than a fresh start would, so the attempt starts cold."""
    keys = set(old) | set(new)
    return sorted(k for k in keys if old.get(k) != new.get(k) and not k.startswith("RESUMEKIT_"))


@dataclass
class Standby:
    """One standby interpreter."""

    proc: subprocess.Popen
    pump: OutputPump
    ctl: int
    ready: int
    env: dict[str, str]
    spawned: float
    info: dict[str, Any] | None = None
    buf: bytes = b""
    failed: str = ""


class WarmStarter:
    """Keeps at most one standby and turns it into the next attempt.

    Args:
        command: the supervised command.
        enabled: ``--warm`` (False: every start is cold).
        preload: modules to import ahead besides :data:`DEFAULT_PRELOAD`.
        warm_delay: seconds into an attempt after which its standby starts even without a heartbeat.
        pump: makes the output plumbing of a new process (as for the job).
        emit: logs one event (``warm_standby``).
        say: prints one progress line.
        path: the ``PATH`` the command is looked up in.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        enabled: bool,
        preload: Sequence[str],
        warm_delay: float,
        pump: Callable[[], OutputPump],
        emit: Callable[..., Any],
        say: Callable[[str], None],
        path: str | None,
    ):
        self._pump, self._emit, self._say = pump, emit, say
        self.warm_delay = warm_delay
        self.preload = list(dict.fromkeys([*DEFAULT_PRELOAD, *preload]))
        if enabled:
            self.entry, self.cold_reason = warm_entry(command, path)
        else:
            self.entry, self.cold_reason = None, "--no-warm"
        self.standby: Standby | None = None
        #: seconds the last standby took from spawn to ready (measured)
        self.ready_s: float | None = None
        #: seconds the last cold attempt took from its start to its first heartbeat (measured)
        self.cold_startup_s: float | None = None
        self._skipped = False

    @property
    def enabled(self) -> bool:
        """Whether restarts may run warm (still)."""
        return self.entry is not None

    def describe(self) -> str:
        """One line for the start of the run."""
        if self.entry is None:
            return f"warm restart off ({self.cold_reason}): every restart starts a fresh interpreter"
        note = f"; {self.entry.note}" if self.entry.note else ""
        return (
            f"warm restart on: a standby interpreter imports {', '.join(self.preload)} once an attempt reports "
            f"progress, and becomes the next attempt{note}"
        )

    def pids(self) -> list[int]:
        """The standby's pid, if one runs (not the job's: the supervisor must not reap or kill it as a leftover)."""
        return [self.standby.proc.pid] if self.standby is not None else []

    def _disable(self, reason: str) -> None:
        sb = self.standby
        self._emit("warm_standby", status="failed", pid=sb.proc.pid if sb else None, reason=reason)
        self._say(f"warm restart off: {reason}; restarts start a fresh interpreter")
        self.entry, self.cold_reason = None, reason
        self.close()

    def maybe_spawn(self, attempt: int, started: float, now: float, beaten: bool, env: Mapping[str, str]) -> None:
        """Start a standby behind the running attempt once it reported progress (or after ``warm_delay``).

        Args:
            attempt: the running attempt's number.
            started: its start (``time.time()``).
            now: ``time.time()``.
            beaten: it has written its heartbeat.
            env: its environment.
        """
        if self.entry is None or self.standby is not None:
            return
        if not beaten and now - started < self.warm_delay:
            return
        if not standby_worthwhile(self.cold_startup_s, MIN_COLD_STARTUP_S):
            if not self._skipped:
                self._skipped = True
                why = (
                    f"a fresh start of this job beat its heartbeat in {self.cold_startup_s:.2f} s, under "
                    f"{MIN_COLD_STARTUP_S:g} s: a standby would gain it nothing"
                )
                self._emit("warm_standby", status="skipped", reason=why)
                self._say(f"warm restart not used: {why}")
            return
        base = {k: v for k, v in env.items() if k not in PER_ATTEMPT_ENV}
        cwd = os.getcwd()
        ctl_r, ctl_w = os.pipe()
        ready_r, ready_w = os.pipe()
        spec = dict(self.entry.spec(cwd), ctl=ctl_r, ready=ready_w, ppid=os.getpid(), preload=self.preload)
        pump = self._pump()
        try:
            proc = subprocess.Popen(
                [*self.entry.interpreter, "-c", STANDBY_SOURCE, json.dumps(spec)],
                env=base,
                start_new_session=True,
                pass_fds=(ctl_r, ready_w),
                **pump.popen_kwargs(),
            )
        except OSError as e:
            pump.abandon()
            for fd in (ctl_r, ctl_w, ready_r, ready_w):
                os.close(fd)
            self.standby = None
            self._disable(f"the standby could not be started: {e.strerror}")
            return
        pump.start()
        os.close(ctl_r)
        os.close(ready_w)
        os.set_blocking(ready_r, False)
        os.set_blocking(ctl_w, False)
        self.standby = Standby(proc=proc, pump=pump, ctl=ctl_w, ready=ready_r, env=base, spawned=time.monotonic())
        self._emit(
            "warm_standby",
            status="spawned",
            pid=proc.pid,
            behind_attempt=attempt,
            trigger="heartbeat" if beaten else f"warm_delay {self.warm_delay:g} s",
            preload=self.preload,
        )

    def _read_line(self, sb: Standby) -> dict[str, Any] | None:
        """One JSON line from the standby when it has written one (never blocks)."""
        while b"\n" not in sb.buf:
            try:
                chunk = os.read(sb.ready, 65536)
            except BlockingIOError:
                return None
            except OSError:
                chunk = b""
            if not chunk:
                sb.failed = sb.failed or "it exited before it was ready"
                return None
            sb.buf += chunk
            if len(sb.buf) > 1 << 20:
                sb.failed = "it wrote nonsense on its control pipe"
                return None
        line, sb.buf = sb.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            sb.failed = "it wrote nonsense on its control pipe"
            return None
        return msg if isinstance(msg, dict) else None

    def poll(self) -> None:
        """Notice that the standby became ready (logs it); call now and then while an attempt runs."""
        sb = self.standby
        if sb is None or sb.info is not None:
            return
        msg = self._read_line(sb)
        if msg is not None:
            self._on_ready(sb, msg)
        elif sb.failed or sb.proc.poll() is not None:
            self._disable(f"the standby failed before it was ready ({sb.failed or 'it exited'})")

    def _on_ready(self, sb: Standby, msg: dict[str, Any]) -> None:
        if not msg.get("ready"):
            self._disable(f"the standby could not import ahead: {msg.get('error')}")
            return
        sb.info = msg
        self.ready_s = time.monotonic() - sb.spawned
        self._emit(
            "warm_standby",
            status="ready",
            pid=sb.proc.pid,
            ready_s=round(self.ready_s, 3),
            import_s=msg.get("import_s"),
            loaded=msg.get("loaded"),
            skipped=msg.get("skipped"),
            rss_bytes=_rss(sb.proc.pid),
        )

    def take(
        self, env: Mapping[str, str], stopping: Callable[[], bool]
    ) -> tuple[subprocess.Popen, OutputPump, float] | None:
        """Turn the standby into the next attempt: wait (bounded) until it is ready, send it the attempt's
        environment and working directory, wait for its acknowledgement.

        Args:
            env: the attempt's environment.
            stopping: True once the supervisor was asked to stop (no more waiting).

        Returns:
            ``(process, its output pump, seconds waited for readiness)``; None for a cold start (no standby, or it
            failed: then it is killed and warm restart is off).
        """
        sb = self.standby
        if self.entry is None or sb is None:
            return None
        t0 = time.monotonic()
        deadline = t0 + READY_TIMEOUT_S
        while sb.info is None:
            self.poll()
            if self.standby is None:
                return None  # failed (and logged)
            if sb.info is not None:
                break
            if time.monotonic() > deadline or stopping():
                self._disable(f"the standby was not ready within {READY_TIMEOUT_S:g} s")
                return None
            if not wait_for_standby(time.monotonic() - sb.spawned, self.ready_s, self.cold_startup_s):
                # Not a failure: this job starts faster than the standby imports; the next one may be ready.
                self._emit(
                    "warm_standby",
                    status="discarded",
                    pid=sb.proc.pid,
                    reason=f"still importing (ready after ~{self.ready_s:.1f} s; a cold start beat in "
                    f"{self.cold_startup_s:.1f} s)",
                )
                self.close()
                return None
            select.select([sb.ready], [], [], 0.05)
        waited = time.monotonic() - t0
        changed = env_change(sb.env, env)
        if changed:
            # Not a failure of warm restart: this attempt starts cold and a new standby follows it.
            self._emit("warm_standby", status="discarded", pid=sb.proc.pid, reason=f"environment changed: {changed}")
            self.close()
            return None
        payload = (json.dumps({"env": dict(env), "cwd": os.getcwd()}) + "\n").encode()
        deadline = time.monotonic() + ACTIVATE_TIMEOUT_S
        try:
            while payload and time.monotonic() < deadline:
                _, ok, _ = select.select([], [sb.ctl], [], 0.05)
                if ok:
                    payload = payload[os.write(sb.ctl, payload) :]
        except OSError as e:
            self._disable(f"the standby did not take its activation ({e.strerror})")
            return None
        ack = None
        while payload == b"" and ack is None and time.monotonic() < deadline and not sb.failed:
            ack = self._read_line(sb)
            if ack is None:
                select.select([sb.ready], [], [], 0.02)
        if not (ack and ack.get("started")):
            why = (ack or {}).get("error") or sb.failed or f"no acknowledgement within {ACTIVATE_TIMEOUT_S:g} s"
            self._disable(f"the standby did not start the job ({why})")
            return None
        for fd in (sb.ctl, sb.ready):
            os.close(fd)
        self.standby = None
        sb.pump.last_output = time.time()
        return sb.proc, sb.pump, waited

    def close(self) -> None:
        """Kill the standby, if any (its whole session), and stop passing its output through."""
        sb, self.standby = self.standby, None
        if sb is None:
            return
        if sb.proc.poll() is None:
            kill_tree(sb.proc.pid)
        try:
            sb.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL of a process stuck in the kernel
            pass
        for fd in (sb.ctl, sb.ready):
            try:
                os.close(fd)
            except OSError:
                pass
        sb.pump.close(drain_s=0.2)


def _rss(pid: int) -> int | None:
    """Resident memory of ``pid`` in bytes (Linux ``/proc``); None where unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


__all__ = [
    "DEFAULT_PRELOAD",
    "PER_ATTEMPT_ENV",
    "STANDBY_SOURCE",
    "WarmEntry",
    "WarmStarter",
    "console_script_entry",
    "env_change",
    "parse_python_command",
    "warm_entry",
]
