"""The native format's handler: write and read one checkpoint (``step_N/``) through a storage transaction.

Write order is the commit protocol: tensor file, tree file (each durable on close), then the manifest with their
sizes and checksums, then the backend's commit (rename locally, nothing more on object stores).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..codec import decode_tree, dumps_tree, map_tensors, read_tensors, write_tensors
from ..errors import CheckpointWriteError, CorruptCheckpointError
from ..format import (
    DIST_FILE,
    MAX_TREE_BYTES,
    TENSORS_FILE,
    TREE_FILE,
    FileEntry,
    Manifest,
    new_hasher,
    step_dirname,
)
from ..snapshot import StagedTensors
from ..storage import Storage, Transaction
from ..storage.verified import token_from_env
from ..units import errno_hint, format_bytes
from ..verify import check_checkpoint_raw, read_exact

# Test hook: seconds to pause between the files of a save, so a fault test can SIGKILL a process while a save is
# in progress. Read once; zero in production.
_SAVE_PAUSE = float(os.environ.get("RESUMEKIT_TEST_SAVE_PAUSE", "0") or 0)


@dataclass
class SaveResult:
    step: int
    path: str
    manifest: Manifest
    seconds: float
    #: how the tensor file went to disk: ``"direct"`` (O_DIRECT from the staging image), ``"buffered"`` (page
    #: cache: a synchronous save, or a file system that refuses O_DIRECT) or ``"stream"`` (an object store).
    io: str = "buffered"


def write_checkpoint(
    storage: Storage,
    step: int,
    tree: Any,
    tensors: dict[str, torch.Tensor],
    metadata: Mapping[str, Any] | None = None,
    entries=(),
) -> SaveResult:
    """Persist an encoded state (JSON tree + CPU tensors) as ``step_N`` and commit it.

    Raises:
        CheckpointWriteError: any OS error (ENOSPC, EACCES, ...); nothing partial stays visible.
    """
    t0 = time.perf_counter()
    name = step_dirname(step)
    txn = None
    try:
        # Inside the try: an object store's begin() already sends requests, and their failure is a failed save.
        txn = storage.begin(name)
        files: dict[str, FileEntry] = {}
        h = new_hasher()
        n, io = _write_tensor_file(txn, tensors, h)
        files[TENSORS_FILE] = FileEntry(n, h.hexdigest())
        pause_between_files()
        blob = dumps_tree(tree)
        h = new_hasher()
        h.update(blob)
        with txn.open_write(TREE_FILE) as f:
            f.write(blob)
        files[TREE_FILE] = FileEntry(len(blob), h.hexdigest())
        pause_between_files()
        man = Manifest(step=step, files=files, metadata=dict(metadata or {}), entries=list(entries))
        path = txn.commit(man.to_json())
    except OSError as e:
        if txn is not None:
            txn.abort()
        where = storage.join(name)
        if isinstance(e, CheckpointWriteError):
            raise
        hint = errno_hint(e.errno)
        msg = f"saving step {step} to {where} failed: {e.strerror or e}; {hint}. The previous checkpoint is untouched."
        # Errors without an errno (object-store failures) would otherwise print as "[Errno None] ...".
        raise (CheckpointWriteError(e.errno, msg) if e.errno is not None else CheckpointWriteError(msg)) from e
    except BaseException:
        if txn is not None:
            txn.abort()
        raise
    return SaveResult(step, path, man, time.perf_counter() - t0, io)


def _write_tensor_file(txn: Transaction, tensors: dict[str, torch.Tensor], hasher) -> tuple[int, str]:
    """Write the tensor file; returns its size and how it was written (``SaveResult.io``).

    Staged tensors (an async save) already form the file's image in one aligned buffer: a local transaction writes
    it with ``O_DIRECT`` where it can (hashed on the same buffer meanwhile), any other streams it in chunks. Host
    tensors of a synchronous save are streamed tensor by tensor through the page cache.
    """
    if isinstance(tensors, StagedTensors):
        write_image = getattr(txn, "write_image", None)
        if write_image is not None:
            return tensors.size, write_image(TENSORS_FILE, tensors.image, tensors.size, hasher.update)
        mv = tensors.image[: tensors.size]
        with txn.open_write(TENSORS_FILE) as f:
            for off in range(0, len(mv), _STREAM_CHUNK):
                chunk = mv[off : off + _STREAM_CHUNK]
                hasher.update(chunk)
                f.write(chunk)
        return tensors.size, "stream"
    with txn.open_write(TENSORS_FILE) as f:
        n = write_tensors(f, tensors, hasher)
    return n, ("buffered" if getattr(txn, "write_image", None) is not None else "stream")


_STREAM_CHUNK = 16 << 20


def pause_between_files() -> None:
    """The fault-injection pause (``RESUMEKIT_TEST_SAVE_PAUSE``) between the files of a save; no-op normally."""
    if _SAVE_PAUSE:
        time.sleep(_SAVE_PAUSE)


class _Hasher:
    """xxh3 of a file's bytes unless a verified token vouched for the very file being read (then no hashing)."""

    def __init__(self) -> None:
        self.h = new_hasher()
        self.vouched = False

    def update(self, data: Any) -> None:
        if not self.vouched:
            self.h.update(data)

    def matches(self, digest: str) -> bool:
        return self.vouched or self.h.hexdigest() == digest


