"""The node-tier half of :class:`~resumekit.checkpointers.dcp.DcpCheckpointer`'s restore: agreeing on the resume
step across nodes, fetching it into the node tiers from an object-store root, and reading it there.

Every rank reports its tier's inventory; rank 0 proposes (:func:`~resumekit.distributed.nodetier.plan_resume`) the
steps every rank can read and from where; with an object-store root, each node whose tier lacks the agreed step for
one of its ranks has its tier leader download it (:func:`~resumekit.distributed.remote_commit.fetch_step`) and then
every rank reads locally; each rank verifies what it reads, the verdicts are agreed, and every rank logs a
``resume_agreed`` event in its node tier's log.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..distributed.context import DistContext
from ..distributed.dcp_io import load_dcp_metadata
from ..distributed.nodetier import LOCAL, SHARED, AgreedStep, NodeTier, manifest_digest, plan_resume, shared_digests
from ..distributed.remote_commit import fetch_step, verify_file
from ..distributed.statedict import DCP_METADATA
from ..errors import CorruptCheckpointError
from ..events import EVENTS_FILE, EventLog
from ..format import step_dirname
from ..storage import Storage
from ..storage.transfer import read_manifest_bytes
from ..units import one_line
from ..verify import read_verified
from .base import Candidate, Opened

log = logging.getLogger("resumekit")


class NodeTierRestore:
    """The restore steps of :class:`~resumekit.checkpointers.dcp.DcpCheckpointer` that involve node tiers (a mixin:
    it uses the checkpointer's process layout, root and tier)."""

    storage: Storage
    ctx: DistContext
    node_tier: NodeTier | None
    remote: bool
    _group: list[int]
    _tier_group: list[int]
    _plan: dict[int, AgreedStep]
    _source: str
    _inventories: list[list[int]]
    _downloaded: bool

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world_size

    def _agree_open(self, cand: Candidate, where: str, reason: str | None, st: Storage) -> Opened:
        raise NotImplementedError  # the checkpointer's: every rank's verdict agreed

    def _in_root(self, path: str) -> str:
        """A step of this node's tier named as the resume path (``resumekit run --local-tier`` pre-downloaded it
        there) stands for the root's step of that name: the tier copy is in this node's inventory, and the other
        nodes' tiers are not at that path."""
        if self.node_tier is None or "://" in path:
            return path
        real = os.path.realpath(path.rstrip("/"))
        if os.path.dirname(real) == os.path.realpath(self.node_tier.root) and real != self.node_tier.root:
            return self.storage.join(os.path.basename(real))
        return path

    def _agree_candidates(self, listed: list[Candidate], allow_tier_only: bool) -> list[Candidate]:
        """Every rank's tier inventory to rank 0, which proposes the steps every rank can read (newest first) and
        where each rank reads them from; everyone gets the same proposal, which ``open`` then verifies."""
        inv: dict[int, str] = {}
        try:
            if self.node_tier is not None:
                inv = self.node_tier.inventory(self.rank, self.world)
        except Exception as e:  # noqa: BLE001 - a collective follows: an unreadable tier only costs speed
            log.warning("rank %d: cannot list the node tier: %s", self.rank, one_line(e))
        invs = self.ctx.ctl.all_gather(inv)
        proposal: Any = (listed, {})  # without a plan every rank reads the shared root, as without tiers
        if self.rank == 0:
            try:
                proposal = self._propose(listed, invs, allow_tier_only)
            except Exception as e:  # noqa: BLE001 - the broadcast below must happen whatever went wrong
                log.warning("rank 0: no node-tier plan (%s); every rank reads the shared root", one_line(e))
        cands, self._plan = self.ctx.ctl.broadcast(proposal)
        self._inventories = [sorted(i) for i in invs]
        return cands

    def _propose(
        self, listed: list[Candidate], invs: list[dict[int, str]], allow_tier_only: bool
    ) -> tuple[list[Candidate], dict[int, AgreedStep]]:
        """Rank 0: the candidates every rank can read, newest first, and where each rank reads each one."""
        in_root = {c.step: c for c in listed if c.root == self.storage.uri}
        agreed = plan_resume(shared_digests(self.storage, {s: c.name for s, c in in_root.items()}), invs)
        cands: list[Candidate] = []
        plans: dict[int, AgreedStep] = {}
        for a in agreed:
            cand = in_root.get(a.step)
            if cand is None:
                if not allow_tier_only:
                    continue
                name = step_dirname(a.step)
                cand = Candidate(self.storage.uri, name, a.step, self.storage.join(name))
            cands.append(cand)
            plans[a.step] = a
        # Candidates outside the shared root (a user-named path elsewhere) keep their place, read from there.
        cands += [c for c in listed if c.root != self.storage.uri]
        cands.sort(key=lambda c: c.step, reverse=True)
        return cands, plans

    def _fetch(self, cand: Candidate, agreed: AgreedStep | None) -> AgreedStep:
        """Object-store root (collective): every node whose tier lacks ``cand`` for one of its ranks gets it, its
        tier leader downloading it (verified while streaming); then every rank reads it from its tier.

        Raises:
            CorruptCheckpointError: on every rank, when any node's download failed (the reason names the rank).
        """
        sources = agreed.sources if agreed is not None else (SHARED,) * self.world
        digest = agreed.digest if agreed is not None else None
        if SHARED not in sources:
            return AgreedStep(cand.step, digest, sources, agreed.in_shared if agreed is not None else True)
        mine: tuple[str | None, str | None] = (None, None)
        if self._tier_group and any(sources[r] == SHARED for r in self._tier_group):
            assert self.node_tier is not None
            t0 = time.perf_counter()
            try:
                kind = fetch_step(self.storage, self.node_tier, cand.name, digest, self._tier_group, self.world)
                raw, _ = read_manifest_bytes(self.node_tier.storage, cand.name)
                mine = (None, manifest_digest(raw))
                log.info(
                    "rank %d: downloaded %s (%s copy) into the node tier %s in %.1f s",
                    self.rank,
                    cand.path,
                    kind,
                    self.node_tier.root,
                    time.perf_counter() - t0,
                )
            except CorruptCheckpointError as e:
                mine = (f"(rank {self.rank}, downloading into its node tier) {e.reason}", None)
            except OSError as e:
                mine = (f"(rank {self.rank}) could not download it into its node tier: {one_line(e)}", None)
        got = self.ctx.ctl.all_gather(mine)
        bad = next((g[0] for g in got if g[0]), None)
        if bad is not None:
            raise CorruptCheckpointError(cand.path, bad)
        self._downloaded = any(sources[r] == SHARED for r in self._group)
        digest = digest or next((g[1] for g in got if g[1]), None)
        return AgreedStep(cand.step, digest, (LOCAL,) * self.world, agreed.in_shared if agreed is not None else True)

    def _open_local(self, cand: Candidate, agreed: AgreedStep) -> Opened:
        """This rank reads ``cand`` from its node tier: every file it needs is checked (size and xxh3) against the
        manifest copy, which must be the one agreed on. A whole copy (no ``node.json``) is checked by the node's
        ranks between them."""
        assert self.node_tier is not None
        tier = self.node_tier.storage
        files = self.node_tier.needs(cand.name, self.rank, self.world)
        if files is not None and self.node_tier.is_full_copy(cand.name):
            readers = [r for r in self._group if agreed.sources[r] == LOCAL] or [self.rank]
            files = files[readers.index(self.rank) :: len(readers)] if self.rank in readers else files
        reason = self._verify_files(tier, cand.name, files, agreed.digest)
        st: Storage = tier
        self._source = LOCAL
        # An object store cannot be read by DCP: a damaged tier copy there makes the step invalid (the next one is
        # tried), rather than being read around.
        if reason is not None and agreed.in_shared and files is not None and not self.remote:
            # The copy here is damaged but the shared root has the agreed step: this rank reads exactly the same
            # files from there instead (verified the same way), and the agreement still holds.
            log.warning(
                "rank %d: the node tier's copy of %s is unusable (%s); reading it from the shared root",
                self.rank,
                cand.name,
                reason,
            )
            st, self._source = self.storage, f"{SHARED} (node tier copy unusable: {reason})"
            reason = self._verify_files(st, cand.name, files, agreed.digest)
        if reason is not None:
            reason = f"(rank {self.rank} reading from {st.join(cand.name)}) {reason}"
        return self._agree_open(cand, cand.path, reason, st)

    @staticmethod
    def _verify_files(st: Storage, name: str, files: list[str] | None, digest: str | None) -> str | None:
        """Why ``files`` of ``name`` in ``st`` must not be read (manifest not the agreed one, a file that does not
        match it, a refused ``.metadata``), or None."""
        where = st.join(name)
        try:
            if files is None:
                raise CorruptCheckpointError(where, "node.json does not list this rank")
            raw, man = read_manifest_bytes(st, name)
            if manifest_digest(raw) != digest:
                raise CorruptCheckpointError(where, "its manifest is not the one agreed on")
            for rel in files:
                verify_file(st, name, rel, man.files.get(rel), where)
            if DCP_METADATA in man.files:
                load_dcp_metadata(read_verified(st, name, DCP_METADATA, man), where, man.files)
        except CorruptCheckpointError as e:
            return e.reason
        except OSError as e:
            return f"unreadable: {e}"
        return None

    def _log_agreement(self, opened: Opened) -> None:
        """One ``resume_agreed`` event per rank in its node tier's log, and rank 0's in the run's log."""
        agreed = self._plan.get(opened.info.step)
        sources = list(agreed.sources) if agreed is not None else [SHARED] * self.world
        fields: dict[str, Any] = {
            "step": opened.info.step,
            "path": opened.info.path,
            "rank": self.rank,
            "world_size": self.world,
            # "source" is the event log's own field (who wrote the event): where ranks read is "read"/"reads".
            "read": self._source,
            "read_from": opened.payload.join(opened.info.name),
            "reads": sources,
            "inventories": self._inventories,
            # this node's tier leader downloaded the step from the object-store root during this restore
            "downloaded": self._downloaded,
        }
        tier_log = None
        if self.node_tier is not None:
            tier_log = os.path.join(self.node_tier.root, EVENTS_FILE)
            EventLog(tier_log, "library").emit("resume_agreed", **fields)
        if self.rank == 0:
            # The run's log: the shared directory's, or for an object store RESUMEKIT_EVENTS (once: under
            # `resumekit run --local-tier` that may be the tier's own log).
            run_log = EventLog.for_dir(self.storage.local_path() if self.storage.is_local else None, "library")
            if run_log.path and run_log.path != tier_log:
                run_log.emit("resume_agreed", **fields)


__all__ = ["NodeTierRestore"]
