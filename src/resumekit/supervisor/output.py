"""Passing the job's stdout and stderr through the supervisor (:class:`OutputPump`), so that silence can be seen.

Hang detection for a job without a heartbeat needs to know when the job last wrote anything, so its two streams
are read by the supervisor and written on, unchanged, to the supervisor's own stdout and stderr. What the job
sees stays as it was: when the supervisor's stream is a terminal the job gets a pseudo-terminal of the same size
(progress bars, colours and line buffering behave as in a terminal), otherwise a pipe (a job whose output was
redirected to a file or a log collector was block-buffered before and still is).

Bounded: one forwarding thread per stream moves at most 64 KiB per read, and only the last few KiB of stderr are
kept (to tell a Python traceback from a silent death). A forwarding thread never holds the supervisor up: when the
job is gone the threads get a moment to drain what is left (a leftover process may keep the streams open), then
they stop and the read ends are closed.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time
from typing import IO, Any

#: bytes of the job's stderr kept for the exit classification (a traceback's last lines)
TAIL_BYTES = 16384
_CHUNK = 65536


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _open_pty_like(stream: Any) -> tuple[int, int] | None:
    """A pseudo-terminal (master, slave) shaped like the terminal ``stream`` is; None when none can be made."""
    try:
        import fcntl
        import pty
        import termios

        master, slave = pty.openpty()
    except (ImportError, OSError):
        return None
    try:
        size = fcntl.ioctl(stream.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
        # No output processing: the bytes the job writes reach the real terminal as written ("\n", not "\r\n").
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
    except (OSError, ValueError, AttributeError):
        pass
    return master, slave


class OutputPump:
    """Forwards one job's stdout and stderr and remembers when it last wrote.

    Use: ``pump = OutputPump(); proc = Popen(cmd, **pump.popen_kwargs()); pump.start()``; then read
    :attr:`last_output` while the job runs, and call :meth:`close` once it has exited.

    Args:
        stdout: where the job's stdout goes (default: ``sys.stdout``).
        stderr: where the job's stderr goes (default: ``sys.stderr``).
    """

    def __init__(self, stdout: IO[Any] | None = None, stderr: IO[Any] | None = None):
        self._sinks = [stdout if stdout is not None else sys.stdout, stderr if stderr is not None else sys.stderr]
        self._read_fds: list[int] = []
        self._child_fds: list[int] = []
        self._threads: list[threading.Thread] = []
        self._tail = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: wall time (``time.time()``) of the job's last output; the start time until it writes
        self.last_output = time.time()
        #: bytes forwarded so far
        self.bytes = 0
        self.mode = "pipe"
        for sink in self._sinks:
            made = _open_pty_like(sink) if _is_tty(sink) else None
            if made is not None:
                self.mode = "pty"
            else:
                made = os.pipe()
            self._read_fds.append(made[0])
            self._child_fds.append(made[1])

    def popen_kwargs(self) -> dict[str, Any]:
        """``stdout``/``stderr`` arguments for ``subprocess.Popen``."""
        return {"stdout": self._child_fds[0], "stderr": self._child_fds[1]}

    def start(self) -> None:
        """Start forwarding; call right after ``Popen`` (the child has its own copies of the write ends)."""
        for fd in self._child_fds:
            os.close(fd)
        self._child_fds = []
        self.last_output = time.time()
        for i, fd in enumerate(self._read_fds):
            t = threading.Thread(
                target=self._forward, args=(fd, self._sinks[i], i == 1), name=f"resumekit-output-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def abandon(self) -> None:
        """Close every descriptor when the job could not be started."""
        for fd in self._child_fds + self._read_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._child_fds, self._read_fds = [], []

    def _forward(self, fd: int, sink: Any, keep_tail: bool) -> None:
        out = getattr(sink, "buffer", None)
        while True:
            # select with a timeout, so close() can stop a thread whose stream a leftover process holds open
            # (closing a descriptor another thread is blocked reading is unsafe: the number may be reused).
            try:
                ready, _, _ = select.select([fd], [], [], 0.2)
            except (OSError, ValueError):
                return
            if not ready:
                if self._stop.is_set():
                    return
                continue
            try:
                data = os.read(fd, _CHUNK)
            except OSError:  # EIO: the pseudo-terminal's last writer is gone
                return
            if not data:
                return
            self.last_output = time.time()
            self.bytes += len(data)
            if keep_tail:
                with self._lock:
                    self._tail += data
                    del self._tail[:-TAIL_BYTES]
            try:
                if out is not None:
                    out.write(data)
                else:
                    sink.write(data.decode("utf-8", "replace"))
                sink.flush()
            except (OSError, ValueError):
                pass  # the supervisor's own output is gone: keep draining so the job never blocks on a full pipe

    def stderr_tail(self) -> str:
        """The last :data:`TAIL_BYTES` of the job's stderr, decoded."""
        with self._lock:
            return bytes(self._tail).decode("utf-8", "replace")

    def close(self, drain_s: float = 2.0) -> None:
        """Wait up to ``drain_s`` for what the job wrote last, then stop forwarding.

        A detached grandchild that still holds the streams open (and was not killed) cannot hold the supervisor
        up: after ``drain_s`` the read ends are closed.
        """
        deadline = time.monotonic() + drain_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        for t in self._threads:
            t.join(2.0)
        if not any(t.is_alive() for t in self._threads):
            for fd in self._read_fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._read_fds = []
        self._threads = []


__all__ = ["OutputPump", "TAIL_BYTES"]
