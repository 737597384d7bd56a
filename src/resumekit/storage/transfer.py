"""Copying one committed native checkpoint between two storages, verified while it streams: the upload and the
download of the tiered storage, and the supervisor's pre-download, all go through :func:`copy_step`.

Imports no torch and nothing above storage: the manifest is read and checked by :mod:`resumekit.verify`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from ..errors import CorruptCheckpointError
from ..format import Manifest, new_hasher
from ..verify import HASH_CHUNK, Hashed, check_step, fd_identity, note_hashed, recording
from ..verify import read_manifest_bytes as verify_read_manifest_bytes
from .base import Storage, Transaction

#: Transfers at least this large get a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = int(float(os.environ.get("RESUMEKIT_PROGRESS_MIN_BYTES", str(256 << 20)) or 0))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar for transfers above :data:`PROGRESS_MIN_BYTES`, on a terminal only (quiet in logs and CI)."""
    if total < max(1, PROGRESS_MIN_BYTES):
        return _NoBar()
    try:
        if not sys.stderr.isatty():
            return _NoBar()
        from tqdm import tqdm
    except (ImportError, AttributeError, ValueError):
        return _NoBar()
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def read_manifest_bytes(storage: Storage, name: str) -> tuple[bytes, Manifest]:
    """The raw manifest of ``name`` and its parsed form; CorruptCheckpointError when missing or malformed, or
    when it names another step than the directory."""
    raw, man = verify_read_manifest_bytes(storage, name)
    check_step(man, name, storage.join(name))
    return raw, man


def stream_verified(
    fin: BinaryIO, fout: BinaryIO, rel: str, ent: Any, where: str, on_chunk: Callable[[int], Any] | None = None
) -> int:
    """Copy ``fin`` to ``fout`` while checking it against its manifest entry (size and xxh3); returns the size.

    Raises:
        CorruptCheckpointError: the bytes are longer, shorter or other than the manifest says (raised before the
            caller commits, so a bad copy is aborted).
    """
    h = new_hasher()
    n = 0
    while True:
        # One byte past the listed size is asked for, so a file longer than listed is noticed.
        chunk = fin.read(min(HASH_CHUNK, ent.size - n + 1))
        if not chunk:
            break
        n += len(chunk)
        if n > ent.size:
            break
        h.update(chunk)
        fout.write(chunk)
        if on_chunk is not None:
            on_chunk(len(chunk))
    if n != ent.size:
        raise CorruptCheckpointError(
            where,
            f"{rel} has {'more than ' if n > ent.size else ''}{n} bytes, manifest says "
            f"{ent.size}" + (" (truncated?)" if n < ent.size else ""),
        )
    if h.hexdigest() != ent.xxh3:
        raise CorruptCheckpointError(
            where,
            f"{rel} checksum mismatch (xxh3 {h.hexdigest()} != {ent.xxh3}): the file was altered or damaged",
        )
    return n


def copy_verified(
    src: Storage,
    src_rel: str,
    txn: Transaction,
    rel: str,
    ent: Any,
    where: str,
    *,
    record: bool = False,
    on_chunk: Callable[[int], Any] | None = None,
) -> Hashed | None:
    """Copy one stored file ``src_rel`` of ``src`` into ``txn`` as ``rel``, checked against its manifest entry
    ``ent`` while it streams (:func:`stream_verified`).

    Args:
        record: return the identity of the file just written (local destinations), so a restore right after this
            copy need not hash the same bytes again (:mod:`resumekit.storage.verified`).

    Returns:
        With ``record``, the written file's identity and checksum (its ``started_ns`` is its last change: just
        written, it has not settled, see :func:`resumekit.storage.verified.settled`); otherwise None.

    Raises:
        CorruptCheckpointError: the source is missing, or its bytes are not the listed ones (raised inside the
            write, so an object-store destination aborts the upload instead of completing it).
    """
    try:
        fin = src.open_read(src_rel)
    except FileNotFoundError:
        raise CorruptCheckpointError(where, f"{rel} is missing") from None
    ident = None
    with fin, txn.open_write(rel) as fout:
        n = stream_verified(fin, fout, rel, ent, where, on_chunk=on_chunk)
        if record:
            fout.flush()  # the identity of the file after its last write
            ident = fd_identity(fout)
    if ident is None or ident.size != n:
        return None
    return Hashed(ident, ent.xxh3, ident.ctime_ns)  # verified equal to the manifest's checksum above


def copy_step(src: Storage, dst: Storage, name: str, *, desc: str = "") -> Manifest:
    """Copy one committed native checkpoint from ``src`` to ``dst`` and commit it there (manifest last).

    Every file is checked against the manifest (size and xxh3) while it streams; a mismatch aborts the copy, so
    ``dst`` never gets a step that does not verify. Inside :func:`resumekit.verify.record_hashed` the files written
    to a local ``dst`` are recorded as hashed (the copy hashed every byte it wrote).

    Raises:
        CorruptCheckpointError: the source is incomplete or damaged (nothing is committed at ``dst``).
        OSError: the transfer failed (for object stores after the retry budget); nothing is committed.
    """
    where = src.join(name)
    raw, man = read_manifest_bytes(src, name)
    bar = progress_bar(man.total_bytes, desc or f"copy {name}")
    txn: Transaction = dst.begin(name)
    written: list[tuple[str, Hashed]] = []
    record = recording() and dst.local_path(name) is not None
    try:
        for rel, ent in sorted(man.files.items()):
            rec = copy_verified(src, f"{name}/{rel}", txn, rel, ent, where, record=record, on_chunk=bar.update)
            if rec is not None:
                written.append((rel, rec))
        txn.commit(raw)
        for rel, rec in written:
            note_hashed(dst.join(f"{name}/{rel}"), rec)
    except BaseException:
        txn.abort()
        raise
    finally:
        bar.close()
    return man


__all__ = ["copy_step", "copy_verified", "stream_verified", "read_manifest_bytes", "progress_bar", "PROGRESS_MIN_BYTES"]
