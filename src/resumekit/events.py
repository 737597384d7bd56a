"""The JSONL event log and the heartbeat file, shared by the library and the supervisor. Imports no torch.

Each event is one JSON object on one line (``{"time": ..., "event": "save", "step": 100, ...}``) appended with a
single ``write`` on an ``O_APPEND`` descriptor, so lines from the job and the supervisor never interleave. The log
keeps that descriptor open (one ``write`` per event, not an open/append/close, which costs on NFS at every step).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from typing import Any

from .errors import ConfigError

log = logging.getLogger("resumekit")

EVENTS_FILE = "events.jsonl"
HEARTBEAT_FILE = ".heartbeat"

ENV_RESUME_FROM = "RESUMEKIT_RESUME_FROM"
ENV_RESTART_COUNT = "RESUMEKIT_RESTART_COUNT"
ENV_DIR = "RESUMEKIT_DIR"
ENV_HEARTBEAT = "RESUMEKIT_HEARTBEAT"
ENV_EVENTS = "RESUMEKIT_EVENTS"
ENV_RESUME_MODE = "RESUMEKIT_RESUME"  # "never" when the supervisor runs with --resume never
ENV_LOCAL_TIER = "RESUMEKIT_LOCAL_TIER"
ENV_DUMP_SIGNAL = "RESUMEKIT_DUMP_SIGNAL"  # the signal on which the job dumps its stacks (default SIGUSR1)

# Bytes written by saves in this process (checkpoint files, uploads): a blocking save's heartbeat ticker beats only
# while this moves (or for a bounded time without), so a save stuck in I/O still lets the heartbeat go stale.
_io_progress = [0]


def note_progress(nbytes: int = 1) -> None:
    """Record that a save moved ``nbytes`` (called by the writers; one addition, no lock needed)."""
    _io_progress[0] += nbytes


def io_progress() -> int:
    """The save-progress counter (see :func:`note_progress`)."""
    return _io_progress[0]


class EventLog:
    """Append-only JSONL log. Failures to log never break training: they are counted and dropped."""

    def __init__(self, path: str | None, source: str = "job"):
        self.path = path
        self.source = source
        self.dropped = 0
        self._fd: int | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    @classmethod
    def for_dir(cls, directory: str | None, source: str = "job") -> EventLog:
        """The log of a local checkpoint directory; ``RESUMEKIT_EVENTS`` overrides (e.g. for remote roots)."""
        path = os.environ.get(ENV_EVENTS)
        if not path and directory and "://" not in directory:
            path = os.path.join(directory, EVENTS_FILE)
        return cls(path, source)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "time": round(time.time(), 6),
            "event": event,
            "source": self.source,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        rec.update(fields)
        if not self.path:
            return rec
        try:
            line = (json.dumps(rec, default=str, allow_nan=True) + "\n").encode()
        except (TypeError, ValueError, RecursionError):
            self.dropped += 1
            return rec
        if self._pid != os.getpid():  # a forked child: its own lock and descriptor
            self._pid, self._lock, self._fd = os.getpid(), threading.Lock(), None
        with self._lock:
            try:
                if self._fd is None:
                    self._fd = self._open()
                os.write(self._fd, line)
            except OSError:
                self.dropped += 1
                self._close_fd()  # reopened at the next event (the file may have been moved or its disk remounted)
        return rec

    def _open(self) -> int:
        assert self.path is not None
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        # O_NONBLOCK: a FIFO planted under the log's name fails at once (ENXIO) instead of waiting for a reader.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(self.path, flags, 0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(f"{self.path} is not a regular file")
        os.set_blocking(fd, True)
        return fd

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        """Close the log's descriptor (a later event opens it again)."""
        with self._lock:
            self._close_fd()

    def __del__(self) -> None:
        try:
            self._close_fd()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class EventTail:
    """Follows one JSONL file from a byte offset: each :meth:`read` returns the whole records appended since.

    The one reader of every JSONL log in the project (the supervisor's per-attempt view of ``events.jsonl``, the
    demo's progress files, the report). A line not yet ended by ``\n`` (a writer mid-append, or killed) is left
    for the next read; lines that are not JSON objects are skipped.

    Args:
        path: the file; a missing file reads as empty.
        offset: where to start (e.g. the size of the log before an attempt began).
    """

    def __init__(self, path: str, offset: int = 0):
        self.path = path
        self.offset = offset

    @staticmethod
    def size_of(path: str) -> int:
        """The current size of ``path`` (0 when absent): an offset from which to follow only new records."""
        try:
            return os.stat(path).st_size
        except OSError:
            return 0

    def read(self, *, final: bool = False) -> list[dict[str, Any]]:
        """Records appended since the last read. ``final``: also take an unterminated last line (the writer is
        gone, so a complete JSON object there is a record; a torn one is skipped)."""
        try:
            # Regular files only: a FIFO under the log's name must not hang the supervisor.
            flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(self.path, flags)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    return []
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = len(data) if final else data.rfind(b"\n") + 1
        self.offset += end
        out: list[dict[str, Any]] = []
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def read_events(path: str) -> list[dict[str, Any]]:
    """Every well-formed event of a log; a torn last line (killed writer) is skipped."""
    return EventTail(path).read(final=True)


def iter_events(path: str) -> Iterator[dict[str, Any]]:
    """Every well-formed event of a log, in order."""
    return iter(read_events(path))


