"""Process trees through psutil: find, signal, kill and reap a job and everything it started.

A training job rarely stays one process: dataloader workers, ``torchrun`` ranks, compile workers and helpers that
call ``setsid`` to leave the job's process group. Killing only the group (or only the pid) leaves those behind,
holding GPU memory and files. The helpers here answer "gone" for a zombie: it no longer runs, even while its
parent has not collected it yet; except :func:`wait_gone` for a zombie that is our own child, which it reaps first
(left unreaped, it would stay a zombie for good).

Linux first; on other systems the subreaper is a no-op and everything else goes through psutil.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import psutil

# prctl(2) option: orphans of our descendants are re-parented to us instead of init.
_PR_SET_CHILD_SUBREAPER = 36
# How long wait_gone sleeps between two looks at the pids.
_POLL_S = 0.02


def children(pid: int | None = None) -> list[int]:
    """Direct children of ``pid`` (default: this process), zombies included; [] when it is gone.

    Args:
        pid: the parent; None for the calling process.

    Returns:
        The children's pids.
    """
    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        return []


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, each parent before its own children; [] when ``pid`` is gone.

    Args:
        pid: the root of the tree (not included in the result).

    Returns:
        The descendants' pids.
    """
    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie.

    Args:
        pid: the process to look at.

    Returns:
        False for a process that is gone or has exited but not been reaped; True when it runs, or when we may not
        look at it (it exists, so it may be running).
    """
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return False
    except psutil.AccessDenied:
        return True


def send_signal(pid: int, sig: int, group: bool = False) -> bool:
    """Send ``sig`` to ``pid`` (or, with ``group``, to the process group ``pid``).

    Args:
        pid: the process, or the process group id when ``group`` is set.
        sig: the signal number; 0 only checks that the target exists.
        group: signal the whole process group.

    Returns:
        True when the signal was delivered; False when the target is gone or not ours.
    """
    try:
        (os.killpg if group else os.kill)(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def set_subreaper(on: bool) -> bool:
    """Become (or stop being) a child subreaper: orphans of our descendants are re-parented to us, not to init,
    so grandchildren that detach (``setsid``, double fork) can still be found and reaped.

    Args:
        on: become a subreaper (True) or stop being one (False).

    Returns:
        True when the kernel accepted it; False off Linux or when prctl fails.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap(pids: Iterable[int]) -> None:
    """Collect exited children among ``pids`` so they do not linger as zombies; never blocks.

    Pids that are not our children, or have not exited, are left alone. Never pass a pid a ``subprocess.Popen``
    still owns: reaping it here would lose its exit status.

    Args:
        pids: candidate pids.
    """
    for p in pids:
        try:
            os.waitpid(p, os.WNOHANG)
        except (ChildProcessError, OSError):
            pass


def wait_gone(
    pids: Sequence[int], *, timeout: float = 5.0, reapable: Callable[[], Iterable[int]] | None = None
) -> list[int]:
    """Wait (bounded) until none of ``pids`` runs, reaping on the way.

    Orphans re-parent to a subreaper only once their parent died, so the reaping goes on until every pid is gone;
    a zombie child of ours that may be reaped counts as gone only once reaped (its other threads may still exit).

    Args:
        pids: the processes to wait for.
        timeout: seconds to wait at most.
        reapable: returns the pids that may be reaped on each look (default: ``pids``).

    Returns:
        The pids still running when the time was up ([] when all are gone).
    """
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        mine = set(reapable() if reapable is not None else left)
        reap(mine)
        # A zombie child of ours is gone only once reaped: a multi-threaded process shows as a zombie while its other
        # threads still exit, and waitpid cannot collect it until they have. Left unreaped it would stay a zombie for
        # good (the next attempt counts it among the children it must not reap), and a zombie still "holds" what is
        # checked by pid (an object-store writer lease names its holder's pid).
        left = [p for p in left if pid_alive(p) or (p in mine and _our_child(p))]
        if left:
            time.sleep(_POLL_S)
    return left


def _our_child(pid: int) -> bool:
    """Whether ``pid`` still exists (a zombie included) as a child of this process."""
    try:
        return psutil.Process(pid).ppid() == os.getpid()
    except psutil.Error:
        return False


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except OSError:
        return False


def kill_tree(root_pid: int, *, timeout: float = 5.0) -> list[int]:
    """SIGKILL ``root_pid``, its process group when it leads one, and every descendant, including those that left
    the group (``setsid``); then wait until all of them are gone.

    The descendants are listed before anything is killed: once a parent dies its children are re-parented and no
    longer found under the root. ``root_pid`` itself is never reaped (a ``subprocess.Popen`` that owns it still
    needs its exit status); it counts as gone once it is a zombie.

    Args:
        root_pid: the top of the tree.
        timeout: seconds to wait at most for the processes to die.

    Returns:
        The pids signalled: ``root_pid`` first, then its descendants.
    """
    tree = descendants(root_pid)
    if _leads_group(root_pid):
        send_signal(root_pid, signal.SIGKILL, group=True)
    send_signal(root_pid, signal.SIGKILL)
    for p in tree:
        send_signal(p, signal.SIGKILL)
    wait_gone([root_pid] + tree, timeout=timeout, reapable=lambda: tree)
    return [root_pid] + tree


def signal_name(sig: int) -> str:
    """``SIGKILL`` for 9; ``signal 99`` for a number with no name.

    Args:
        sig: a signal number.

    Returns:
        Its name.
    """
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


__all__ = [
    "children",
    "descendants",
    "pid_alive",
    "send_signal",
    "set_subreaper",
    "reap",
    "wait_gone",
    "kill_tree",
    "signal_name",
]
