"""Checkpoint layouts: resumekit's own and the frameworks' (HF, Megatron, VeRL, DeepSpeed, Lightning, files).

Every adapter answers the same questions (list, validate, latest, repair); :func:`get_layout` finds one by name and
:func:`detect_layout` guesses it from a directory's contents.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Union

from ..errors import ConfigError
from ..storage import Storage, open_storage
from .base import CheckpointInfo, Layout, RepairResult, choose_latest, newest, order_by_step
from .native import NativeLayout

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


register(NativeLayout())
_extra_layouts_loaded = False


def _load_builtin_layouts() -> None:
    # Foreign layouts register themselves on import; importing them here keeps `get_layout("hf")` working
    # without the caller knowing module names, and a missing optional module never breaks the native path.
    global _extra_layouts_loaded
    if _extra_layouts_loaded:
        return
    _extra_layouts_loaded = True
    import importlib

    for mod in ("hf", "megatron", "verl", "deepspeed", "lightning", "torchfiles"):
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{mod}":
                raise


_load_builtin_layouts()

__all__ = [
    "CheckpointInfo", "Layout", "RepairResult", "NativeLayout", "register", "get_layout", "detect_layout",
    "resolve_layout", "layout_names", "choose_latest", "newest", "order_by_step",
]
