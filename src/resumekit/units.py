"""Small shared vocabulary: byte sizes in and out, one-line error text, what an errno means for a checkpoint.

Ground layer: imports nothing from resumekit but the error types, and no torch.
"""

from __future__ import annotations

import errno as _errno
import os
import re
import stat as _stat

from .errors import ConfigError

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")

#: what the user can do about the OS errors a save or a pre-check meets
_ERRNO_HINTS = {
    _errno.ENOSPC: "the disk is full: free space or lower keep_last",
    _errno.EDQUOT: "the disk quota is exhausted: free space or lower keep_last",
    _errno.EACCES: "permission denied: make the checkpoint directory writable",
    _errno.EPERM: "permission denied: make the checkpoint directory writable",
    _errno.EROFS: "the file system is read-only",
}


def format_bytes(n: float | None, *, sep: str = " ", missing: str = "?") -> str:
    """``1536`` -> ``"1.5 KiB"`` (powers of 1024); ``missing`` for None. ``sep`` goes between number and unit."""
    if n is None:
        return missing
    size = float(n)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{size:.0f}{sep}{unit}" if unit == "B" else f"{size:.1f}{sep}{unit}"
        size /= 1024
    return str(n)  # pragma: no cover - the loop always returns


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"500M"``, ``"10GiB"``, ``"2.5G"``, ``"1TB"``.

    ``K``/``M``/``G``/``T`` with or without ``iB`` are powers of 1024; ``KB``/``MB``/``GB``/``TB`` powers of 1000.

    Raises:
        ConfigError: the text is not a size.
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTkmgt]?)(i?[Bb]?)\s*", str(text))
    if not m or (m.group(3).lower() == "i"):
        raise ConfigError(f"cannot read size {text!r}: use bytes or a unit, e.g. 500M, 10GiB, 1TB")
    num, unit, suffix = float(m.group(1)), m.group(2).upper(), m.group(3)
    power = "KMGT".index(unit) + 1 if unit else 0
    radix = 1000 if (suffix.upper() == "B" and unit) else 1024
    return int(num * radix**power)


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's text folded onto one line and cut to ``limit`` characters (its type when it has none)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def errno_hint(err: int | None, default: str = "check the storage") -> str:
    """What to do about an OS error number met while writing a checkpoint (``default`` for the others)."""
    return _ERRNO_HINTS.get(err or 0, default)


_KINDS = (
    (_stat.S_ISDIR, "a directory"),
    (_stat.S_ISFIFO, "a FIFO (named pipe)"),
    (_stat.S_ISCHR, "a character device"),
    (_stat.S_ISBLK, "a block device"),
    (_stat.S_ISSOCK, "a socket"),
    (_stat.S_ISLNK, "a symlink"),
)


def file_kind(mode: int) -> str:
    """``"a FIFO (named pipe)"``, ``"a directory"``, ...: what a non-regular file is, for messages."""
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: str) -> int:
    """Open ``path`` for reading only if it is a regular file; returns the descriptor (blocking mode).

    ``O_NOFOLLOW`` refuses a symlink in the last component and ``O_NONBLOCK`` makes opening a FIFO or a device
    return at once instead of waiting for a writer, so a hostile file can neither hang the caller nor make it read
    something else; the descriptor's own ``fstat`` decides, so a swap between a check and the open changes nothing.

    Raises:
        IsADirectoryError, OSError: ``path`` is not a regular file (``errno`` ``EINVAL`` with the kind in the text,
            ``ELOOP`` for a symlink), or cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not _stat.S_ISREG(st.st_mode):
            raise OSError(_errno.EINVAL, f"{file_kind(st.st_mode)}, not a regular file", path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


__all__ = ["format_bytes", "parse_size", "one_line", "errno_hint", "file_kind", "open_regular"]
