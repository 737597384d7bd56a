"""Tensor and state-tree (de)serialisation without pickle.

Tensors go to one file in the safetensors layout (8-byte header length, JSON header, raw bytes), which any
safetensors reader can open; we write and read it ourselves so bytes stream straight between tensors and the file
with the checksum computed on the fly and no extra full copy. Everything else goes to a JSON tree in which
tensors, numpy arrays, tuples, non-string dict keys, bytes and a few scalar types are tagged, so the tree comes back
with the same Python types (optimizer ``state`` keyed by int, ``betas`` as a tuple, numpy RNG state as an array).
"""

from __future__ import annotations

import base64
import json
import math
import mmap
import os
import queue
import struct
import threading
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import CorruptCheckpointError, UnsupportedStateError
from .format import parse_json, shorten
from .units import open_regular
from .verify import DEVICE_RE, NUMPY_DTYPE_RE, check_tree, read_safetensors_header

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_CODES = {v: k for k, v in _DTYPES.items()}
#: torch dtype -> safetensors dtype code
DTYPE_CODES: dict[torch.dtype, str] = dict(_DTYPES)

TAG = "__rk__"  # marker key of tagged JSON nodes; a user dict containing it is stored tagged too
_IO_CHUNK = 64 << 20


# ----------------------------------------------------------------------------------------------- tree encoding
class TreeEncoder:
    """Turns a state tree into a JSON-able tree plus a name -> tensor table.

    Tensors are referenced, not copied: the caller decides whether to write them directly (synchronous save) or
    to snapshot them first (asynchronous save).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.arrays: dict[str, bool] = {}

    def _name(self, path: tuple[str, ...]) -> str:
        base = "/".join(path) or "root"
        name, n = base, 1
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        return name

    def encode(self, obj: Any, path: tuple[str, ...] = ()) -> Any:
        if isinstance(obj, np.generic):  # before float/int: np.float64 subclasses float
            return {TAG: "npscalar", "dtype": obj.dtype.str, "v": self.encode(obj.item(), path)}
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {TAG: "float", "v": repr(obj)}
        if isinstance(obj, torch.Tensor):
            if obj.is_sparse or obj.layout != torch.strided:
                raise UnsupportedStateError(f"state{_fmt(path)}: sparse tensors are not supported; densify it")
            if obj.dtype not in _DTYPES:
                raise UnsupportedStateError(f"state{_fmt(path)}: tensor dtype {obj.dtype} is not supported")
            name = self._name(path)
            self.tensors[name] = obj
            return {TAG: "tensor", "k": name}
        if isinstance(obj, np.ndarray):
            if obj.dtype.hasobject:
                raise UnsupportedStateError(f"state{_fmt(path)}: numpy object arrays cannot be stored safely")
            # Stored as raw bytes: numpy has dtypes torch lacks, and the tag carries dtype and shape back.
            name = self._name(path)
            raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
            self.tensors[name] = torch.from_numpy(raw)
            return {TAG: "ndarray", "k": name, "dtype": obj.dtype.str, "shape": list(obj.shape)}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj) and TAG not in obj:
                return {k: self.encode(v, path + (k,)) for k, v in obj.items()}
            items = []
            for k, v in obj.items():
                if not isinstance(k, (str, int, float, bool, type(None), tuple)):
                    raise UnsupportedStateError(
                        f"state{_fmt(path)}: dict key {k!r} of type {type(k).__name__} cannot be stored"
                    )
                items.append([self.encode(k, path), self.encode(v, path + (str(k),))])
            return {TAG: "dict", "items": items}
        if isinstance(obj, tuple):
            return {TAG: "tuple", "v": [self.encode(v, path + (str(i),)) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, path + (str(i),)) for i, v in enumerate(obj)]
        if isinstance(obj, (bytes, bytearray)):
            return {TAG: "bytes", "v": base64.b64encode(bytes(obj)).decode()}
        if isinstance(obj, torch.dtype):
            return {TAG: "dtype", "v": str(obj).replace("torch.", "")}
        if isinstance(obj, torch.device):
            return {TAG: "device", "v": str(obj)}
        if isinstance(obj, torch.Size):
            return {TAG: "size", "v": list(obj)}
        if isinstance(obj, (set, frozenset)):
            return {TAG: "set", "v": [self.encode(v, path) for v in sorted(obj, key=repr)]}
        raise UnsupportedStateError(
            f"state{_fmt(path)}: cannot store an object of type {type(obj).__module__}.{type(obj).__qualname__} "
            "without pickle; give it state_dict()/load_state_dict() returning tensors and plain values, or leave "
            "it out of the checkpoint state"
        )


def _fmt(path: tuple[str, ...]) -> str:
    return "".join(f"[{p!r}]" for p in path)


def decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :meth:`TreeEncoder.encode`; refuses anything it does not know (no code is ever run).

    Total: every defect of a forged or damaged tree (unknown tags, bad dtypes or devices, sizes that do not match
    the tensor, nesting past the recursion limit) raises ``ValueError`` with a one-line reason, never anything else.
    Callers check the tree first with :func:`resumekit.verify.check_tree`, which bounds its depth.
    """
    try:
        return _decode(node, tensors)
    except ValueError:
        raise
    except (KeyError, TypeError, RuntimeError, OverflowError, IndexError, AttributeError, RecursionError) as e:
        raise ValueError(f"{type(e).__name__}: {shorten(e)}") from None


