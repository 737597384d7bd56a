"""What every file check shares: the error it raises, a directory's children by name, path joining, totals."""

from __future__ import annotations

from ...errors import CorruptCheckpointError
from ...storage import Entry, Storage


def fail(where: str, reason: str) -> CorruptCheckpointError:
    """The error every check raises.

    Args:
        where: the checkpoint (its path or URI).
        reason: a sentence naming the file and what is wrong; a layout's ``validate`` shows it to the user.
    """
    return CorruptCheckpointError(where, reason)


def files_of(storage: Storage, rel: str) -> dict[str, Entry]:
    """The direct children of ``rel`` by name (empty when it does not exist)."""
    return {e.name: e for e in storage.listdir(rel)}


def join(*parts: str) -> str:
    """Join storage-relative path parts with ``/``, skipping empty ones (``shown=""`` means the root)."""
    return "/".join(p for p in parts if p)


def sum_sizes(files: dict[str, Entry]) -> int:
    """Total bytes of the plain files among ``files`` (directories count nothing)."""
    return sum(e.size for e in files.values() if not e.is_dir)


def newest_mtime(files: dict[str, Entry], *names: str) -> float | None:
    """The newest modification time among ``names`` (those present in ``files``), None when none is known."""
    times = [files[n].mtime for n in names if n in files and files[n].mtime is not None]
    return max(times) if times else None  # type: ignore[type-var]
