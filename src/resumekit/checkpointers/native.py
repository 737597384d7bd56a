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
from ..storage import Storage
from ..units import errno_hint
from ..verify import check_checkpoint, read_capped

# Test hook: seconds to pause between the files of a save, so a fault test can SIGKILL a process while a save is
# in progress. Read once; zero in production.
_SAVE_PAUSE = float(os.environ.get("RESUMEKIT_TEST_SAVE_PAUSE", "0") or 0)


@dataclass
class SaveResult:
    step: int
    path: str
    manifest: Manifest
    seconds: float


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
        with txn.open_write(TENSORS_FILE) as f:
            n = write_tensors(f, tensors, h)
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
    return SaveResult(step, path, man, time.perf_counter() - t0)


def pause_between_files() -> None:
    """The fault-injection pause (``RESUMEKIT_TEST_SAVE_PAUSE``) between the files of a save; no-op normally."""
    if _SAVE_PAUSE:
        time.sleep(_SAVE_PAUSE)


def read_checkpoint(storage: Storage, name: str, mapped: bool | None = None) -> tuple[Manifest, Any]:
    """Load ``name`` verifying sizes first and checksums while reading; returns (manifest, decoded tree).

    With ``mapped`` (the default for local storage) tensors are read-only views of a memory map of the file,
    verified before they are returned; pass the tree through :func:`resumekit.codec.materialize` or copy into
    existing tensors before keeping them. Otherwise every tensor is read into its own new memory.

    Raises:
        CorruptCheckpointError: anything missing, truncated, altered or malformed.
    """
    where = storage.join(name)
    man = check_checkpoint(storage, name, full=False)  # manifest, step, every file's presence and size
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
    ent = man.files[TENSORS_FILE]
    h = new_hasher()
    local = storage.local_path(f"{name}/{TENSORS_FILE}")
    if mapped is None:
        mapped = local is not None
    if mapped and local is not None:
        tensors = map_tensors(local, ent.size, f"{where}/{TENSORS_FILE}", h)
    else:
        with storage.open_read(f"{name}/{TENSORS_FILE}") as f:
            tensors = read_tensors(f, ent.size, f"{where}/{TENSORS_FILE}", h)
    if h.hexdigest() != ent.xxh3:
        raise CorruptCheckpointError(where, f"{TENSORS_FILE} checksum mismatch: the file was altered or damaged")
    blob = read_capped(storage, f"{name}/{TREE_FILE}", MAX_TREE_BYTES, where, TREE_FILE)
    h = new_hasher()
    h.update(blob)
    if h.hexdigest() != man.files[TREE_FILE].xxh3:
        raise CorruptCheckpointError(where, f"{TREE_FILE} checksum mismatch: the file was altered or damaged")
    return man, decode_tree(blob, tensors, where, TREE_FILE)


__all__ = ["write_checkpoint", "read_checkpoint", "SaveResult", "pause_between_files"]
