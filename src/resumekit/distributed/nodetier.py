"""Node-local tiers for sharded checkpoints: each node keeps, for its recent steps, the files its own ranks read.

The durable commit stays in the shared root exactly as without a tier (every rank's shards, rank 0's manifest
last, all ranks agreed). After that commit, the *tier leader* of each node (its lowest rank) copies from the shared
root into the node's own directory the files that the node's ranks will read to restore at the same world size:
each rank's DCP read set (computed with DCP's own load planner from the ``.metadata`` the save just produced, so a
replicated tensor that deduplication put in another rank's file is included), its ``rank_R/`` files, ``.metadata``
and ``distributed.json``. The copy is verified against the manifest while it streams and committed like any local
step (tmp directory, fsync, manifest last, rename), with ``node.json`` saying which rank needs which file::

    <node tier>/step_000000008/
        __1_0.distcp  rank_00001/...  .metadata  distributed.json    the files this node's ranks read
        node.json                     {"world_size": 2, "ranks": {"1": [every file rank 1 reads]}}
        manifest.json                 the shared root's manifest, byte for byte (written last)

Such a step is deliberately *not* a whole checkpoint (``resumekit ls`` on a tier reports its missing files): it is
a cache of the shared step with the same manifest, which is what lets the ranks agree on it. A *whole* copy (no
``node.json``: ``resumekit run --local-tier``'s pre-download, or a restore's fetch at another world size) serves
every rank of the node at any world size. With an object-store root the tier is also where the node's ranks stage
a save before uploading it (:mod:`resumekit.distributed.remote_commit`).

Restore: every rank reports its tier's inventory (step -> xxh3 of its manifest copy, only the steps whose files for
this rank are present at the right size and world size); rank 0 adds the shared root's steps and
:func:`plan_resume` (pure) picks, newest first, the steps every rank can read: from its tier when its copy has the
shared root's manifest, from the shared root otherwise; a step the shared root lacks counts only when every rank
holds it locally with the same manifest. A step only some nodes hold is never chosen, and a tier copy that differs
from the shared step (a re-save after a rollback) is never mixed with it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, CorruptCheckpointError
from ..format import DIST_FILE, MANIFEST, NODE_FILE, TMP_PREFIX, Manifest, new_hasher, parse_json
from ..storage import LocalStorage, Storage
from ..storage.steps import step_dirs
from ..storage.transfer import copy_verified, read_manifest_bytes
from ..verify import Hashed, note_hashed, recording
from .statedict import DCP_METADATA

log = logging.getLogger("resumekit")

#: where a rank reads a step from
LOCAL, SHARED = "local", "shared"


# ------------------------------------------------------------------------------------------------ pure decisions
@dataclass(frozen=True)
class AgreedStep:
    """A step every rank can read, and where each rank reads it from.

    Attributes:
        step: the step.
        digest: xxh3 of its manifest (None when the shared root's manifest could not be read: verifying it will
            then fail with the reason, and the step is skipped like any invalid one).
        sources: per rank, :data:`LOCAL` (its node tier) or :data:`SHARED` (the shared root).
        in_shared: the shared root holds it too (a rank whose tier copy turns out damaged may read it there).
    """

    step: int
    digest: str | None
    sources: tuple[str, ...]
    in_shared: bool = True


def plan_resume(shared: Mapping[int, str | None], local: Sequence[Mapping[int, str]]) -> list[AgreedStep]:
    """The steps every rank can read, newest first (rank 0 proposes this list; every rank then verifies).

    Args:
        shared: the shared root's steps -> xxh3 of their manifest (None: the manifest is unreadable).
        local: per rank, its node tier's steps -> xxh3 of the manifest copy there.

    A rank reads a step from its tier only when its copy has the shared root's manifest; a step the shared root
    lacks (or whose manifest it cannot read) is readable only when every rank holds it locally with one manifest.
    """
    out: list[AgreedStep] = []
    for step in sorted(set(shared) | {s for inv in local for s in inv}, reverse=True):
        digest = shared.get(step)
        if digest is not None:
            out.append(AgreedStep(step, digest, tuple(LOCAL if inv.get(step) == digest else SHARED for inv in local)))
            continue
        held = {inv.get(step) for inv in local}
        if len(held) == 1 and None not in held:
            out.append(AgreedStep(step, held.pop(), (LOCAL,) * len(local), in_shared=False))
        elif step in shared:
            # Unreadable in the shared root and not held by every node: verifying it logs why it is skipped.
            out.append(AgreedStep(step, None, (SHARED,) * len(local)))
    return out


def tier_keep(keep_last: int | None) -> int:
    """How many of the newest steps a node tier keeps for a job whose retention is ``keep_last``: as many, and at
    least 2 (the newest may be one another node lacks, the one before it then is the agreed step); 2 when the job
    keeps every step (``keep_last=None``: a tier is a cache on a node's fast disk or memory, not an archive).

    Raises:
        ConfigError: ``keep_last`` is not a positive integer or None.
    """
    if keep_last is None:
        return 2
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise ConfigError(f"keep_last must be a positive integer or None, got {keep_last!r}")
    return max(2, keep_last)


def tier_groups(ids: Sequence[Any]) -> list[list[int]]:
    """Ranks sharing one node tier (same host, same directory), each group sorted; its first rank leads it."""
    groups: dict[Any, list[int]] = {}
    for r, i in enumerate(ids):
        if i is not None:
            groups.setdefault(i, []).append(r)
    return list(groups.values())


def needed_files(rank: int, reads: Iterable[str], own_files: Iterable[str]) -> list[str]:
    """Everything rank ``rank`` reads to restore at the same world size: its DCP read set, its own ``rank_R/``
    files and the global plan files."""
    prefix = f"rank_{rank:05d}/"
    return sorted(set(reads) | {f for f in own_files if f.startswith(prefix)} | {DCP_METADATA, DIST_FILE})


def read_set(tensors: Mapping[str, Any], metadata: Any) -> list[str]:
    """The DCP files this rank reads to load ``tensors`` (its current shards) back from a checkpoint whose
    ``.metadata`` is ``metadata``: DCP's own default load plan, mapped to the files that hold each item."""
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan

    if metadata is None or not tensors:
        return []
    plan = create_default_local_load_plan(dict(tensors), metadata, strict=False)
    return sorted({metadata.storage_data[item.storage_index].relative_path for item in plan.items})


# ----------------------------------------------------------------------------------------------- the node tier
class NodeTier:
    """One node's local directory of recent steps (a cache of the shared root; see the module docstring).

    Args:
        root: a local directory (fast disk or ``/dev/shm``) of this node only.
        keep: how many of the newest steps it keeps (:func:`tier_keep` of the job's ``keep_last``).
    """

    def __init__(self, root: str, keep: int = 2):
        if "://" in root:
            raise ConfigError(f"local_tier for distributed checkpoints is a directory of this node, got {root!r}")
        self.root = os.path.abspath(root)
        self.keep = max(1, int(keep))
        self.storage = LocalStorage(self.root)

    def identity(self) -> tuple[str, str]:
        """What makes two ranks share this tier: the host and the real directory."""
        return socket.gethostname(), os.path.realpath(self.root)

    # ------------------------------------------------------------------------------------------------ write
    def keep_step(
        self, shared: Storage, name: str, needs: Mapping[int, Sequence[str]], world: int, *, retain: bool = True
    ) -> str:
        """Copy the files ``needs`` lists (rank -> files) of committed step ``name`` from ``shared`` into this tier,
        verified against the manifest while streaming, and commit them (manifest last, :func:`fill_tier_copy`); then
        apply the tier's retention (unless ``retain`` is False: a restore still may fall back to an older step).
        Called by the tier leader after the shared commit, and on restore to fetch a step into the tier. Returns the
        tier step's path."""
        self.remove_stale_tmp()
        raw, man = read_manifest_bytes(shared, name)
        txn = self.storage.begin(name)
        try:
            path = fill_tier_copy(txn, shared, name, raw, man, needs, world)
        except BaseException:
            txn.abort()
            raise
        if retain:
            self.retain(protect=name)
        return path

    def remove_stale_tmp(self) -> None:
        """Remove the tier's tmp directories: only this node's tier leader writes the tier, one save at a time,
        so one found before a save or a copy is a killed one."""
        for e in self.storage.listdir(""):
            if e.name.startswith(TMP_PREFIX):
                self.storage.remove_tree(e.name)

    def retain(self, protect: str) -> None:
        """Keep the newest :attr:`keep` steps (never ``protect``)."""
        for _, name in sorted(step_dirs(self.storage), reverse=True)[self.keep :]:
            if name != protect:
                try:
                    self.storage.remove_tree(name)
                except OSError as e:
                    log.warning("could not remove %s from the node tier: %s", self.storage.join(name), e)

    # ------------------------------------------------------------------------------------------------- read
    def needs(self, name: str, rank: int, world: int) -> list[str] | None:
        """The files rank ``rank`` reads from this tier's copy of ``name`` at world size ``world``, or None when
        the copy was not made for it (another world size, another rank set).

        A whole copy (no ``node.json``: ``resumekit run --local-tier``'s pre-download, or a restore's fetch at
        another world size) serves every rank at any world size: every file of its manifest."""
        if not self.storage.exists(f"{name}/{NODE_FILE}"):
            return self.full_copy_files(name)
        try:
            with self.storage.open_read(f"{name}/{NODE_FILE}") as f:
                doc = parse_json(f.read(1 << 24), self.storage.join(name), NODE_FILE)
        except (OSError, CorruptCheckpointError):
            return None
        if not isinstance(doc, dict) or doc.get("world_size") != world:
            return None
        ranks = doc.get("ranks")
        files = ranks.get(str(rank)) if isinstance(ranks, dict) else None  # untrusted bytes: any shape may come
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            return None
        return files

    def is_full_copy(self, name: str) -> bool:
        """The tier's ``name`` is a whole checkpoint (no ``node.json``), not one node's part of it."""
        return not self.storage.exists(f"{name}/{NODE_FILE}")

    def full_copy_files(self, name: str) -> list[str] | None:
        """Every file of a whole distributed checkpoint in the tier, or None when it is none (no manifest, or a
        single-process checkpoint)."""
        try:
            _, man = read_manifest_bytes(self.storage, name)
        except (OSError, CorruptCheckpointError):
            return None
        return sorted(man.files) if DIST_FILE in man.files else None

    def inventory(self, rank: int, world: int) -> dict[int, str]:
        """Steps this rank can read from the tier -> xxh3 of their manifest (sizes checked, not checksums)."""
        out: dict[int, str] = {}
        try:
            dirs = step_dirs(self.storage)
        except OSError:
            return out
        for step, name in dirs:
            files = self.needs(name, rank, world)
            if files is None:
                continue
            try:
                raw, man = read_manifest_bytes(self.storage, name)
                if all(f in man.files and self.storage.size(f"{name}/{f}") == man.files[f].size for f in files):
                    out[step] = manifest_digest(raw)
            except (OSError, CorruptCheckpointError):
                continue
        return out


def manifest_digest(raw: bytes) -> str:
    h = new_hasher()
    h.update(raw)
    return h.hexdigest()


def shared_digests(storage: Storage, names: Mapping[int, str]) -> dict[int, str | None]:
    """xxh3 of each shared step's manifest (None when it cannot be read: the step is then verified and skipped
    with its reason, unless every node holds it).

    On an object store a step without its manifest is an upload that never committed (a killed save), not a
    damaged checkpoint: it is left out, never proposed."""
    out: dict[int, str | None] = {}
    for step, name in names.items():
        try:
            with storage.open_read(f"{name}/{MANIFEST}") as f:
                out[step] = manifest_digest(f.read(1 << 26))
        except FileNotFoundError:
            if storage.is_local:
                out[step] = None
        except (OSError, CorruptCheckpointError):
            out[step] = None
    return out


def write_node_file(txn: Any, needs: Mapping[int, Sequence[str]], world: int) -> None:
    """``node.json`` of a tier copy: which rank reads which file, at which world size."""
    doc = {"world_size": world, "ranks": {str(r): sorted(fs) for r, fs in sorted(needs.items())}}
    with txn.open_write(NODE_FILE) as f:
        f.write(json.dumps(doc, indent=1).encode())


def fill_tier_copy(
    txn: Any,
    src: Storage,
    name: str,
    raw: bytes,
    man: Manifest,
    needs: Mapping[int, Sequence[str]],
    world: int,
    present: Iterable[str] = (),
) -> str:
    """Complete and commit the tier copy of step ``name`` in the open tier transaction ``txn``: every file ``needs``
    lists (rank -> files) that is not ``present`` in it yet is copied from ``src`` (the shared root: a directory
    or an object store), verified while it streams; then ``node.json``, then ``raw`` (the shared root's manifest,
    byte for byte) last. Returns the tier step's path.

    The one verified copy into a node tier: the tier leader's copy after a commit to a shared directory
    (:meth:`NodeTier.keep_step`), the stage directory of an object-store save becoming the tier copy (``present``:
    the node's own files, staged there), and a restore's fetch. Inside :func:`resumekit.verify.record_hashed` the
    files written are recorded as hashed, so the restore that fetched them does not hash them again.

    Raises:
        CorruptCheckpointError: the manifest does not list a needed file, or its bytes are not the listed ones.
        OSError: reading, writing or the commit failed (the caller aborts ``txn``).
    """
    where = src.join(name)
    have = set(present)
    record = recording()
    written: list[tuple[str, Hashed]] = []
    for rel in sorted({f for fs in needs.values() for f in fs} - have):
        ent = man.files.get(rel)
        if ent is None:
            raise CorruptCheckpointError(where, f"the manifest does not list {rel}")
        rec = copy_verified(src, f"{name}/{rel}", txn, rel, ent, where, record=record)
        if rec is not None:
            written.append((rel, rec))
    write_node_file(txn, needs, world)
    path = str(txn.commit(raw))
    for rel, rec in written:
        note_hashed(os.path.join(path, rel), rec)
    return path


__all__ = [
    "NodeTier",
    "AgreedStep",
    "plan_resume",
    "tier_groups",
    "needed_files",
    "read_set",
    "shared_digests",
    "manifest_digest",
    "write_node_file",
    "fill_tier_copy",
    "tier_keep",
    "NODE_FILE",
    "LOCAL",
    "SHARED",
]
