"""Torch-free verification: a checkpoint's files against its manifest, chunked hashing, safetensors headers.

Everything that decides "is this checkpoint whole" without loading it lives here, one layer above
:mod:`resumekit.format` and below storage: the engine (before a restore), the distributed path, the tiered storage
(before an upload counts), the HF callback and every layout import it. It reads through any object with the
storage interface's read methods (:class:`Readable`), so it needs no storage backend and no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, List, Optional, Protocol, Tuple

from .errors import CorruptCheckpointError
from .format import MANIFEST, Manifest, new_hasher, parse_step_dirname

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


# ------------------------------------------------------------------------------------------------- manifests
def read_manifest_bytes(storage: Readable, name: str, manifest: str = MANIFEST) -> Tuple[bytes, Manifest]:
    """The raw bytes of ``name/<manifest>`` and their parsed, validated form (a copy commits the exact bytes)."""
    where = storage.join(name)
    try:
        data = storage.read_bytes(f"{name}/{manifest}")
    except FileNotFoundError:
        raise CorruptCheckpointError(where, f"{manifest} is missing (the save never finished)") from None
    return data, Manifest.from_json(data, where)


def read_manifest(storage: Readable, name: str, manifest: str = MANIFEST) -> Manifest:
    """Load and validate ``name/<manifest>``; a missing or bad one is a CorruptCheckpointError."""
    return read_manifest_bytes(storage, name, manifest)[1]


def check_step(man: Manifest, name: str, where: str, step: Optional[int] = None, said: str = "manifest") -> None:
    """The manifest's step must be the checkpoint's: ``step``, or the one a ``step_N`` directory name says (a
    renamed directory is not trusted)."""
    if step is None:
        step = parse_step_dirname(name.rsplit("/", 1)[-1])
    if step is not None and step != man.step:
        raise CorruptCheckpointError(where, f"{said} says step {man.step} but the directory is step {step}")


def hash_file(storage: Readable, rel: str, hasher: Optional[Callable[[], Any]] = None) -> Tuple[int, str]:
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
    storage: Readable, name: str, full: bool = True, manifest: str = MANIFEST, step: Optional[int] = None
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
    try:
        data = storage.read_bytes(f"{name}/{rel}")
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
    shape: Tuple[int, ...]
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
) -> Tuple[List[TensorSpan], int]:
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
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CorruptCheckpointError(where, f"{shown} has a damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(where, f"{shown} has a damaged safetensors header (the header is not an object)")
    data_size = size - 8 - n
    spans: List[TensorSpan] = []
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
                where, f"{shown} has a damaged safetensors header (bad data_offsets for {name!r})"
            )
        shape = t.get("shape")
        dims = tuple(shape) if isinstance(shape, list) and all(type(d) is int for d in shape) else None
        if full and dims is None:
            raise CorruptCheckpointError(where, f"{shown} has a damaged safetensors header (bad shape for {name!r})")
        if full and dims is not None and any(d < 0 for d in dims):
            raise CorruptCheckpointError(where, f"{shown}: tensor {name!r} has a negative dimension {list(dims)}")
        spans.append(TensorSpan(name, str(t.get("dtype")), dims or (), offs[0], offs[1]))
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
                count = 1
                for d in s.shape:
                    count *= d
                if count * width != s.end - s.begin:
                    raise CorruptCheckpointError(
                        where,
                        f"{shown}: tensor {s.name!r} has {s.end - s.begin} bytes, "
                        f"its dtype and shape need {count * width}",
                    )
            if s.begin != pos:
                raise CorruptCheckpointError(
                    where,
                    f"{shown}: tensor {s.name!r} starts at byte {s.begin}, expected "
                    f"{pos} (overlapping or missing tensor data)",
                )
            pos = s.end
    return spans, 8 + n


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
]
