"""Checkpoint layouts: resumekit's own and the frameworks' (HF, Megatron, VeRL, DeepSpeed, Lightning, files).

Every adapter answers the same questions (list, validate, latest, repair); :func:`get_layout` finds one by name and
:func:`detect_layout` guesses it from a directory's contents.
"""

from __future__ import annotations

# Every adapter registers itself on import; detection order is registry.DETECTION_ORDER, not import order.
from . import (  # noqa: F401
    deepspeed,
    hf,
    lightning,
    megatron,
    native,
    torchfiles,
    verl,
)
from .base import CheckpointInfo, Layout, RepairResult, choose_latest, newest, order_by_step
from .native import NativeLayout

# _REGISTRY and _ALIASES stay importable for tests and plugins that list the adapters.
from .registry import _ALIASES, _REGISTRY, detect_layout, get_layout, layout_names, register, resolve_layout  # noqa: F401

__all__ = [
    "CheckpointInfo",
    "Layout",
    "RepairResult",
    "NativeLayout",
    "register",
    "get_layout",
    "detect_layout",
    "resolve_layout",
    "layout_names",
    "choose_latest",
    "newest",
    "order_by_step",
]
