"""What a torch file's pickle holds, read by walking its opcodes, never by unpickling it.

:func:`pickletools.genops` decodes opcodes and never runs them, so this is safe on untrusted files. The layouts use
:func:`scan_pickle_scalars` to cross-check parallel sizes that DeepSpeed and Megatron record inside their files
against the file names, and :func:`summarize_pickle` to check a file's globals against an allow-list (the callables
unpickling would call) and read its top-level keys: the same verdict in a quick and a full check, without torch.
"""

from __future__ import annotations

import _compat_pickle
import pickletools
import struct
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ...storage import Storage

#: what :func:`scan_pickle_scalars` reports for a key whose value is not an int, bool or None
NOT_SCALAR = Ellipsis

_INT_OPS = ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG")
_STR_OPS = ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8")
_MEMO_OPS = ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE")
#: the largest ``data.pkl`` scanned (it holds the object tree, not the tensor bytes)
MAX_PICKLE_BYTES = 256 << 20


def scan_pickle_scalars(storage: Storage, rel: str, keys: Iterable[str]) -> dict[str, Any]:
    """Read small scalar values stored under string keys in a torch file's pickle, without unpickling it.

    A key string immediately followed by an int, None or bool opcode yields that value, any other value yields
    :data:`NOT_SCALAR` (first occurrence wins).

    Args:
        storage: the checkpoint root.
        rel: the torch file, relative to the root.
        keys: the dictionary keys to look for.

    Returns:
        The keys that were found, with their values; an empty dict when the file cannot be read.
    """
    wanted = set(keys)
    found: dict[str, Any] = {}
    try:
        with storage.open_read(rel) as f, zipfile.ZipFile(f) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names or zf.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
                return found  # a pickle this large is no checkpoint's index of tensors: not read into memory
            data = zf.read(names[0])
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, struct.error, NotImplementedError, RuntimeError):
        return found
    pending: str | None = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _MEMO_OPS:
                continue  # memo bookkeeping sits between a key and its value
            if pending is not None:
                if name in _INT_OPS:
                    # genops gives an int (a bool for INT's 00/01) for these; anything else is no scalar
                    found.setdefault(pending, arg if isinstance(arg, int) else NOT_SCALAR)
                elif name == "NONE":
                    found.setdefault(pending, None)
                elif name in ("NEWTRUE", "NEWFALSE"):
                    found.setdefault(pending, name == "NEWTRUE")
                else:
                    found.setdefault(pending, NOT_SCALAR)
                pending = None
            if name in _STR_OPS and arg in wanted:
                pending = arg
            if len(found) == len(wanted):
                break
    except (ValueError, struct.error, IndexError):
        pass  # a damaged stream just yields what was found before the damage
    return found


# ------------------------------------------------------------------------------------ globals and top-level keys
def _names(module: str, *names: str) -> set[str]:
    return {f"{module}.{n}" for n in names}


# Names as torch spells them, split by whitespace (lists of ~40 short words read better as text than as literals).
_STORAGE_KINDS_TEXT = (
    "BFloat16 Bool Byte Char ComplexDouble ComplexFloat Double Float Half Int Long QInt32 QInt8 QUInt2x4 QUInt4x2 "
    "QUInt8 Short"
)
_TENSOR_KINDS_TEXT = "BFloat16 Bool Byte Char Double Float Half Int Long Short"
_DTYPES_TEXT = (
    "bfloat16 bits16 bits1x8 bits2x4 bits4x2 bits8 bool complex128 complex32 complex64 float16 float32 "
    "float4_e2m1fn_x2 float64 float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu int16 int32 "
    "int64 int8 qint32 qint8 quint2x4 quint4x2 quint8 uint16 uint32 uint64 uint8 "
    "per_channel_affine per_channel_affine_float_qparams per_channel_symmetric per_tensor_affine per_tensor_symmetric"
)
_REBUILDS_TEXT = (
    "_rebuild_device_tensor_from_cpu_tensor _rebuild_device_tensor_from_numpy _rebuild_meta_tensor_no_storage "
    "_rebuild_nested_tensor _rebuild_parameter _rebuild_parameter_with_state _rebuild_qtensor _rebuild_sparse_tensor "
    "_rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_wrapper_subclass"
)
_STORAGE_KINDS = _STORAGE_KINDS_TEXT.split()
_TENSOR_KINDS = _TENSOR_KINDS_TEXT.split()
_SPARSE_KINDS = [k for k in _TENSOR_KINDS if k != "Bool"]
_DTYPES = _DTYPES_TEXT.split() + [f"{p}int{b}" for p in ("", "u") for b in range(1, 8)]
_REBUILDS = _REBUILDS_TEXT.split()

#: What ``torch.load(weights_only=True)`` accepts by default (torch 2.13's ``_get_allowed_globals``), by name, so a
#: check can apply the same rule without importing torch.
TORCH_SAFE_GLOBALS: frozenset[str] = frozenset(
    {
        "_codecs.encode",  # how protocol 2 pickles bytes
        "builtins.bytearray",
        "builtins.complex",
        "builtins.set",
        "collections.Counter",
        "collections.OrderedDict",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "torch._tensor._rebuild_from_type_v2",
    }
    | _names("torch", *(f"{k}Storage" for k in _STORAGE_KINDS), *(f"{k}Tensor" for k in _TENSOR_KINDS), *_DTYPES)
    | _names("torch.cuda", *(f"{k}Storage" for k in _STORAGE_KINDS if not k.startswith("Q")))
    | _names("torch.cuda", *(f"{k}Tensor" for k in _TENSOR_KINDS))
    | _names("torch.sparse", *(f"{k}Tensor" for k in _SPARSE_KINDS))
    | _names("torch.cuda.sparse", *(f"{k}Tensor" for k in _SPARSE_KINDS))
    | _names("torch._utils", *_REBUILDS)
)