def _np_dtype(text: Any) -> np.dtype:
    if not isinstance(text, str) or not NUMPY_DTYPE_RE.match(text):
        raise ValueError(f"numpy dtype {shorten(repr(text), 40)} is not a plain data type")
    dt = np.dtype(text)
    if dt.hasobject:
        raise ValueError(f"numpy dtype {text!r} holds Python objects")
    return dt


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    tag = node.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors) for k, v in node.items()}
    if tag == "tensor":
        return tensors[node["k"]]
    if tag == "ndarray":
        raw = tensors[node["k"]].numpy()
        dt, shape = _np_dtype(node["dtype"]), node["shape"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError("a numpy array with a malformed shape")
        count = 1
        for d in shape:
            count *= d
        if raw.dtype != np.uint8 or raw.ndim != 1 or count * dt.itemsize != raw.size:
            raise ValueError(f"numpy array {node['k']!r}: {raw.size} bytes do not hold {shape} of {dt.str}")
        return raw.view(dt).reshape(shape).copy()
    if tag == "float":
        return float(node["v"])
    if tag == "npscalar":
        return _np_dtype(node["dtype"]).type(_decode(node["v"], tensors))
    if tag == "dict":
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in node["items"]}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in node["v"])
    if tag == "bytes":
        return base64.b64decode(node["v"], validate=True)
    if tag == "dtype":
        tdt = getattr(torch, node["v"], None) if isinstance(node["v"], str) else None
        if not isinstance(tdt, torch.dtype):
            raise ValueError(f"unknown dtype {shorten(repr(node['v']), 40)}")
        return tdt
    if tag == "device":
        if not isinstance(node["v"], str) or not DEVICE_RE.match(node["v"]):
            raise ValueError(f"device {shorten(repr(node['v']), 40)} is not a device torch knows")
        return torch.device(node["v"])
    if tag == "size":
        if not isinstance(node["v"], list) or not all(type(d) is int and d >= 0 for d in node["v"]):
            raise ValueError("a torch.Size that is not a list of non-negative integers")
        return torch.Size(node["v"])
    if tag == "set":
        return {_hashable(_decode(v, tensors)) for v in node["v"]}
    raise ValueError(f"unknown tag {shorten(repr(tag), 40)} in state.json")


def decode_tree(blob: bytes, tensors: dict[str, torch.Tensor], where: str, shown: str) -> Any:
    """Parse, check (:func:`resumekit.verify.check_tree`, the check ``resumekit verify`` runs) and decode a stored
    state tree; every defect is a :class:`CorruptCheckpointError` naming ``shown``, never a raw exception.

    Args:
        blob: the JSON bytes (already size-capped and checksummed by the caller).
        tensors: the tensor file's tensors, which the tree refers to by name.
        where: the checkpoint, for the error.
        shown: the file's name in messages.
    """
    doc = parse_json(blob, where, shown)
    table = {k: (DTYPE_CODES.get(t.dtype, "?"), tuple(t.shape)) for k, t in tensors.items()}
    check_tree(doc, table, where, shown)
    try:
        return decode(doc, tensors)
    except ValueError as e:
        raise CorruptCheckpointError(where, f"{shown} does not decode: {e}") from None


def _hashable(v: Any) -> Any:
    return tuple(_hashable(x) for x in v) if isinstance(v, list) else v


def dumps_tree(tree: Any) -> bytes:
    return json.dumps(tree, separators=(",", ":"), allow_nan=False).encode()


