"""resumekit: a training job that dies comes back by itself and continues exactly where it stopped.

The public API is re-exported here. Names are resolved lazily (PEP 562) so that ``import resumekit`` and the
torch-free parts (supervisor, layouts, CLI listing) never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointManager": "manager",
    "CheckpointOptions": "manager",
    "SavePolicy": "policy",
    "RetentionPolicy": "policy",
    "young_interval": "policy",
    "Supervisor": "supervisor",
    "SupervisorOptions": "supervisor",
    "resolve_config": "yamlconfig",
    "ResumableSampler": "data",
    "ResumableDataLoader": "data",
    "CheckpointInfo": "layouts.base",
    "get_layout": "layouts",
    "open_storage": "storage",
    "EventLog": "events",
    "Heartbeat": "events",
    "ResumekitError": "errors",
    "CheckpointNotFoundError": "errors",
    "CorruptCheckpointError": "errors",
    "UnsafePathError": "errors",
    "UnsupportedStateError": "errors",
    "StateMismatchError": "errors",
    "CheckpointWriteError": "errors",
    "ConfigError": "errors",
    "StorageError": "errors",
    "RemoteTransferError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'resumekit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