def read_checkpoint(
    storage: Storage, name: str, mapped: bool | None = None, *, stats: dict[str, Any] | None = None
) -> tuple[Manifest, Any]:
    """Load ``name`` verifying sizes first and checksums while reading; returns (manifest, decoded tree).

    With ``mapped`` (the default for local storage) tensors are read-only views of a memory map of the file,
    verified before they are returned; pass the tree through :func:`resumekit.codec.materialize` or copy into
    existing tensors before keeping them. Otherwise every tensor is read into its own new memory.

    Under ``resumekit run`` a file the supervisor has just hashed is not hashed again: the token in
    ``RESUMEKIT_VERIFIED`` (:mod:`resumekit.storage.verified`) must name this directory and these manifest bytes,
    and ``fstat`` of the opened file must show the identity it had while the supervisor hashed it. Sizes, caps,
    the tensor header and the tree's decoding are checked as always.

    Args:
        stats: filled with ``verified``: ``"token"`` when every file was vouched for, ``"hashed"`` otherwise,
            and ``hashed_bytes``: the bytes hashed here.

    Raises:
        CorruptCheckpointError: anything missing, truncated, altered or malformed.
    """
    where = storage.join(name)
    # manifest, step, every file's presence and size
    raw, man = check_checkpoint_raw(storage, name, full=False)
    for rel in (TENSORS_FILE, TREE_FILE):
        if rel not in man.files:
            hint = (
                (
                    " (a sharded checkpoint: restore it with CheckpointManager(..., distributed=True) under "
                    "torchrun, or resumekit.distributed.read_sharded)"
                )
                if DIST_FILE in man.files
                else ""
            )
            raise CorruptCheckpointError(where, f"manifest does not list {rel}{hint}")
    directory = storage.local_path(name)
    token = token_from_env()
    if token is not None and (directory is None or not token.matches(directory, raw)):
        token = None
    ent = man.files[TENSORS_FILE]
    h = _Hasher()

    def opened(f: Any) -> None:
        h.vouched = token is not None and token.vouches(TENSORS_FILE, f, ent.size)

    local = storage.local_path(f"{name}/{TENSORS_FILE}")
    if mapped is None:
        mapped = local is not None
    if mapped and local is not None:
        tensors = map_tensors(local, ent.size, f"{where}/{TENSORS_FILE}", h, opened)
    else:
        with storage.open_read(f"{name}/{TENSORS_FILE}") as f:
            opened(f)
            tensors = read_tensors(f, ent.size, f"{where}/{TENSORS_FILE}", h)
    if not h.matches(ent.xxh3):
        raise CorruptCheckpointError(where, f"{TENSORS_FILE} checksum mismatch: the file was altered or damaged")
    tent = man.files[TREE_FILE]
    if tent.size > MAX_TREE_BYTES:
        raise CorruptCheckpointError(
            where, f"{TREE_FILE} has {format_bytes(tent.size)}, more than a state tree may have"
        )
    with storage.open_read(f"{name}/{TREE_FILE}") as f:
        tree_vouched = token is not None and token.vouches(TREE_FILE, f, tent.size)
        blob = read_exact(f, MAX_TREE_BYTES + 1)
    if len(blob) != tent.size:
        raise CorruptCheckpointError(where, f"{TREE_FILE} has {len(blob)} bytes, manifest says {tent.size}")
    if not tree_vouched:
        th = new_hasher()
        th.update(blob)
        if th.hexdigest() != tent.xxh3:
            raise CorruptCheckpointError(where, f"{TREE_FILE} checksum mismatch: the file was altered or damaged")
    if stats is not None:
        stats["verified"] = "token" if h.vouched and tree_vouched else "hashed"
        stats["hashed_bytes"] = (0 if h.vouched else ent.size) + (0 if tree_vouched else tent.size)
    return man, decode_tree(blob, tensors, where, TREE_FILE)


__all__ = ["write_checkpoint", "read_checkpoint", "SaveResult", "pause_between_files"]
