"""The narrow storage interface every backend implements.

Paths are ``str`` names relative to the storage root (``"step_000000100/manifest.json"``) because a root may be a
remote URI. A checkpoint is written through a :class:`Transaction`: files first, then :meth:`Transaction.commit`
with the manifest bytes. How the commit is made atomic is the backend's strategy: rename for POSIX directories,
manifest-last for object stores.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import BinaryIO


@dataclass(frozen=True)
class Entry:
    """One child of a directory listing."""

    name: str
    is_dir: bool
    size: int = 0
    mtime: float | None = None


class Transaction(abc.ABC):
    """An in-progress checkpoint directory. Nothing of it is visible to discovery until :meth:`commit`."""

    name: str

    @abc.abstractmethod
    def open_write(self, rel: str) -> BinaryIO:
        """A writable binary file inside the checkpoint; it is durable once closed."""

    @abc.abstractmethod
    def commit(self, manifest: bytes) -> str:
        """Write the manifest last and make the checkpoint visible; returns its full path/URI."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Remove whatever was written; never raises."""


class Storage(abc.ABC):
    """A checkpoint root: a local/mounted directory or an object-store prefix."""

    uri: str
    is_local: bool = False

    @abc.abstractmethod
    def join(self, rel: str) -> str:
        """The full path or URI of ``rel`` (for messages and for handing to other tools)."""

    @abc.abstractmethod
    def listdir(self, rel: str = "") -> list[Entry]:
        """Direct children of ``rel``; an empty list when it does not exist."""

    @abc.abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abc.abstractmethod
    def size(self, rel: str) -> int:
        """Size in bytes; FileNotFoundError when missing."""

    @abc.abstractmethod
    def open_read(self, rel: str) -> BinaryIO: ...

    def read_bytes(self, rel: str) -> bytes:
        with self.open_read(rel) as f:
            return f.read()

    @abc.abstractmethod
    def begin(self, name: str) -> Transaction:
        """Start writing checkpoint directory ``name`` (e.g. ``step_000000100``)."""

    @abc.abstractmethod
    def remove_tree(self, rel: str) -> None:
        """Delete a checkpoint directory; a partially deleted one must never look valid."""

    @abc.abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Rename a directory (quarantine); on object stores a copy then delete."""

    @abc.abstractmethod
    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Replace a small file atomically (trackers, markers)."""

    def free_bytes(self) -> int | None:
        """Free space at the root, or None when the backend has no such notion."""
        return None

    def local_path(self, rel: str = "") -> str | None:
        """A local filesystem path for ``rel`` when the backend is local, else None."""
        return None

    def mtime(self, rel: str) -> float | None:
        return None
