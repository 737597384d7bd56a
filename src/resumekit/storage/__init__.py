"""Storage backends behind one narrow interface; :func:`open_storage` picks one from a path or URI."""

from __future__ import annotations

from .base import Entry, Storage, Transaction
from .local import LocalStorage


def is_remote(uri: str) -> bool:
    """True for ``scheme://`` URIs other than ``file://``."""
    return "://" in uri and not uri.startswith("file://")


def open_storage(uri: str, create: bool = True) -> Storage:
    """A :class:`Storage` for a local path, ``file://`` URI or object-store URI (``s3://bucket/prefix``, or
    ``obs://bucket/prefix`` for Huawei OBS through the same S3 protocol)."""
    if isinstance(uri, Storage):
        return uri
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if is_remote(uri):
        from .remote import RemoteStorage  # fsspec/s3fs imported lazily: local users never need them

        return RemoteStorage(uri, create=create)
    return LocalStorage(uri, create=create)


def open_parent(path: str) -> tuple[Storage, str]:
    """``(storage of the parent, name)`` for a checkpoint path or URI: ``runs/a/step_9`` -> (``runs/a``, ``step_9``).

    How a single checkpoint named by the user (``verify PATH``, ``--resume PATH``, ``read_checkpoint(PATH)``) is
    reached through the storage interface, whose operations are relative to a root. The parent is opened without
    creating it.
    """
    path = str(path).rstrip("/")
    parent, _, name = path.rpartition("/")
    return open_storage(parent or ".", create=False), name


__all__ = ["Entry", "Storage", "Transaction", "LocalStorage", "open_storage", "open_parent", "is_remote"]
