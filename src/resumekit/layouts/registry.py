"""The registry of layout adapters: each layout module registers itself when imported; lookup by name or alias,
and detection in registration order."""

from __future__ import annotations

from ..errors import ConfigError
from ..storage import Storage, open_storage
from .base import Layout

_REGISTRY: dict[str, Layout] = {}
_ALIASES: dict[str, str] = {}


def register(layout: Layout, *aliases: str) -> Layout:
    """Add a layout adapter to the registry (later registrations win; detection follows registration order)."""
    _REGISTRY[layout.name] = layout
    for a in aliases:
        _ALIASES[a] = layout.name
    return layout


def layout_names() -> list[str]:
    return list(_REGISTRY) + list(_ALIASES)


def get_layout(name: str) -> Layout:
    """The adapter registered as ``name`` (or one of its aliases)."""
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise ConfigError(f"unknown layout {name!r}; choose one of: auto, {', '.join(sorted(layout_names()))}")
    return _REGISTRY[key]


#: the order in which detection asks the built-in layouts: ours first (a root with ``step_N`` dirs is ours whatever
#: else lies there), then the frameworks whose markers are most specific; layouts registered by others come last,
#: in registration order. Explicit, not import order: a sorted import block must not change what is detected.
DETECTION_ORDER = ("native", "hf", "megatron", "verl", "deepspeed", "lightning", "torchfiles")


def _detection_order() -> list[Layout]:
    rank = {name: i for i, name in enumerate(DETECTION_ORDER)}
    return sorted(_REGISTRY.values(), key=lambda lay: rank.get(lay.name, len(rank)))


def detect_layout(storage: Storage) -> Layout:
    """The first layout (in :data:`DETECTION_ORDER`) whose ``detect`` accepts the root; native when none does."""
    for layout in _detection_order():
        try:
            if layout.detect(storage):
                return layout
        except OSError:
            continue
    return _REGISTRY["native"]


def resolve_layout(storage: Storage | str, name: str | None = "auto") -> Layout:
    st = open_storage(storage, create=False) if isinstance(storage, str) else storage
    if not name or name == "auto":
        return detect_layout(st)
    return get_layout(name)