# ------------------------------------------------------------------------------------------ safetensors I/O
def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # numpy's stubs declare the buffer protocol (__buffer__) only for Python >= 3.12; ndarray has it at run time.
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def ordered(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Write order: larger element sizes first, so every tensor stays aligned to its element size."""
    return sorted(tensors.items(), key=lambda kv: -kv[1].element_size())


def build_header(items: list[tuple[str, torch.Tensor]]) -> tuple[bytes, int]:
    """The safetensors prefix (length + JSON header padded to 8 bytes) and the data size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "resumekit"}}
    off = 0
    for name, t in items:
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw, off


def write_tensors(f: BinaryIO, tensors: dict[str, torch.Tensor], hasher) -> int:
    """Stream tensors (contiguous CPU) to ``f`` in the safetensors layout; returns bytes written.

    For large states the checksum runs on a helper thread, one chunk behind the writes (xxh3 and file writes both
    release the GIL), so hashing adds next to nothing to the write time.
    """
    items = ordered(tensors)
    prefix, data_size = build_header(items)
    f.write(prefix)
    hasher.update(prefix)
    pipe = _HashPipe(hasher) if data_size >= _PIPELINE_MIN else None
    update = pipe.update if pipe is not None else hasher.update
    try:
        for _, t in items:
            mv = tensor_bytes(t)
            for i in range(0, len(mv), _WRITE_CHUNK):
                chunk = mv[i : i + _WRITE_CHUNK]
                update(chunk)
                f.write(chunk)
    finally:
        if pipe is not None:
            pipe.finish()
    return len(prefix) + data_size


_WRITE_CHUNK = 16 << 20
_PIPELINE_MIN = 64 << 20


class _HashPipe:
    """Feeds chunks to a hasher on a worker thread, in order; ``finish`` waits until all are hashed."""

    def __init__(self, hasher) -> None:
        self._hasher = hasher
        self._queue: queue.Queue = queue.Queue(maxsize=4)  # bounded: never far ahead of the writes
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="resumekit-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            try:
                self._hasher.update(chunk)
            except BaseException as e:  # noqa: BLE001 - re-raised by finish()
                self._error = e

    def update(self, chunk) -> None:
        self._queue.put(chunk)

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


def _readinto_exact(f: BinaryIO, mv: memoryview, where: str) -> None:
    got = 0
    while got < len(mv):
        n = f.readinto(mv[got:])  # type: ignore[attr-defined]  # every binary file has it; typing.BinaryIO omits it
        if not n:
            raise CorruptCheckpointError(where, f"file ends after {got} of {len(mv)} expected bytes (truncated)")
        got += n


def read_header(f: BinaryIO, size: int, where: str, hasher=None) -> tuple[list[tuple[str, dict]], int]:
    """Parse and check a safetensors header; returns entries in file order and the data start.

    The checks are the one parser's (:func:`resumekit.verify.read_safetensors_header`, full); this only maps the
    dtype codes to torch dtypes.

    Args:
        f: the file, at offset 0.
        size: the file's size.
        where: the file's path (its last part names the file in messages).
        hasher: fed the header bytes, when given.

    Returns:
        ``(name, {"dtype", "shape", "begin", "end"})`` for every tensor, sorted by position, and the offset where
        the data area starts.

    Raises:
        CorruptCheckpointError: the header is damaged, lies about the file, or names a dtype torch cannot hold.
    """
    shown = where.rsplit("/", 1)[-1]
    spans, data_start = read_safetensors_header(f, size, where, shown, full=True, hasher=hasher)
    entries = []
    for s in spans:
        dtype = _CODES.get(s.dtype)
        if dtype is None:
            raise CorruptCheckpointError(
                where, f"{shown}: tensor {s.name!r} has an unknown dtype {s.dtype!r} (no torch dtype for it)"
            )
        entries.append((s.name, {"dtype": dtype, "shape": list(s.shape), "begin": s.begin, "end": s.end}))
    return entries, data_start


