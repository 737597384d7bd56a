"""Sharded checkpoints whose durable root is an object store (``s3://``, ``obs://``): staging in the node tier,
per-rank uploads, the manifest-last commit, and fetching a step into a node tier on restore.

DCP writes through a file system, and an object store has no rename, so a save to ``s3://bucket/run`` goes::

    every rank    DCP shards + rank_R/ files -> <node tier>/.tmp-step_N-<id>/  (local disk, fsynced, hashed)
    every rank    uploads ITS OWN files      -> s3://bucket/run/step_N/<file>  (verified while streaming)
    all ranks     all_gather of the reports  (any failure: nothing committed, the prefix removed)
    rank 0        distributed.json, a listing check of every object's size, then manifest.json LAST (the commit)
    tier leaders  the tmp directory becomes the node's tier copy of step_N (missing read files downloaded:
                  :func:`~resumekit.distributed.nodetier.fill_tier_copy`, the copy a shared directory's tier uses)

A kill before the manifest lands leaves ``step_N/`` without a manifest: it never counts as a checkpoint (the
restore plan drops it) and the next writer (the lease holder) removes it and aborts the killed multipart uploads
(:func:`remove_unfinished`).

Restore: a rank whose node tier lacks the agreed step gets it from its node's tier leader, who downloads it from the
object store into the tier (:func:`fetch_step`: verified while streaming, committed manifest last); every rank then
reads locally. At the saved world size only the files the node's ranks read are fetched (the read sets are recorded
in ``distributed.json`` at save time); otherwise the whole step (DCP reshards from it). A tier copy found damaged
when the ranks verify it is discarded and fetched the same way, from an object store or a shared directory
(:mod:`resumekit.checkpointers.dcp_tiers`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import CorruptCheckpointError, StorageError
from ..format import DIST_FILE, MANIFEST, FileEntry, parse_json
from ..storage import Storage
from ..storage.steps import step_dirs
from ..storage.transfer import copy_step, progress_bar, read_manifest_bytes, stream_verified
from ..storage.verified import Vouch
from ..verify import read_verified
from .nodetier import NodeTier, manifest_digest, needed_files

log = logging.getLogger("resumekit")


class _Sink:
    """A write target that keeps nothing: verifying a file is streaming it to nowhere."""

    def write(self, data: Any) -> int:
        return len(data)


def verify_file(st: Storage, name: str, rel: str, ent: FileEntry | None, where: str, vouch: Vouch | None = None) -> int:
    """Check one file of checkpoint ``name`` against its manifest entry (size and xxh3), through the one verified
    streaming loop (:func:`~resumekit.storage.transfer.stream_verified`); returns the bytes hashed.

    A file ``vouch`` covers (the supervisor's token, or this restore's own verified download of it: the same
    identity from ``fstat`` of the descriptor opened here) is not hashed again: 0 is returned.

    Raises:
        CorruptCheckpointError: not listed, or other bytes than listed.
    """
    if ent is None:
        raise CorruptCheckpointError(where, f"the manifest does not list {rel}")
    with st.open_read(f"{name}/{rel}") as fin:
        if vouch is not None and vouch.covers(rel, fin, ent):
            return 0
        return stream_verified(fin, _Sink(), rel, ent, where)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------------- save
def upload_files(
    local_dir: str,
    files: Mapping[str, tuple[int, str]],
    remote: Any,
    prefix: str,
    between: Callable[[], None] | None = None,
) -> None:
    """Upload this rank's own ``files`` (relative path -> (size, xxh3), as hashed after writing) from ``local_dir``
    to ``prefix/`` of the object store ``remote``, each checked against its hash while it streams.

    Every request is bounded and retried by the remote client; a file that fails past its retries raises (its
    multipart upload is aborted), and the caller reports the failure to every rank: nothing is committed.

    Args:
        between: called before each file (the tests' pause hook).
    """
    total = sum(size for size, _ in files.values())
    bar = progress_bar(total, f"upload {prefix}")
    where = remote.join(prefix)
    try:
        for rel in sorted(files):
            if between is not None:
                between()
            size, digest = files[rel]
            with open(os.path.join(local_dir, rel), "rb") as fin, remote.open_object_writer(f"{prefix}/{rel}") as fout:
                stream_verified(fin, fout, rel, FileEntry(size, digest), where, on_chunk=bar.update)
    finally:
        bar.close()


def check_uploaded(remote: Any, prefix: str, files: Mapping[str, FileEntry]) -> None:
    """Before the manifest vouches for them: every listed object is under ``prefix/`` with its size (one listing).

    Raises:
        StorageError: an object is missing or has another size.
    """
    have = remote.list_sizes(prefix)
    for rel, ent in sorted(files.items()):
        if have.get(rel) != ent.size:
            got = "missing" if rel not in have else f"{have[rel]} bytes"
            raise StorageError(f"{remote.join(prefix)}/{rel} is {got} after upload, {ent.size} bytes were sent")


def remove_unfinished(remote: Any) -> list[str]:
    """The lease holder's clean-up of an object-store root: every ``step_N/`` without a manifest (a killed upload:
    the writer lease says no save is in progress) is removed, and the incomplete multipart uploads under the root
    are aborted. Returns what was removed. Failures are logged: what is left never counts and ``gc`` removes it."""
    removed: list[str] = []
    try:
        for _, name in step_dirs(remote):
            if not remote.exists(f"{name}/{MANIFEST}"):
                remote.remove_tree(name)
                removed.append(remote.join(name))
        removed += remote.abort_stale_uploads(0.0)
    except OSError as e:
        log.warning("could not remove unfinished uploads under %s (gc removes them later): %s", remote.uri, e)
    for r in removed:
        log.info("removed an unfinished upload: %s", r)
    return removed


# ----------------------------------------------------------------------------------------------------- restore
def fetch_step(remote: Storage, tier: NodeTier, name: str, digest: str | None, group: Sequence[int], world: int) -> str:
    """Tier leader: download step ``name`` from the shared root ``remote`` (the object store; or a shared
    directory, when the node's copy was found damaged on restore) into the node tier for the ranks ``group``.

    At the world size it was saved with, and when ``distributed.json`` records what every rank reads, only those
    files (a tier copy with ``node.json``, as a save leaves it); otherwise the whole step (a full copy, which any
    world size reads). Every file is verified while it streams; the manifest must be ``digest`` (the agreed one).

    Returns:
        ``"node"`` or ``"full"``: what was fetched.

    Raises:
        CorruptCheckpointError: the step is not the agreed one or its bytes do not match its manifest.
        OSError: the transfer failed past its retries.
    """
    where = remote.join(name)
    raw, man = read_manifest_bytes(remote, name)
    if digest is not None and manifest_digest(raw) != digest:
        raise CorruptCheckpointError(where, "its manifest is not the one agreed on (it changed since)")
    needs: dict[int, list[str]] | None = None
    if DIST_FILE in man.files:
        doc = parse_json(read_verified(remote, name, DIST_FILE, man), where, DIST_FILE)
        doc = doc if isinstance(doc, dict) else {}  # verified bytes, but not necessarily an object: then fetch all
        readers, writers = doc.get("reader_files"), doc.get("writer_files")
        if doc.get("world_size") == world and isinstance(readers, dict) and isinstance(writers, dict):
            needs = {r: needed_files(r, _str_list(readers.get(str(r))), _str_list(writers.get(str(r)))) for r in group}
    if needs is None:
        copy_step(remote, tier.storage, name, desc=f"download {name}")
        return "full"
    tier.keep_step(remote, name, needs, world, retain=False)
    return "node"


def _str_list(v: Any) -> list[str]:
    return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []


__all__ = [
    "verify_file",
    "upload_files",
    "check_uploaded",
    "remove_unfinished",
    "fetch_step",
]
