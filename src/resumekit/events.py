"""The JSONL event log and the heartbeat file, shared by the library and the supervisor. Imports no torch.

Each event is one JSON object on one line (``{"time": ..., "event": "save", "step": 100, ...}``) appended with a
single ``write`` on an ``O_APPEND`` descriptor, so lines from the job and the supervisor never interleave.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Dict, Iterator, List, Optional

EVENTS_FILE = "events.jsonl"
HEARTBEAT_FILE = ".heartbeat"

ENV_RESUME_FROM = "RESUMEKIT_RESUME_FROM"
ENV_RESTART_COUNT = "RESUMEKIT_RESTART_COUNT"
ENV_DIR = "RESUMEKIT_DIR"
ENV_HEARTBEAT = "RESUMEKIT_HEARTBEAT"
ENV_EVENTS = "RESUMEKIT_EVENTS"
ENV_RESUME_MODE = "RESUMEKIT_RESUME"  # "never" when the supervisor runs with --resume never
ENV_LOCAL_TIER = "RESUMEKIT_LOCAL_TIER"


class EventLog:
    """Append-only JSONL log. Failures to log never break training: they are counted and dropped."""

    def __init__(self, path: Optional[str], source: str = "job"):
        self.path = path
        self.source = source
        self.dropped = 0

    @classmethod
    def for_dir(cls, directory: Optional[str], source: str = "job") -> "EventLog":
        """The log of a local checkpoint directory; ``RESUMEKIT_EVENTS`` overrides (e.g. for remote roots)."""
        path = os.environ.get(ENV_EVENTS)
        if not path and directory and "://" not in directory:
            path = os.path.join(directory, EVENTS_FILE)
        return cls(path, source)

    def emit(self, event: str, **fields: Any) -> Dict[str, Any]:
        rec: Dict[str, Any] = {
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
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError:
            self.dropped += 1
        return rec


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

    def read(self, *, final: bool = False) -> List[Dict[str, Any]]:
        """Records appended since the last read. ``final``: also take an unterminated last line (the writer is
        gone, so a complete JSON object there is a record; a torn one is skipped)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        end = len(data) if final else data.rfind(b"\n") + 1
        self.offset += end
        out: List[Dict[str, Any]] = []
        for raw in data[:end].splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def read_events(path: str) -> List[Dict[str, Any]]:
    """Every well-formed event of a log; a torn last line (killed writer) is skipped."""
    return EventTail(path).read(final=True)


def iter_events(path: str) -> Iterator[Dict[str, Any]]:
    """Every well-formed event of a log, in order."""
    return iter(read_events(path))


class Heartbeat:
    """Touches a file at most every ``interval`` seconds so a supervisor can tell a live job from a hung one.

    The cost per call when not due is one ``time.monotonic()``: cheap enough to call every step.
    """

    def __init__(self, path: Optional[str], interval: float = 1.0):
        self.path = path
        self.interval = interval
        self._last = float("-inf")

    @classmethod
    def from_env(cls, interval: float = 1.0) -> "Heartbeat":
        return cls(os.environ.get(ENV_HEARTBEAT) or None, interval)

    def beat(self, step: Optional[int] = None, force: bool = False) -> None:
        if not self.path:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        try:
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(json.dumps({"time": time.time(), "step": step, "pid": os.getpid()}))
            os.replace(tmp, self.path)
        except OSError:
            pass


def heartbeat_age(path: str, now: Optional[float] = None) -> Optional[float]:
    """Seconds since the last beat, or None when the job never beat."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    return (now if now is not None else time.time()) - mtime