def read_tensors(
    f: BinaryIO, size: int, where: str, hasher, out: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Read every tensor into its own freshly allocated (or caller-provided) CPU tensor, hashing on the fly.

    Reading straight into the destination with ``readinto`` means one copy from the page cache and no
    intermediate buffer; the caller compares ``hasher`` with the manifest before using anything.
    """
    entries, _ = read_header(f, size, where, hasher)
    result: dict[str, torch.Tensor] = {}
    for name, ent in entries:
        dst = out.get(name) if out else None
        if dst is None or dst.dtype != ent["dtype"] or list(dst.shape) != ent["shape"] or not dst.is_contiguous():
            dst = torch.empty(ent["shape"], dtype=ent["dtype"])
        mv = tensor_bytes(dst)
        for i in range(0, len(mv), _IO_CHUNK):
            chunk = mv[i : i + _IO_CHUNK]
            _readinto_exact(f, chunk, where)
            hasher.update(chunk)
        result[name] = dst
    return result


def map_tensors(
    path: str, size: int, where: str, hasher, opened: Callable[[Any], Any] | None = None
) -> dict[str, torch.Tensor]:
    """Memory-map a local tensor file and return read-only tensors viewing it, after hashing the whole file.

    The restore path for local files: the hash pass reads the page cache in place and each tensor is then copied
    exactly once, into its final home (a model parameter, or a fresh tensor for other state), so a restore costs
    about one read of the bytes. Callers must copy out of these views (see :func:`materialize`): the mapping is
    read-only and goes away with the last view. ``opened`` is called with the open file before anything is read
    (a verified token checks the identity of this very file there, and may then make ``hasher`` a no-op).
    """
    try:
        fd = open_regular(path)
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptCheckpointError(
            where, f"{where.rsplit('/', 1)[-1]} is not a regular file ({e.strerror})"
        ) from None
    with os.fdopen(fd, "rb", buffering=0) as f:
        if opened is not None:
            opened(f)
        entries, data_start = read_header(f, size, where)
        # MAP_POPULATE on a read-only shared mapping pre-faults the page-cache pages without copying them. On a
        # cold file (a restart on another node; a save written with O_DIRECT never entered the cache) those faults
        # read the disk: declared sequential, the kernel reads ahead in larger chunks (a cold 1 GiB file: ~0.65 s
        # against 1.3-2.6 s with the default readahead, in a quick check).
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ)
    hasher.update(mm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": we never write through it
        base = torch.frombuffer(mm, dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    for name, ent in entries:
        begin, end = data_start + ent["begin"], data_start + ent["end"]
        raw = base[begin:end]
        itemsize = torch.empty((), dtype=ent["dtype"]).element_size()
        if begin % itemsize:
            raw = raw.clone()  # a foreign writer may not align tensors; views need element alignment
        out[name] = raw.view(ent["dtype"]).reshape(ent["shape"])
    return out


#: tensors at least this large are copied into the restore's arena (smaller ones: plain clones)
_ARENA_MIN_TENSOR = 1 << 20
_ARENA_ALIGN = 64


def materialize(tree: Any) -> Any:
    """A copy of ``tree`` whose tensors own their memory (copies of mapped or shared views).

    The large CPU tensors are copied into one pre-faulted anonymous mapping (an arena): cloning them one by one
    gets each a fresh ``mmap`` from the C allocator (anything over its 32 MiB threshold) whose pages then fault in
    one 4 KiB page at a time during the copy, which made a restore's cost per GiB grow with the tensors' size. The
    kernel fills the arena in one pass (``MAP_POPULATE``); it lives as long as any tensor in it.
    """
    found: dict[int, torch.Tensor] = {}  # by identity: a tensor listed twice is copied once and stays shared
    _collect_big(tree, found)
    big = list(found.values())
    views: dict[int, torch.Tensor] = {}
    if big:
        offsets, off = [], 0
        for t in big:
            offsets.append(off)
            off += -(-t.numel() * t.element_size() // _ARENA_ALIGN) * _ARENA_ALIGN
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        arena = mmap.mmap(-1, off, flags=flags)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            base = torch.frombuffer(arena, dtype=torch.uint8)
        for t, o in zip(big, offsets, strict=True):
            v = base[o : o + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            v.copy_(t)
            views[id(t)] = v
    return _rebuild(tree, views)


def _collect_big(tree: Any, out: dict[int, torch.Tensor]) -> None:
    if isinstance(tree, torch.Tensor):
        n = tree.numel() * tree.element_size()
        if n >= _ARENA_MIN_TENSOR and tree.device.type == "cpu" and not tree.requires_grad:
            out[id(tree)] = tree
    elif isinstance(tree, dict):
        for v in tree.values():
            _collect_big(v, out)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            _collect_big(v, out)


def _rebuild(tree: Any, views: dict[int, torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        return views[id(tree)] if id(tree) in views else tree.clone()
    if isinstance(tree, dict):
        return {k: _rebuild(v, views) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rebuild(v, views) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_rebuild(v, views) for v in tree)
    return tree
