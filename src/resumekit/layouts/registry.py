"""The registry of layout adapters: each layout module registers itself when imported; lookup by name or alias,
and detection in registration order."""

from __future__ import annotations

from typing import Dict, List, Optional, Union

from ..errors import ConfigError
from ..storage import Storage, open_storage
from .base import Layout

_REGISTRY: Dict[str, Layout] = {}
_ALIASES: Dict[str, str] = {}


def register(layout: Layout, *aliases: str) -> Layout:
    """Add a layout adapter to the registry (later registrations win; detection follows registration order)."""
    _REGISTRY[layout.name] = layout
    for a in aliases:
        _ALIASES[a] = layout.name
    return layout


def layout_names() -> List[str]:
    return list(_REGISTRY) + list(_ALIASES)


def get_layout(name: str) -> Layout:
    """The adapter registered as ``name`` (or one of its aliases)."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ConfigError(f"unknown layout {name!r}; choose one of: auto, {', '.join(sorted(layout_names()))}")
    return _REGISTRY[key]


def detect_layout(storage: Storage) -> Layout:
    """The first registered layout whose ``detect`` accepts the root; native when nothing matches."""
    for layout in _REGISTRY.values():
        try:
            if layout.detect(storage):
                return layout
        except OSError:
            continue
    return _REGISTRY["native"]


def resolve_layout(storage: Union[Storage, str], name: Optional[str] = "auto") -> Layout:
    st = open_storage(storage, create=False) if isinstance(storage, str) else storage
    if not name or name == "auto":
        return detect_layout(st)
    return get_layout(name)
