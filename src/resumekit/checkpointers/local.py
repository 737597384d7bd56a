"""One process, the native format: a step is one tensor file + one JSON tree, committed by a manifest written last.

Atomicity is the storage's commit strategy (rename on POSIX, manifest-last on object stores); asynchronous saves
stage tensors in reused host buffers so training blocks only for that copy. With a tiered storage, restore
candidates come from both tiers and a remote one is downloaded (verified) into the local tier before it is read.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from ..codec import TreeEncoder
from ..errors import CorruptCheckpointError
from ..format import TREE_FILE, step_dirname
from ..layouts.base import CheckpointInfo
from ..snapshot import StagingBuffers, to_host
from ..state import RNG_KEY, STATE_KEY, apply_state, capture_rng, capture_state, check_rng, check_state, restore_rng
from ..storage import Storage
from ..storage.resave import recover_resaves
from ..storage.tiered import TieredStorage
from .base import Candidate, Committed, Opened, Snapshot, candidates_at, is_committed, remove_stale_tmp, root_candidates
from .native import read_checkpoint, write_checkpoint

log = logging.getLogger("resumekit")


class LocalCheckpointer:
    """The single-process :class:`~resumekit.checkpointers.base.Checkpointer`.

    Args:
        storage: the root (local, mounted, object store, or a :class:`TieredStorage`).
    """

    collective = False
    leads_job = True
    leads_node = True

    def __init__(self, storage: Storage):
        self.storage = storage
        self.tier = storage if isinstance(storage, TieredStorage) else None
        self._staging: StagingBuffers | None = None
        # How the last restore read its checkpoint (tier, verification), for the "restore" event only.
        self._restored: dict[str, Any] = {}

    # ---------------------------------------------------------------------------------------- coordination
    def event_fields(self) -> dict[str, Any]:
        # Filled by open() for the restore event; cleared by the first snapshot, so save events carry none.
        return dict(self._restored)

    def needs_agreement(self, handle_sigterm: bool, clock_based: bool) -> bool:
        return False

    def agree(self, preempt: bool, due: bool) -> tuple[bool, bool]:
        return preempt, due

    def honours_resume_env(self) -> bool:
        return True

    # ------------------------------------------------------------------------------------------------ save
    def snapshot(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metadata: dict[str, Any],
        stage: bool,
        rng: bool,
        skip_if_committed: bool,
    ) -> Snapshot | None:
        self._restored = {}
        name = step_dirname(step)
        if skip_if_committed and is_committed(self.storage, name):
            return None
        enc = TreeEncoder()
        # Encoded separately so error messages read state['key'], not state['state']['key'].
        encoded = {STATE_KEY: enc.encode(capture_state(state))}
        if rng:
            encoded[RNG_KEY] = enc.encode(capture_rng(), ("<rng>",))
        tensors: Any  # the staged file image (async) or host tensors: write_checkpoint takes either
        if stage:
            if self._staging is None:
                self._staging = StagingBuffers()
            tensors = self._staging.snapshot(enc.tensors)
        else:
            tensors = to_host(enc.tensors)
        return Snapshot(step=step, name=name, metadata=metadata, entries=list(state.keys()), payload=(encoded, tensors))

    def persist(self, snap: Snapshot, *, background: bool) -> Committed:
        encoded, tensors = snap.payload
        res = write_checkpoint(self.storage, snap.step, encoded, tensors, snap.metadata, snap.entries)
        return Committed(step=snap.step, path=res.path, nbytes=res.manifest.total_bytes, seconds=res.seconds, io=res.io)

    # --------------------------------------------------------------------------------------------- restore
    def candidates(self, path: str | None = None) -> list[Candidate]:
        if path is not None:
            return candidates_at(path)
        if self.tier is None:
            return root_candidates(self.storage)
        # Both tiers, newest step first; at each step the local copy before the remote one (no download needed).
        local = {c.step: c for c in root_candidates(self.tier.local)}
        remote = {c.step: c for c in root_candidates(self.tier.remote)}
        out: list[Candidate] = []
        for step in sorted(set(local) | set(remote), reverse=True):
            if step in local:
                out.append(local[step])
            if step in remote:
                r = remote[step]
                out.append(Candidate(r.root, r.name, r.step, r.path, remote=True))
        return out

    def open(self, cand: Candidate) -> Opened:
        tier = None
        if cand.remote:
            # A remote step newer than every valid local one (or whose local copy is damaged) is downloaded into
            # the local tier first: verified, tmp dir + rename; then it is read like a local one.
            assert self.tier is not None
            self.tier.download(cand.name)
            storage: Storage = self.tier.local
            tier = "remote"
        else:
            storage = self.storage if cand.root == self.storage.uri else cand.storage()
            if self.tier is not None and storage is self.tier:
                tier = "local"
        stats: dict[str, Any] = {}
        man, tree = read_checkpoint(storage, cand.name, stats=stats)
        # Which tier the bytes came from (candidates() puts the local copy of a step before the remote one), and
        # whether the supervisor's verified token spared hashing them again.
        self._restored = {"verified": stats.get("verified"), "hashed_bytes": stats.get("hashed_bytes")}
        if self.tier is not None:
            self._restored.update(tier=tier or "other", tier_in_memory=self.tier.in_memory)
            # The size of a checkpoint is known now: say at once if the tier cannot hold the next save beside the
            # ones its retention keeps (on tmpfs: RAM), rather than at the first ENOSPC.
            verdict = self.tier.space_verdict(man.total_bytes)
            if verdict is not None:
                log.warning("%s", verdict[1])
                self._restored["tier_space"] = verdict[1]
        info = CheckpointInfo(
            step=cand.step,
            name=cand.name,
            path=storage.join(cand.name),
            layout="native",
            valid=True,
            size=man.total_bytes,
            time=man.time,
            metadata=man.metadata,
        )
        return Opened(info=info, payload=tree)

    def load(
        self, opened: Opened, state: MutableMapping[str, Any], *, only: Sequence[str] | None, strict: bool, rng: bool
    ) -> list[str]:
        tree, where = opened.payload, opened.info.path
        if not isinstance(tree, dict):
            raise CorruptCheckpointError(where, f"{TREE_FILE} is not a mapping")
        # All or nothing: every check (entries, shapes, dtypes, plain values, RNG states) runs before the first live
        # object changes, so a CorruptCheckpointError here leaves the caller free to try an older checkpoint.
        check_state(state, tree.get(STATE_KEY, {}), only=only, strict=strict, where=where)
        if rng and RNG_KEY in tree:
            check_rng(tree[RNG_KEY], where)
        loaded = apply_state(state, tree.get(STATE_KEY, {}), only=only, strict=strict, where=where)
        if rng and RNG_KEY in tree:
            restore_rng(tree[RNG_KEY])
        return loaded

    # ------------------------------------------------------------------------------------------- lifecycle
    def clean_stale_tmp(self) -> None:
        # The manager holds the root's writer lease, so every tmp dir present before its first save is left over
        # from a killed save, and every keep copy from an interrupted re-save.
        remove_stale_tmp(self.tier.local if self.tier is not None else self.storage)
        if self.tier is not None:
            try:
                recover_resaves(self.tier.remote)
            except OSError as e:  # the remote may be unreachable now; the next start tries again
                log.warning("could not check %s for interrupted re-saves: %s", self.tier.remote.uri, e)

    def release(self) -> None:
        if self._staging is not None:
            self._staging.release()


__all__ = ["LocalCheckpointer"]
