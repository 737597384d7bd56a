"""The resumekit error hierarchy.

Every error subclasses a built-in so callers that already catch ``ValueError`` or ``OSError`` keep working, and every
message names the file or key involved and, where there is one, the fix.
"""

from __future__ import annotations

from typing import Any


class ResumekitError(Exception):
    """Base class of every error raised on purpose by resumekit."""


class CheckpointNotFoundError(ResumekitError, FileNotFoundError):
    """No (valid) checkpoint exists where one was required."""


class CorruptCheckpointError(ResumekitError, ValueError):
    """A checkpoint is incomplete, truncated, altered or otherwise unusable.

    Attributes:
        path: the checkpoint (or file) that failed.
        reason: a short human sentence saying what is wrong.
    """

    def __init__(self, path: str, reason: str):
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class UnsafePathError(CorruptCheckpointError):
    """A manifest names a path outside its checkpoint (``..`` or absolute)."""


class UnsafeFileError(CorruptCheckpointError):
    """A checkpoint file is not a regular file (a FIFO, device, socket or directory), or is a symlink that leads
    out of the checkpoint: it is never opened, so it can neither hang a reader nor leak another file."""


class UnsupportedStateError(ResumekitError, TypeError):
    """The training state holds an object the native format cannot store without pickle."""


class StateMismatchError(ResumekitError, ValueError):
    """The checkpoint does not fit the objects it is being loaded into (keys or shapes differ)."""


class CheckpointWriteError(ResumekitError, OSError):
    """A save failed (disk full, permission denied, ...); the previous checkpoint is untouched."""


class ConfigError(ResumekitError, ValueError):
    """An option or argument has an invalid value."""


class StorageError(ResumekitError, OSError):
    """The storage backend failed in a way retries cannot fix (missing bucket, bad credentials, ...)."""


class RemoteTransferError(ResumekitError, ConnectionError):
    """A remote request kept failing with transient errors (timeouts, 5xx, dropped connections) until its retry
    budget ran out. Unlike :class:`StorageError`, trying again later may succeed."""


class LeaseHeldError(ResumekitError, RuntimeError):
    """Another live process holds the writer lease of a checkpoint root (one writer per run directory).

    Attributes:
        root: the checkpoint root.
        holder: what the lease says about its holder (``pid``, ``host``, ``since``, ...).
    """

    def __init__(self, root: str, holder: dict[str, Any], message: str) -> None:
        self.root = root
        self.holder = holder
        super().__init__(message)