@dataclass
class PickleSummary:
    """What a pickle stream references and holds at its top level, read from its opcodes without running them.

    Attributes:
        globals: every global the stream names (``module.qualname``), i.e. every callable unpickling would call.
        top_keys: when the stream's object is a plain dict, its string keys with their values where the value is
            an int, bool, None or string, else :data:`NOT_SCALAR`; None when the object is not a plain dict.
    """

    globals: set[str] = field(default_factory=set)
    top_keys: dict[str, Any] | None = None


class _Root:
    """The object a stream builds when it starts with EMPTY_DICT: the dict whose keys we want."""


_OPAQUE = object()  # any value the walk does not track
_SCALAR_OPS = {"NONE": lambda a: None, "NEWTRUE": lambda a: True, "NEWFALSE": lambda a: False}
_GET_OPS = ("BINGET", "LONG_BINGET", "GET")
_MUTATORS = ("SETITEM", "SETITEMS", "APPEND", "APPENDS", "ADDITEMS", "BUILD")


def read_torch_pickle(storage: Storage, rel: str) -> bytes:
    """The ``data.pkl`` member of a ``torch.save`` zip file (raises OSError/BadZipFile/KeyError when absent)."""
    with storage.open_read(rel) as f, zipfile.ZipFile(f) as zf:
        names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not names:
            raise KeyError("data.pkl")
        size = zf.getinfo(names[0]).file_size
        if size > MAX_PICKLE_BYTES:
            # Bounded memory: the object tree of a checkpoint is small, its tensors live in other members.
            raise ValueError(f"its data.pkl unpacks to {size} bytes, more than a checkpoint's object tree has")
        return zf.read(names[0])


def summarize_pickle(data: bytes) -> PickleSummary:
    """Walk a pickle stream's opcodes (never executing them) and report its globals and top-level dict keys.

    The walk follows the stack effect that :mod:`pickletools` documents for every opcode, tracking only strings,
    small scalars, the memo and the top-level dict, so it costs one pass over ``data`` and runs no code.

    Raises:
        ValueError: the stream is damaged (an unknown opcode, a truncated argument, a stack that does not add up).
    """
    out = PickleSummary()
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    mark = pickletools.markobject
    root: _Root | None = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                module, _, qual = str(arg).partition(" ")
                out.globals.add(canonical_global(module, qual))
            if name in _MEMO_OPS:
                if name == "MEMOIZE":
                    memo[len(memo)] = stack[-1]
                else:
                    memo[arg] = stack[-1]
                continue
            if name in _GET_OPS:
                stack.append(memo.get(arg, _OPAQUE))
                continue
            if name == "MARK":
                stack.append(mark)
                continue
            before = op.stack_before
            below: list[Any] = []
            if mark in before:
                at = len(stack) - 1 - stack[::-1].index(mark)
                sliced = stack[at + 1 :]
                n_below = before.index(mark)
                below = stack[at - n_below : at]
                if len(below) != n_below:
                    raise ValueError(f"{name}: stack underflow")
                del stack[at - n_below :]
                popped = below + sliced
            else:
                n = len(before)
                if n > len(stack):
                    raise ValueError(f"{name}: stack underflow")
                popped = stack[len(stack) - n :] if n else []
                del stack[len(stack) - n :]
            if name == "STACK_GLOBAL":
                module, qual = popped
                ok = isinstance(module, str) and isinstance(qual, str)
                out.globals.add(canonical_global(module, qual) if ok else "?")
            elif name == "OBJ" or name == "EXT1" or name == "EXT2" or name == "EXT4":
                out.globals.add("?")  # a class from the stack, or the extension registry: not checkable by name
            if popped and popped[0] is root and root is not None:
                if name == "SETITEM":
                    _record(out, popped[1], popped[2])
                elif name == "SETITEMS":
                    for k, v in zip(sliced[0::2], sliced[1::2], strict=False):
                        _record(out, k, v)
            if name in _MUTATORS:
                stack.append(popped[0])
            elif name == "DUP":
                stack.extend([popped[0], popped[0]])
            elif name == "EMPTY_DICT" and not stack and root is None:
                root = _Root()
                out.top_keys = {}
                stack.append(root)
            elif name in _STR_OPS or name in _INT_OPS:
                stack.append(arg)
            elif name in _SCALAR_OPS:
                stack.append(_SCALAR_OPS[name](arg))
            else:
                stack.extend(_OPAQUE for _ in op.stack_after)
    except (IndexError, struct.error) as e:
        raise ValueError(str(e) or type(e).__name__) from None
    return out


def canonical_global(module: str, name: str) -> str:
    """``module.name`` as Python 3 resolves it: protocols 0-2 write Python 2 names (``__builtin__.frozenset``), which
    the unpickler maps (``fix_imports``) before importing; an allow-list must see the name that gets imported."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _record(out: PickleSummary, key: Any, value: Any) -> None:
    if isinstance(key, str) and out.top_keys is not None:
        scalar = value is None or isinstance(value, (bool, int, str))
        out.top_keys[key] = value if scalar else NOT_SCALAR
