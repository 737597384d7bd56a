"""resumekit: a training job that dies comes back by itself and continues exactly where it stopped.

The public API is re-exported here. Names are resolved lazily (PEP 562) so that ``import resumekit`` and the
torch-free parts (supervisor, layouts, CLI listing) never import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The one place the version is written: setuptools reads it from here (pyproject.toml, `[tool.setuptools.dynamic]`).
__version__ = "0.1.0"

if TYPE_CHECKING:
    # Type checkers (ours, and users' through py.typed) see the real signatures; at run time the names stay lazy.
    # tests/test_quality_gates.py keeps these imports, `_EXPORTS` and `__all__` naming the same set.
    from .data import ResumableDataLoader, ResumableSampler, seed_everything
    from .errors import (
        CheckpointNotFoundError,
        CheckpointWriteError,
        ConfigError,
        CorruptCheckpointError,
        LeaseHeldError,
        RemoteTransferError,
        ResumekitError,
        StateMismatchError,
        StorageError,
        UnsafeFileError,
        UnsafePathError,
        UnsupportedStateError,
    )
    from .events import EventLog, Heartbeat
    from .layouts import get_layout
    from .layouts.base import CheckpointInfo
    from .manager import CheckpointManager
    from .options import CheckpointOptions
    from .policy import RetentionPolicy, SavePolicy, young_interval
    from .storage import open_storage
    from .supervisor import Supervisor, SupervisorOptions
    from .yamlconfig import resolve_config

_EXPORTS = {
    "CheckpointManager": "manager",
    "CheckpointOptions": "options",
    "SavePolicy": "policy",
    "RetentionPolicy": "policy",
    "young_interval": "policy",
    "Supervisor": "supervisor",
    "SupervisorOptions": "supervisor",
    "resolve_config": "yamlconfig",
    "ResumableSampler": "data",
    "ResumableDataLoader": "data",
    "seed_everything": "data",
    "CheckpointInfo": "layouts.base",
    "get_layout": "layouts",
    "open_storage": "storage",
    "EventLog": "events",
    "Heartbeat": "events",
    "ResumekitError": "errors",
    "CheckpointNotFoundError": "errors",
    "CorruptCheckpointError": "errors",
    "UnsafePathError": "errors",
    "UnsafeFileError": "errors",
    "LeaseHeldError": "errors",
    "UnsupportedStateError": "errors",
    "StateMismatchError": "errors",
    "CheckpointWriteError": "errors",
    "ConfigError": "errors",
    "StorageError": "errors",
    "RemoteTransferError": "errors",
}

# A literal list, so that static tools can read it (a computed one is invisible to them).
__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointOptions",
    "CheckpointWriteError",
    "ConfigError",
    "CorruptCheckpointError",
    "EventLog",
    "Heartbeat",
    "LeaseHeldError",
    "RemoteTransferError",
    "ResumableDataLoader",
    "ResumableSampler",
    "ResumekitError",
    "RetentionPolicy",
    "SavePolicy",
    "StateMismatchError",
    "StorageError",
    "Supervisor",
    "SupervisorOptions",
    "UnsafeFileError",
    "UnsafePathError",
    "UnsupportedStateError",
    "__version__",
    "get_layout",
    "open_storage",
    "resolve_config",
    "seed_everything",
    "young_interval",
]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'resumekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
