"""Page-cache control for cold-cache measurements (benchmarks only).

``evict(paths)`` drops the files' pages from the page cache and says how: ``posix_fadvise(POSIX_FADV_DONTNEED)``
after an fsync (works unprivileged for clean pages, touches only these files), checked with ``mincore``; when
pages are still resident afterwards (a file system that ignores the advice) and ``/proc/sys/vm/drop_caches`` is
writable, the whole page cache is dropped instead. ``resident(path)`` is the fraction of a file's pages in memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident(path: str) -> float:
    """Fraction (0..1) of ``path``'s pages in the page cache (mincore on a fresh mapping: nothing is read)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return -1.0
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                return -1.0
            return sum(b & 1 for b in vec.raw) / pages
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def files_under(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]


def evict(paths: list[str]) -> str:
    """Drop ``paths`` (files or directories) from the page cache; returns the method that worked."""
    files = [f for p in paths for f in files_under(p)]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # DONTNEED drops clean pages only
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    left = max((resident(f) for f in files), default=0.0)
    if left <= 0.02:
        return "fadvise_dontneed"
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return "drop_caches"
    except OSError:
        return f"fadvise_dontneed (partial: {left:.0%} still cached)"


def raw_read(path: str, into: memoryview) -> None:
    """Read the whole file into ``into`` (plain buffered reads): the baseline a restore is compared with."""
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < len(into):
            n = f.readinto(into[got:])
            if not n:
                break
            got += n
