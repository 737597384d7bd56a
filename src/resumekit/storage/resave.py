"""Re-saving a step that already exists without a moment in which the step has no valid copy.

A step is saved again when this run did not produce the directory already there (an invalid one, or a left-over
of a run started with ``resume="never"``). Removing the old copy first and writing the new one after leaves a
window in which a kill loses the step, so the new copy is committed *beside* the old one first and takes its
place only afterwards:

* POSIX with ``renameat2(RENAME_EXCHANGE)`` (ext4, xfs, btrfs, tmpfs): the committed tmp directory and ``step_N``
  swap names in one atomic step; the old copy, now under the tmp name, is removed (discovery ignores it).
* Elsewhere (NFS, object stores): the new copy is committed as ``.keep-step_N-<id>`` (a name discovery and garbage
  collection leave alone), then the old ``step_N`` is removed and the keep copy renamed (object stores: copied,
  manifest last) to ``step_N``. A kill in between leaves the keep copy whole; :func:`recover_resaves`, run by the
  root's one writer (under its lease) before it restores, finishes the swap.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import sys
from typing import Any

from ..errors import CorruptCheckpointError
from ..format import KEEP_PREFIX, MANIFEST, parse_keep_dirname, parse_step_dirname
from ..verify import check_checkpoint
from .base import Storage

log = logging.getLogger("resumekit")

# Fault injection for tests: a comma-separated list of points at which the process SIGKILLs itself
# (``resave-keep-committed``: the keep copy is committed, the old step still there; ``resave-old-removed``: the old
# step is gone, the keep copy not yet renamed; ``resave-exchanged``: after the atomic swap) and ``no-exchange``
# (behave like a file system without RENAME_EXCHANGE). Read once; empty in production.
_FAULTS = frozenset(p for p in os.environ.get("RESUMEKIT_TEST_FAULT", "").split(",") if p)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None  # the libc function once looked up, False where it does not exist


def fault_point(name: str) -> None:
    """Die here (SIGKILL, no cleanup) when the test hook names this point; no-op normally."""
    if name in _FAULTS:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def exchange_dirs(a: str, b: str) -> bool:
    """Atomically swap the names of two existing paths (``renameat2(RENAME_EXCHANGE)``).

    Returns:
        True when swapped; False where the C library or the file system cannot (the caller falls back to a keep
        copy).

    Raises:
        OSError: the swap failed for another reason (permissions, a missing path).
    """
    global _renameat2
    if "no-exchange" in _FAULTS or not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            _renameat2 = False
            return False
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        _renameat2 = fn
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), a)


def promote(storage: Storage, keep: str, name: str) -> None:
    """Put the committed keep copy ``keep`` in place of ``name``: remove ``name``, then rename ``keep`` to it.

    Each step leaves a valid copy: ``keep`` stays whole until the rename (on object stores a copy whose manifest is
    written last, then the source removed manifest first) has made ``name`` valid.
    """
    fault_point("resave-keep-committed")
    storage.remove_tree(name)
    fault_point("resave-old-removed")
    storage.rename(keep, name)


def recover_resaves(storage: Storage) -> list[str]:
    """Finish re-saves a kill interrupted (see the module docstring); only the root's writer may call this.

    A keep copy that passes the quick check replaces its step (it is the newer save); one that does not (its commit
    never finished, or it was already renamed and its removal cut short) is removed.

    Returns:
        The steps whose keep copy was put in place.
    """
    done: list[str] = []
    for e in storage.listdir(""):
        if not e.name.startswith(KEEP_PREFIX):
            continue
        target = parse_keep_dirname(e.name)
        step = parse_step_dirname(target) if target else None
        valid = False
        if target is not None and step is not None and storage.exists(f"{e.name}/{MANIFEST}"):
            try:
                check_checkpoint(storage, e.name, full=False, step=step)
                valid = True
            except (CorruptCheckpointError, OSError) as err:
                log.warning("the interrupted re-save %s is not whole (%s); removing it", storage.join(e.name), err)
        try:
            if valid:
                assert target is not None
                promote(storage, e.name, target)
                log.warning("finished an interrupted re-save: %s now holds the new copy", storage.join(target))
                done.append(target)
            else:
                storage.remove_tree(e.name)
        except OSError as err:
            log.warning("could not finish the interrupted re-save %s: %s", storage.join(e.name), err)
    return done


__all__ = ["exchange_dirs", "promote", "recover_resaves", "fault_point"]