class Heartbeat:
    """Touches a file at most every ``interval`` seconds so a supervisor can tell a live job from a hung one.

    The cost per call when not due is one ``time.monotonic()``: cheap enough to call every step. While the job
    blocks in a save or a wait, :meth:`ticking` beats from a background thread.

    Attributes:
        extra: fields added to every beat (the manager adds ``dump_signal``: the signal on which the job dumps its
            stacks, so the supervisor sends it only to a job that has such a handler).
    """

    def __init__(self, path: str | None, interval: float = 1.0):
        self.path = path
        self.interval = interval
        self.extra: dict[str, Any] = {}
        self._last = float("-inf")
        self._step: int | None = None
        self._lock = threading.Lock()
        self._ticking = 0

    @classmethod
    def from_env(cls, interval: float = 1.0) -> Heartbeat:
        return cls(os.environ.get(ENV_HEARTBEAT) or None, interval)

    def beat(self, step: int | None = None, force: bool = False, busy: str | None = None) -> None:
        if not self.path:
            return
        if step is not None:
            self._step = step
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        doc: dict[str, Any] = {"time": time.time(), "step": self._step if step is None else step, "pid": os.getpid()}
        doc.update(self.extra)
        if busy:
            doc["busy"] = busy
        with self._lock:
            try:
                tmp = f"{self.path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    f.write(json.dumps(doc))
                os.replace(tmp, self.path)
            except OSError:
                pass

    @contextlib.contextmanager
    def ticking(self, what: str, stall: float = 300.0) -> Iterator[None]:
        """Beat from a background thread while the caller blocks in ``what`` (a save, a wait for one).

        A sync save or a wait for the previous background save may outlast the supervisor's ``--hang-timeout``;
        without beats the job would be killed mid-save on every attempt. The ticker beats only while the save makes
        progress (bytes written, :func:`note_progress`) or for ``stall`` seconds without any, so a save stuck in
        I/O or in a collective still lets the heartbeat go stale and the hang be detected.
        """
        if not self.path or self._ticking:
            yield
            return
        stop = threading.Event()
        period = max(self.interval, 0.05)

        def run() -> None:
            seen, changed = io_progress(), time.monotonic()
            while not stop.wait(period):
                now, p = time.monotonic(), io_progress()
                if p != seen:
                    seen, changed = p, now
                if now - changed <= stall:
                    self.beat(force=True, busy=what)

        t = threading.Thread(target=run, name="resumekit-heartbeat", daemon=True)
        try:
            t.start()
        except RuntimeError:  # at interpreter shutdown (a drain from atexit) no thread can start: no ticker then
            yield
            return
        self._ticking += 1
        try:
            yield
        finally:
            stop.set()
            t.join()
            self._ticking -= 1


def resolve_signal(name: Any) -> int | None:
    """The stack-dump signal: ``"SIGUSR1"``, ``"USR1"``, ``"10"`` or ``10`` -> 10; ``"none"``/``"off"`` -> None.

    Raises:
        ConfigError: not a signal of this platform, or one that cannot dump stacks (KILL, STOP, TERM, INT).
    """
    text = str(name).strip()
    if text.lower() in ("", "none", "off", "0"):
        return None
    if text.isdigit():
        num = int(text)
    else:
        upper = text.upper()
        num = getattr(signal, upper if upper.startswith("SIG") else f"SIG{upper}", None)  # type: ignore[assignment]
    if not isinstance(num, int) or num not in {int(s) for s in signal.valid_signals()}:
        raise ConfigError(f"CheckpointOptions.dump_signal: {name!r} is not a signal here (e.g. SIGUSR1, or 'none')")
    if num in (signal.SIGKILL, signal.SIGSTOP, signal.SIGTERM, signal.SIGINT):
        raise ConfigError(f"CheckpointOptions.dump_signal: {name!r} cannot be used to dump stacks")
    return num


def install_stack_dumps(heartbeat: Heartbeat, signum: int | None) -> int | None:
    """Under ``resumekit run`` (a heartbeat path is set): print every thread's stack on ``signum`` with
    ``faulthandler``, chained to a handler already installed (SLURM's requeue, Lightning's), and announce it in the
    heartbeat (``dump_signal``) so the supervisor sends it only to a job that listens.

    Returns:
        The signal registered, or None (off, not the main thread, or no usable stderr).
    """
    if not heartbeat.path or signum is None or threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signum)
    try:
        # Chaining to SIG_DFL would terminate the process after the dump: chain only to a real handler.
        faulthandler.register(signum, all_threads=True, chain=previous not in (signal.SIG_DFL, signal.SIG_IGN))
    except (ValueError, AttributeError, OSError, RuntimeError) as e:  # no usable stderr (e.g. a notebook)
        log.warning("stack dumps on %s are off: %s", signal.Signals(signum).name, e)
        return None
    heartbeat.extra["dump_signal"] = signum
    return signum


def uninstall_stack_dumps(signum: int | None) -> None:
    """Undo :func:`install_stack_dumps` (the chained handler is put back)."""
    if signum is not None and threading.current_thread() is threading.main_thread():
        faulthandler.unregister(signum)


def heartbeat_age(path: str, now: float | None = None) -> float | None:
    """Seconds since the last beat, or None when the job never beat."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    return (now if now is not None else time.time()) - mtime
