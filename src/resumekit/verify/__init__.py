"""Torch-free verification: a checkpoint's files against its manifest, chunked hashing, safetensors headers.

Everything that decides "is this checkpoint whole" without loading it lives here, one layer above
:mod:`resumekit.format` and below storage: the engine (before a restore), the distributed path, the tiered storage
(before an upload counts), the HF callback and every layout import it. It reads through any object with the
storage interface's read methods (:class:`Readable`), so it needs no storage backend and no torch. The state
tree's check is in :mod:`.tree`, re-exported here.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, Protocol

from ..errors import CorruptCheckpointError
from ..format import (
    DIST_FILE,
    MANIFEST,
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
from ..units import format_bytes
from .tree import DEVICE_RE, NUMPY_DTYPE_RE, TREE_TAG, TensorTable, check_rng_tree, check_tree

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


class FileIdentity(NamedTuple):
    """What identifies one version of a local file: any write, truncation or replacement changes at least one of
    these (the kernel sets ``ctime`` on every change, and no call can set it back)."""

    size: int
    dev: int
    ino: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_size, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def fd_identity(f: Any) -> FileIdentity | None:
    """The identity of an open file, from ``fstat`` of its own descriptor (never a path: no check-then-use race);
    None for streams without one (object-store reads)."""
    try:
        return FileIdentity.of(os.fstat(f.fileno()))
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return None


@dataclass(frozen=True)
class Hashed:
    """One file :func:`hash_file` read whole while :func:`record_hashed` was on.

    Attributes:
        identity: the file's identity, the same before and after the read (else it was not recorded).
        digest: what its bytes hashed to.
        started_ns: wall clock (``time.time_ns``) when the read began, to tell a file settled before it from one
            that may still have been changing within the file system's timestamp granularity.
    """

    identity: FileIdentity
    digest: str
    started_ns: int


_RECORDED: ContextVar[dict[str, Hashed] | None] = ContextVar("resumekit_hashed", default=None)


@contextlib.contextmanager
def record_hashed() -> Iterator[dict[str, Hashed]]:
    """Within the block, every local file :func:`hash_file` hashes with the default hasher is recorded under its
    full path (``storage.join(rel)``), with its identity and digest: the evidence the supervisor hands the job
    (:mod:`resumekit.storage.verified`) so the job's restore does not hash the same bytes again."""
    seen: dict[str, Hashed] = {}
    token = _RECORDED.set(seen)
    try:
        yield seen
    finally:
        _RECORDED.reset(token)


def recording() -> bool:
    """Whether :func:`record_hashed` is on in this context."""
    return _RECORDED.get() is not None


def note_hashed(path: str, hashed: Hashed) -> None:
    """Inside :func:`record_hashed`, record a file whose bytes were hashed by other means than :func:`hash_file`
    (a verified copy hashes what it writes); no-op outside."""
    seen = _RECORDED.get()
    if seen is not None:
        seen[path] = hashed


def hash_file(storage: Readable, rel: str, hasher: Callable[[], Any] | None = None) -> tuple[int, str]:
    """(size, hex digest) of a stored file, read in large sequential chunks; xxh3-64 unless ``hasher`` makes
    another (e.g. ``hashlib.sha256``). Inside :func:`record_hashed` an xxh3 pass over a local file is recorded."""
    h = (hasher or new_hasher)()
    n = 0
    seen = _RECORDED.get() if hasher is None else None
    with storage.open_read(rel) as f:
        before = fd_identity(f) if seen is not None else None
        started = time.time_ns()
        while True:
            chunk = f.read(HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
        # Recorded only when nothing changed the file while it was read and every byte of it was read.
        if seen is not None and before is not None and fd_identity(f) == before and before.size == n:
            seen[storage.join(rel)] = Hashed(before, h.hexdigest(), started)
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
    return check_checkpoint_raw(storage, name, full, manifest, step)[1]


def check_checkpoint_raw(
    storage: Readable, name: str, full: bool = True, manifest: str = MANIFEST, step: int | None = None
) -> tuple[bytes, Manifest]:
    """:func:`check_checkpoint`, also returning the manifest's raw bytes (what a verified token is bound to)."""
    where = storage.join(name)
    raw, man = read_manifest_bytes(storage, name, manifest)
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
    return raw, man


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
# check_tree and check_rng_tree live in .tree (one concept per module) and are re-exported here.


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
    "FileIdentity",
    "fd_identity",
    "Hashed",
    "record_hashed",
    "note_hashed",
    "recording",
    "check_checkpoint",
    "check_checkpoint_raw",
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
