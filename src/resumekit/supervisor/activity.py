"""What the supervisor can see of a running job besides its heartbeat: file growth under the checkpoint directory
(:class:`DirActivity`), and how hang detection works for this run (:func:`hang_detection_mode`).

A save that is still writing, whether into resumekit's ``.tmp-`` directory or a framework's ``checkpoint-N/``,
changes sizes and modification times under the checkpoint directory; such a job is busy, not hung, however long
the save takes and whatever its heartbeat says. For the same reason a checkpoint whose files still change is
never moved aside before a start (:func:`still_written`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from ..events import EVENTS_FILE, HEARTBEAT_FILE

#: hang detection modes, as announced at start
MODE_OFF = "off"
MODE_HEARTBEAT = "heartbeat"
MODE_OUTPUT = "output and checkpoint activity"

#: at most this many entries are looked at per scan (a root with more is watched in part)
MAX_ENTRIES = 20000


def hang_detection_mode(hang_timeout: float | None, beats: bool | None) -> str:
    """How hangs are detected: ``off`` without ``--hang-timeout``; ``heartbeat`` once the job has beaten (an
    integration is present); ``output and checkpoint activity`` before that or without one.

    Args:
        hang_timeout: ``SupervisorOptions.hang_timeout``.
        beats: whether the job beats the heartbeat (None: not known yet).

    Returns:
        One of :data:`MODE_OFF`, :data:`MODE_HEARTBEAT`, :data:`MODE_OUTPUT`.
    """
    if not hang_timeout:
        return MODE_OFF
    return MODE_HEARTBEAT if beats else MODE_OUTPUT


def _ours(name: str) -> bool:
    # The supervisor's own files (event log, heartbeat, stack dumps) must not count as the job's activity.
    return (
        name in (EVENTS_FILE, HEARTBEAT_FILE)
        or (name.startswith(HEARTBEAT_FILE + ".") and name.endswith(".tmp"))
        or (name.startswith("hang-") and name.endswith(".txt"))
    )


def tree_signature(root: str, limit: int = MAX_ENTRIES) -> tuple[int, int, int]:
    """``(entries, total bytes, newest mtime in ns)`` of the files and folders under ``root``.

    Any write, a new file, a rename or a removal changes it. The supervisor's own files at the top are left out.

    Args:
        root: the directory.
        limit: the most entries to look at.

    Returns:
        The signature; ``(0, 0, 0)`` for a missing directory.
    """
    count = total = newest = 0
    stack = [(root, True)]
    while stack and count < limit:
        path, top = stack.pop()
        try:
            it = os.scandir(path)
        except OSError:
            continue
        with it:
            for de in it:
                if top and _ours(de.name):
                    continue
                try:
                    st = de.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed while looking
                count += 1
                total += st.st_size
                newest = max(newest, st.st_mtime_ns)
                if de.is_dir(follow_symlinks=False):
                    stack.append((de.path, False))
                if count >= limit:
                    break
    return count, total, newest


def path_signature(path: str) -> tuple[int, int, int]:
    """:func:`tree_signature` of a directory, or ``(1, size, mtime_ns)`` of a single file (``(0, 0, 0)``: gone)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return 0, 0, 0
    if os.path.isdir(path) and not os.path.islink(path):
        count, total, newest = tree_signature(path)
        return count + 1, total, max(newest, st.st_mtime_ns)  # the folder itself: a save just begun is empty
    return 1, st.st_size, st.st_mtime_ns


def still_written(paths: Sequence[str], recent_s: float = 10.0, wait_s: float = 1.0) -> list[str]:
    """Which of ``paths`` are being written right now: changed within ``recent_s`` and again within ``wait_s``.

    Before a start the job is gone, so a half-written checkpoint no longer changes; one that does belongs to a
    writer still alive (another node's job on a shared directory) and must not be moved. Only recently changed
    paths cost the one short wait.

    Args:
        paths: local checkpoint paths (directories or files).
        recent_s: a path last changed longer ago than this is taken as settled without waiting.
        wait_s: how long to watch the recent ones.

    Returns:
        The paths that changed while watched.
    """
    now_ns = time.time_ns()
    before = {p: path_signature(p) for p in paths}
    recent = [p for p, sig in before.items() if sig[0] and now_ns - sig[2] < recent_s * 1e9]
    if not recent:
        return []
    time.sleep(wait_s)
    return [p for p in recent if path_signature(p) != before[p]]


class DirActivity:
    """Notices file activity under a directory by comparing :func:`tree_signature` scans.

    Args:
        root: the directory to watch (None: nothing to watch; :attr:`last_change` stays at the start).
        interval: seconds between two scans.
    """

    def __init__(self, root: str | None, interval: float):
        self.root = root
        self.interval = interval
        self._sig = tree_signature(root) if root else None
        self._next = time.monotonic() + interval
        #: wall time the last change was seen (the start until one is)
        self.last_change = time.time()

    def poll(self) -> float:
        """Scan when due; returns :attr:`last_change`."""
        if self.root is None or time.monotonic() < self._next:
            return self.last_change
        self._next = time.monotonic() + self.interval
        sig = tree_signature(self.root)
        if sig != self._sig:
            self._sig = sig
            self.last_change = time.time()
        return self.last_change


class HangMode:
    """Says how hangs are detected: at the start of the run, and again once the job is seen beating.

    Args:
        ctx: the run's options (``hang_timeout``), paths (``watch_dir``), event log and progress output.
    """

    def __init__(self, ctx: Any):
        self.opts, self.paths, self.log, self.say = ctx.options, ctx.paths, ctx.log, ctx.say
        #: whether the job beats the heartbeat (None: not seen yet)
        self.beats: bool | None = None

    def announce(self) -> None:
        """``hang detection: off`` / ``output and checkpoint activity`` (the mode until the job beats)."""
        timeout = self.opts.hang_timeout
        mode = hang_detection_mode(timeout, self.beats)
        if not timeout:
            line = "hang detection: off (pass --hang-timeout S to restart a job that stops making progress)"
        else:
            watched = self.paths.watch_dir or "no local checkpoint directory"
            line = (
                f"hang detection: {mode} (--hang-timeout {timeout:g} s: no output on stdout/stderr and no file "
                f"growth under {watched}); heartbeat once the job beats RESUMEKIT_HEARTBEAT"
            )
        self.log.emit("hang_detection", mode=mode, hang_timeout=timeout, watch_dir=self.paths.watch_dir)
        self.say(line)

    def note_beat(self, attempt: int) -> None:
        """The job beat the heartbeat: from now on it is judged by it (said once per run)."""
        first = not self.beats
        self.beats = True
        if first and self.opts.hang_timeout:
            self.log.emit("hang_detection", mode=MODE_HEARTBEAT, attempt=attempt, hang_timeout=self.opts.hang_timeout)
            self.say(
                f"hang detection: heartbeat (the job beats RESUMEKIT_HEARTBEAT; --hang-timeout "
                f"{self.opts.hang_timeout:g} s)"
            )


def scan_interval(hang_timeout: float | None, poll_interval: float) -> float:
    """How often the checkpoint directory is scanned: a fifth of the timeout, between the poll interval and 5 s."""
    if not hang_timeout:
        return 5.0
    return min(5.0, max(poll_interval, hang_timeout / 5.0))


__all__ = [
    "DirActivity",
    "HangMode",
    "MAX_ENTRIES",
    "MODE_HEARTBEAT",
    "MODE_OFF",
    "MODE_OUTPUT",
    "hang_detection_mode",
    "path_signature",
    "scan_interval",
    "still_written",
    "tree_signature",
]
