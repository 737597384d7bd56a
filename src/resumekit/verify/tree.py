"""The state tree's check: every tagged node of a decoded ``state.json`` well formed, every tensor reference present,
nesting bounded, the RNG states usable by the generators. Torch-free, so ``resumekit verify`` and the supervisor run
the same check a restore runs; re-exported by :mod:`resumekit.verify`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

from ..errors import CorruptCheckpointError
from ..format import MAX_JSON_DEPTH, TREE_FILE, shorten

#: the tag key of :mod:`resumekit.codec`'s JSON tree (kept here so the check needs no torch)
TREE_TAG = "__rk__"
_TAGS = frozenset(
    {"tensor", "ndarray", "float", "npscalar", "dict", "tuple", "bytes", "dtype", "device", "size", "set"}
)
#: numpy dtype strings the codec writes (``obj.dtype.str``); never ``O`` (object arrays would mean pickle)
NUMPY_DTYPE_RE = re.compile(r"^[<>|=]?[biufcmMSUV]\d{1,6}(\[[A-Za-z0-9]{1,8}\])?$")
_TORCH_DTYPE_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_DEVICE_TYPES = (
    "cpu|cuda|mps|xpu|meta|hpu|npu|xla|mtia|privateuseone|ipu|ve|fpga|lazy|vulkan|opengl|opencl|ideep|hip|mkldnn|maia"
)
#: what ``torch.device(...)`` accepts for the device types resumekit may meet
DEVICE_RE = re.compile(rf"^({_DEVICE_TYPES})(:\d{{1,6}})?$")
#: tensor name -> (safetensors dtype code, shape), what a tree's tensor references are checked against
TensorTable = Mapping[str, tuple[str, tuple[int, ...]]]


def _bad(where: str, shown: str, path: list[str], what: str) -> CorruptCheckpointError:
    at = "".join(f"[{shorten(repr(p), 40)}]" for p in path[-6:])
    return CorruptCheckpointError(where, f"{shown}{at}: {what}")


def _check_node(node: dict, tensors: TensorTable | None, where: str, shown: str, path: list[str]) -> list[Any]:
    """Check one tagged node; returns the child nodes still to walk."""
    tag = node.get(TREE_TAG)
    if not isinstance(tag, str) or tag not in _TAGS:
        raise _bad(where, shown, path, f"unknown tag {shorten(repr(tag), 40)}")
    v = node.get("v")
    if tag in ("tensor", "ndarray"):
        k = node.get("k")
        if not isinstance(k, str):
            raise _bad(where, shown, path, f"a {tag} without a tensor name")
        if tensors is not None and k not in tensors:
            raise _bad(where, shown, path, f"refers to tensor {shorten(repr(k), 60)}, which the tensor file lacks")
        if tag == "ndarray":
            dt, shape = node.get("dtype"), node.get("shape")
            if not isinstance(dt, str) or not NUMPY_DTYPE_RE.match(dt):
                raise _bad(where, shown, path, f"numpy dtype {shorten(repr(dt), 40)} is not a plain data type")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise _bad(where, shown, path, "a numpy array with a malformed shape")
        return []
    if tag == "float":
        try:
            float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            raise _bad(where, shown, path, f"float {shorten(repr(v), 40)} is not a number") from None
        return []
    if tag == "npscalar":
        dt = node.get("dtype")
        if not isinstance(dt, str) or not NUMPY_DTYPE_RE.match(dt):
            raise _bad(where, shown, path, f"numpy dtype {shorten(repr(dt), 40)} is not a plain data type")
        return [v]
    if tag == "dict":
        items = node.get("items")
        if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
            raise _bad(where, shown, path, "a dict node whose items are not [key, value] pairs")
        return [x for pair in items for x in pair]
    if tag in ("tuple", "set"):
        if not isinstance(v, list):
            raise _bad(where, shown, path, f"a {tag} node without a list of values")
        return list(v)
    if tag == "bytes":
        try:
            base64.b64decode(v, validate=True)  # type: ignore[arg-type]
        except (TypeError, ValueError, binascii.Error):
            raise _bad(where, shown, path, "bytes that are not base64") from None
        return []
    if tag == "dtype":
        if not isinstance(v, str) or not _TORCH_DTYPE_RE.match(v):
            raise _bad(where, shown, path, f"dtype {shorten(repr(v), 40)} is not a torch dtype name")
        return []
    if tag == "device":
        if not isinstance(v, str) or not DEVICE_RE.match(v):
            raise _bad(where, shown, path, f"device {shorten(repr(v), 40)} is not a device torch knows")
        return []
    # size
    if not isinstance(v, list) or not all(type(d) is int and d >= 0 for d in v):
        raise _bad(where, shown, path, "a torch.Size that is not a list of non-negative integers")
    return []


def check_tree(
    tree: Any, tensors: TensorTable | None, where: str, shown: str = TREE_FILE, *, depth: int = MAX_JSON_DEPTH
) -> None:
    """Check a decoded-JSON state tree before anything is built from it: every tagged node well formed, every
    tensor reference present in the tensor file, nesting at most ``depth`` deep, and the RNG states shaped as the
    generators need. Iterative, torch-free; the same check runs in ``resumekit verify`` and before a restore.

    Args:
        tree: the parsed ``state.json``.
        tensors: the tensor file's table (None: references are not checked).
        where: the checkpoint, for the error.
        shown: the file's name in messages.

    Raises:
        CorruptCheckpointError: naming the file, the path inside it and what is wrong.
    """
    stack: list[tuple[Any, int, list[str]]] = [(tree, 1, [])]
    while stack:
        node, level, path = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        if level > depth:
            raise _bad(where, shown, path, f"nested more than {depth} levels deep")
        if isinstance(node, list):
            stack.extend((c, level + 1, path) for c in node)
        elif TREE_TAG in node:
            stack.extend((c, level + 1, path) for c in _check_node(node, tensors, where, shown, path))
        else:
            stack.extend((c, level + 1, path + [k]) for k, c in node.items())
    if isinstance(tree, dict) and isinstance(tree.get("rng"), (dict, list)):
        check_rng_tree(tree["rng"], tensors, where, shown)


def _untag(node: Any, tag: str) -> Any:
    return node.get("v") if isinstance(node, dict) and node.get(TREE_TAG) == tag else None


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return type(v) is int and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) or _untag(v, "float") is not None


def check_rng_tree(rng: Any, tensors: TensorTable | None, where: str, shown: str = TREE_FILE) -> None:
    """The saved RNG states must be what the generators accept: python's ``(3, 625 words, gauss)``, numpy's
    ``("MT19937", 624 uint32, pos, has_gauss, cached)``, torch's byte tensors. A malformed one is a corrupt
    checkpoint (restoring it would fail after the model was already loaded)."""
    if not isinstance(rng, dict):
        raise CorruptCheckpointError(where, f"{shown}: the RNG state is not a mapping")
    py = rng.get("python")
    if py is not None:
        t = _untag(py, "tuple")
        words = _untag(t[1], "tuple") if isinstance(t, list) and len(t) == 3 else None
        if (
            not isinstance(words, list)
            or t[0] != 3
            or len(words) != 625
            or not all(_is_int(w, 0, 2**32 - 1) for w in words[:624])
            or not _is_int(words[624], 0, 624)
            or not (t[2] is None or _is_number(t[2]))
        ):
            raise CorruptCheckpointError(where, f"{shown}: the python RNG state is malformed")
    npst = rng.get("numpy")
    if npst is not None:
        t = _untag(npst, "tuple")
        key = t[1] if isinstance(t, list) and len(t) == 5 else None
        if (
            not isinstance(key, dict)
            or key.get(TREE_TAG) != "ndarray"
            or t[0] != "MT19937"
            or str(key.get("dtype", ""))[-2:] != "u4"
            or key.get("shape") != [624]
            or not _is_int(t[2], 0, 624)
            or not _is_int(t[3], 0, 1)
            or not _is_number(t[4])
        ):
            raise CorruptCheckpointError(where, f"{shown}: the numpy RNG state is malformed")
    for name in ("torch", "cuda"):
        node = rng.get(name)
        if node is None:
            continue
        refs = node if name == "cuda" and isinstance(node, list) else [node]
        if name == "cuda" and not isinstance(node, list):
            refs = [None]
        for ref in refs:
            k = ref.get("k") if isinstance(ref, dict) and ref.get(TREE_TAG) == "tensor" else None
            spec = tensors.get(k) if tensors is not None and isinstance(k, str) else None
            if k is None or (tensors is not None and (spec is None or spec[0] != "U8" or len(spec[1]) != 1)):
                raise CorruptCheckpointError(where, f"{shown}: the {name} RNG state is not a byte tensor")


__all__ = ["check_tree", "check_rng_tree", "TensorTable", "TREE_TAG", "NUMPY_DTYPE_RE", "DEVICE_RE"]
