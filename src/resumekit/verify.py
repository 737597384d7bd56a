"""Torch-free verification: a checkpoint's files against its manifest, chunked hashing, safetensors headers.

Everything that decides "is this checkpoint whole" without loading it lives here, one layer above
:mod:`resumekit.format` and below storage: the engine (before a restore), the distributed path, the tiered storage
(before an upload counts), the HF callback and every layout import it. It reads through any object with the
storage interface's read methods (:class:`Readable`), so it needs no storage backend and no torch.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from .errors import CorruptCheckpointError
from .format import (
    DIST_FILE,
    MANIFEST,
    MAX_JSON_DEPTH,
    MAX_MANIFEST_BYTES,
    MAX_TREE_BYTES,
    TENSORS_FILE,
    TREE_FILE,
    Manifest,
    new_hasher,
    parse_json,
    parse_step_dirname,
    shorten,
)
from .units import format_bytes

#: read size of every hashing pass: large sequential reads, a bounded buffer
HASH_CHUNK = 8 << 20

#: safetensors dtype code -> bytes per element: the one table (the codec maps the codes to torch dtypes)
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
#: a safetensors header larger than this is certainly garbage (the format itself caps it at 100 MB)
MAX_SAFETENSORS_HEADER = 100_000_000


class Readable(Protocol):
    """The read side of :class:`resumekit.storage.Storage` that verification needs (paths relative to a root)."""

    def join(self, rel: str) -> str: ...

    def size(self, rel: str) -> int: ...

    def open_read(self, rel: str) -> BinaryIO: ...

    def read_bytes(self, rel: str) -> bytes: ...


# --------------------------------------------------------------------------------------------- bounded reads
def read_capped(storage: Readable, rel: str, cap: int, where: str, shown: str) -> bytes:
    """The bytes of a small stored file, refused (never read) when it is larger than ``cap``.

    The size is asked first, so a 1 GiB (sparse) manifest costs one ``stat``, not a gigabyte of memory; reading
    stops at ``cap + 1`` bytes in case the file grew in between.

    Raises:
        FileNotFoundError: the file is missing.
        CorruptCheckpointError: it is larger than ``cap`` (or not a regular file).
    """
    size = storage.size(rel)
    if size > cap:
        raise CorruptCheckpointError(
            where, f"{shown} has {format_bytes(size)}, more than the {format_bytes(cap)} such a file may have"
        )
    with storage.open_read(rel) as f:
        data = read_exact(f, cap + 1)
    if len(data) > cap:
        raise CorruptCheckpointError(where, f"{shown} grew past {format_bytes(cap)} while being read")
    return data


# ------------------------------------------------------------------------------------------------- manifests
def read_manifest_bytes(storage: Readable, name: str, manifest: str = MANIFEST) -> tuple[bytes, Manifest]:
    """The raw bytes of ``name/<manifest>`` and their parsed, validated form (a copy commits the exact bytes)."""
    where = storage.join(name)
    try:
        data = read_capped(storage, f"{name}/{manifest}", MAX_MANIFEST_BYTES, where, manifest)
    except FileNotFoundError:
        raise CorruptCheckpointError(where, f"{manifest} is missing (the save never finished)") from None
    return data, Manifest.from_json(data, where)


def read_manifest(storage: Readable, name: str, manifest: str = MANIFEST) -> Manifest:
    """Load and validate ``name/<manifest>``; a missing or bad one is a CorruptCheckpointError."""
    return read_manifest_bytes(storage, name, manifest)[1]


def check_step(man: Manifest, name: str, where: str, step: int | None = None, said: str = "manifest") -> None:
    """The manifest's step must be the checkpoint's: ``step``, or the one a ``step_N`` directory name says (a
    renamed directory is not trusted)."""
    if step is None:
        step = parse_step_dirname(name.rsplit("/", 1)[-1])
    if step is not None and step != man.step:
        raise CorruptCheckpointError(where, f"{said} says step {man.step} but the directory is step {step}")


def hash_file(storage: Readable, rel: str, hasher: Callable[[], Any] | None = None) -> tuple[int, str]:
    """(size, hex digest) of a stored file, read in large sequential chunks; xxh3-64 unless ``hasher`` makes
    another (e.g. ``hashlib.sha256``)."""
    h = (hasher or new_hasher)()
    n = 0
    with storage.open_read(rel) as f:
        while True:
            chunk = f.read(HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def check_checkpoint(
    storage: Readable, name: str, full: bool = True, manifest: str = MANIFEST, step: int | None = None
) -> Manifest:
    """Verify a checkpoint against its resumekit manifest; raises CorruptCheckpointError with the reason.

    Quick (``full=False``): the manifest parses, its step matches the directory, every listed file exists with
    the listed size. Full: also every file's checksum.

    Args:
        manifest: the manifest's file name (foreign layouts carry ours under another name).
        step: the step the checkpoint must have (default: parsed from a ``step_N`` directory name).
    """
    where = storage.join(name)
    man = read_manifest(storage, name, manifest)
    said = "manifest" if manifest == MANIFEST else manifest
    check_step(man, name, where, step, said)
    listed = "" if manifest == MANIFEST else f" (listed in {manifest})"
    for rel, ent in man.files.items():
        try:
            size = storage.size(f"{name}/{rel}")
        except FileNotFoundError:
            raise CorruptCheckpointError(where, f"{rel} is missing{listed}") from None
        if size != ent.size:
            raise CorruptCheckpointError(where, f"{rel} has {size} bytes, {said} says {ent.size} (truncated?)")
    if full:
        for rel, ent in man.files.items():
            _, digest = hash_file(storage, f"{name}/{rel}")
            if digest != ent.xxh3:
                raise CorruptCheckpointError(
                    where, f"{rel} checksum mismatch (xxh3 {digest} != {ent.xxh3}): the file was altered or damaged"
                )
    return man


def read_verified(storage: Readable, name: str, rel: str, man: Manifest) -> bytes:
    """The bytes of one small listed file of checkpoint ``name``, checked against ``man`` (size and checksum)."""
    where = storage.join(name)
    ent = man.files.get(rel)
    if ent is None:
        raise CorruptCheckpointError(where, f"manifest does not list {rel}")
    if ent.size > MAX_TREE_BYTES:
        raise CorruptCheckpointError(where, f"{rel} is listed with {format_bytes(ent.size)}, too large to read whole")
    try:
        data = read_capped(storage, f"{name}/{rel}", ent.size, where, rel)
    except FileNotFoundError:
        raise CorruptCheckpointError(where, f"{rel} is missing") from None
    h = new_hasher()
    h.update(data)
    if len(data) != ent.size or h.hexdigest() != ent.xxh3:
        raise CorruptCheckpointError(
            where, f"{rel} does not match the manifest (size or checksum): the file was altered or damaged"
        )
    return data


# ----------------------------------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class TensorSpan:
    """One tensor of a safetensors header: dtype code, shape and its byte range in the data area."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end of the file (``read`` may return short on pipes and sockets)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def read_safetensors_header(
    f: BinaryIO, size: int, where: str, shown: str, *, full: bool = True, hasher: Any = None
) -> tuple[list[TensorSpan], int]:
    """Read and check the header of a safetensors file of ``size`` bytes positioned at its start.

    Quick (``full=False``): the header length fits, the header is a JSON object whose ``data_offsets`` are sane,
    and the tensor data ends exactly at the end of the file (what a file cut short cannot satisfy). Full: also
    every shape is non-negative integers, every known dtype's byte count matches its shape, and the ranges tile
    the data area without gaps or overlaps.

    Args:
        f: the file, at offset 0.
        size: the file's size.
        where: the checkpoint (for the error).
        shown: the file's name in messages.
        full: the full check.
        hasher: fed the header bytes (the codec hashes the whole file while reading it).

    Returns:
        The tensors sorted by their position, and the offset where the data area starts.

    Raises:
        CorruptCheckpointError: naming ``shown`` and what is wrong.
    """
    head = read_exact(f, 8)
    if len(head) < 8:
        raise CorruptCheckpointError(
            where, f"{shown} is truncated: {size} bytes, shorter than the 8-byte safetensors header"
        )
    n = int.from_bytes(head, "little")
    if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
        raise CorruptCheckpointError(
            where, f"{shown} is truncated or not safetensors: header length {n} does not fit in its {size} bytes"
        )
    raw = read_exact(f, n)
    if hasher is not None:
        hasher.update(head)
        hasher.update(raw)
    try:
        header = parse_json(raw, where, "header")
    except CorruptCheckpointError as e:
        what = "nested too deeply" if "nested too deeply" in e.reason else "not valid JSON"
        raise CorruptCheckpointError(where, f"{shown} has a damaged safetensors header ({what})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(where, f"{shown} has a damaged safetensors header (the header is not an object)")
    data_size = size - 8 - n
    spans: list[TensorSpan] = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offs = t.get("data_offsets") if isinstance(t, dict) else None
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int for o in offs)
            or offs[0] < 0
            or offs[1] < offs[0]
        ):
            raise CorruptCheckpointError(
                where, f"{shown} has a damaged safetensors header (bad data_offsets for {shorten(repr(name), 80)})"
            )
        shape = t.get("shape")
        dims = tuple(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else None
        if full and dims is None:
            raise CorruptCheckpointError(
                where, f"{shown} has a damaged safetensors header (bad shape for {shorten(repr(name), 80)})"
            )
        if full and dims is not None and any(d < 0 for d in dims):
            raise CorruptCheckpointError(
                where, f"{shown}: tensor {shorten(repr(name), 80)} has a negative dimension {list(dims)}"
            )
        dtype = t.get("dtype")
        spans.append(TensorSpan(name, dtype if isinstance(dtype, str) else "?", dims or (), offs[0], offs[1]))
    end = max((s.end for s in spans), default=0)
    if end != data_size:
        if end > data_size:
            raise CorruptCheckpointError(
                where,
                f"{shown} is truncated: its header describes {end} bytes of tensor data but only {data_size} follow it",
            )
        raise CorruptCheckpointError(where, f"{shown} has {data_size - end} unexpected bytes after its tensor data")
    spans.sort(key=lambda s: (s.begin, s.end))
    if full:
        pos = 0
        for s in spans:
            width = SAFETENSORS_DTYPE_BYTES.get(s.dtype)
            if width is not None:
                count, room, rest, zero = 1, s.end - s.begin, len(s.shape), 0 in s.shape
                for d in s.shape:
                    count *= d
                    rest -= 1
                    if count * width > room and rest and not zero:
                        break  # already too large: a forged shape must not cost a huge multiplication
                if count * width != room:
                    need = f"more than {room}" if rest and count * width > room else str(count * width)
                    raise CorruptCheckpointError(
                        where,
                        f"{shown}: tensor {shorten(repr(s.name), 80)} has {room} bytes, "
                        f"its dtype and shape need {need}",
                    )
            if s.begin != pos:
                raise CorruptCheckpointError(
                    where,
                    f"{shown}: tensor {shorten(repr(s.name), 80)} starts at byte {s.begin}, expected "
                    f"{pos} (overlapping or missing tensor data)",
                )
            pos = s.end
    return spans, 8 + n


# ------------------------------------------------------------------------------------------ the state tree
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


def tensor_table(spans: list[TensorSpan]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A safetensors header's tensors as :data:`TensorTable`."""
    return {s.name: (s.dtype, s.shape) for s in spans}


def check_native_contents(storage: Readable, name: str, man: Manifest) -> None:
    """Check what a native checkpoint holds, beyond sizes and checksums: every tensor file's header and every
    state tree (bounded, well formed, references present, RNG states usable). ``resumekit verify`` and restore run
    this same check, so a checkpoint verify calls valid does not fail halfway through a restore.

    Raises:
        CorruptCheckpointError: naming the file and what is wrong.
    """
    where = storage.join(name)
    pairs = [("", TENSORS_FILE, TREE_FILE)] if TREE_FILE in man.files else []
    if DIST_FILE in man.files:
        pairs += sorted(
            (rel[: -len(TREE_FILE)], rel[: -len(TREE_FILE)] + TENSORS_FILE, rel)
            for rel in man.files
            if rel.endswith("/" + TREE_FILE)
        )
    for _prefix, trel, jrel in pairs:
        table: dict[str, tuple[str, tuple[int, ...]]] | None = None
        if trel in man.files:
            with storage.open_read(f"{name}/{trel}") as f:
                spans, _ = read_safetensors_header(f, man.files[trel].size, where, trel, full=True)
            table = tensor_table(spans)
        if man.files[jrel].size > MAX_TREE_BYTES:
            raise CorruptCheckpointError(
                where, f"{jrel} has {format_bytes(man.files[jrel].size)}, more than a state tree may have"
            )
        data = read_capped(storage, f"{name}/{jrel}", MAX_TREE_BYTES, where, jrel)
        check_tree(parse_json(data, where, jrel), table, where, jrel)


__all__ = [
    "Readable",
    "read_manifest",
    "read_manifest_bytes",
    "check_step",
    "hash_file",
    "check_checkpoint",
    "read_verified",
    "TensorSpan",
    "read_safetensors_header",
    "read_exact",
    "SAFETENSORS_DTYPE_BYTES",
    "MAX_SAFETENSORS_HEADER",
    "HASH_CHUNK",
    "read_capped",
    "check_tree",
    "check_rng_tree",
    "check_native_contents",
    "tensor_table",
    "TensorTable",
    "TREE_TAG",
    "NUMPY_DTYPE_RE",
    "DEVICE_RE",
]
