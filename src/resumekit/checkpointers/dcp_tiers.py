"""The node-tier half of :class:`~resumekit.checkpointers.dcp.DcpCheckpointer`'s restore: agreeing on the resume
step across nodes, fetching it into the node tiers from an object-store root, repairing a damaged tier copy, and
reading it there.

Every rank reports its tier's inventory; rank 0 proposes (:func:`~resumekit.distributed.nodetier.plan_resume`) the
steps every rank can read and from where; with an object-store root, each node whose tier lacks the agreed step for
one of its ranks has its tier leader download it (:func:`~resumekit.distributed.remote_commit.fetch_step`) and then
every rank reads locally; each rank verifies what it reads, the verdicts are agreed, and every rank logs a
``resume_agreed`` event in its node tier's log.

A tier copy that fails its rank's verification (a bit flip, a truncation, after the download or from an earlier
run) is not a reason to skip the step when the shared root holds it: the verdicts are all-gathered anyway, so every
rank sees which ranks failed, and when each of them read its node tier's copy of a step the shared root has, every
rank takes the repair round together (:meth:`NodeTierRestore._repair`): the leaders of those nodes discard their
copies and fetch them again (verified while streaming; a directory root the same way as an object store), one
gather shares the outcomes, the ranks of those nodes check the new copies, and a second gather of the verdicts
decides. The step stays the one agreed step; a fetch that fails (the shared copy is bad too, or unreachable past
the client's retries) fails the step on every rank, which then move to the next proposal together. Every wait is a
collective with the job's timeout or a transfer bounded by the remote client's. Each leader that fetched logs a
``tier_refetch`` event in its node tier's log (the damage, where from, ``ok`` or the error), and ``resume_agreed``
names the damage and where the copy came from (``refetched``).

Hash once: what the tier leader just downloaded was hashed while it streamed; its records (the identity of each
file written) travel in the same gathers, and the ranks' verification does not hash those files again while they
keep that identity (:class:`~resumekit.storage.verified.Vouch`, which also honours the supervisor's
``RESUMEKIT_VERIFIED`` token).
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
from ..storage.verified import Vouch
from ..units import one_line
from ..verify import Hashed, read_verified, record_hashed
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
    _fresh: dict[str, Hashed]
    _refetched: dict[str, str] | None
    _hashed: int
    _vouch: Vouch | None
    _opening: AgreedStep | None

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world_size

    def _agree_open(
        self, cand: Candidate, where: str, reason: str | None, st: Storage, repairable: bool = False
    ) -> Opened:
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
        mine: tuple[str | None, str | None, dict[str, Hashed]] = (None, None, {})
        if self._tier_group and any(sources[r] == SHARED for r in self._tier_group):
            t0 = time.perf_counter()
            try:
                fresh, kind = self._fetch_into_tier(cand, digest)
                raw, _ = read_manifest_bytes(self._tier().storage, cand.name)
                mine = (None, manifest_digest(raw), fresh)
                log.info(
                    "rank %d: downloaded %s (%s copy) into the node tier %s in %.1f s",
                    self.rank,
                    cand.path,
                    kind,
                    self._tier().root,
                    time.perf_counter() - t0,
                )
            except CorruptCheckpointError as e:
                mine = (f"(rank {self.rank}, downloading into its node tier) {e.reason}", None, {})
            except OSError as e:
                mine = (f"(rank {self.rank}) could not download it into its node tier: {one_line(e)}", None, {})
        got = self.ctx.ctl.all_gather(mine)
        bad = next((g[0] for g in got if g[0]), None)
        if bad is not None:
            raise CorruptCheckpointError(cand.path, bad)
        self._downloaded = any(sources[r] == SHARED for r in self._group)
        if self._group:
            self._fresh = got[self._group[0]][2]  # this node's leader just hashed them: not hashed again
        digest = digest or next((g[1] for g in got if g[1]), None)
        return AgreedStep(cand.step, digest, (LOCAL,) * self.world, agreed.in_shared if agreed is not None else True)

    def _tier(self) -> NodeTier:
        assert self.node_tier is not None
        return self.node_tier

    def _fetch_into_tier(self, cand: Candidate, digest: str | None) -> tuple[dict[str, Hashed], str]:
        """Tier leader: fetch ``cand`` from the shared root into the node tier (:func:`fetch_step`), recording what
        the download hashed. Returns (manifest-relative name -> record of the file written, what was fetched)."""
        tier = self._tier()
        with record_hashed() as seen:
            kind = fetch_step(self.storage, tier, cand.name, digest, self._tier_group, self.world)
        base = tier.storage.join(cand.name) + os.sep
        return {p[len(base) :]: rec for p, rec in seen.items() if p.startswith(base)}, kind

    def _local_files(self, cand: Candidate, agreed: AgreedStep) -> list[str] | None:
        """The files of the tier's ``cand`` this rank verifies: those it reads; of a whole copy (no ``node.json``),
        its share of them (the node's ranks that read locally check it between them)."""
        tier = self._tier()
        files = tier.needs(cand.name, self.rank, self.world)
        if files is not None and tier.is_full_copy(cand.name):
            readers = [r for r in self._group if agreed.sources[r] == LOCAL] or [self.rank]
            files = files[readers.index(self.rank) :: len(readers)] if self.rank in readers else files
        return files

    def _open_local(self, cand: Candidate, agreed: AgreedStep) -> Opened:
        """This rank reads ``cand`` from its node tier: every file it needs is checked (size and xxh3) against the
        manifest copy, which must be the one agreed on. A damaged copy is fetched again by the node's tier leader
        when the shared root has the agreed step (:meth:`_repair`, through the verdicts' agreement)."""
        self._opening = agreed  # the plan as this rank reads it (after a download: every rank from its tier)
        reason = self._check_tier_copy(cand, agreed)
        self._source = LOCAL
        return self._agree_open(cand, cand.path, reason, self._tier().storage, repairable=agreed.in_shared)

    def _check_tier_copy(self, cand: Candidate, agreed: AgreedStep) -> str | None:
        """Why this rank must not read its node tier's copy of ``cand`` (see :meth:`_verify_files`), naming the rank
        and the copy, or None. Never raises: the reason is this rank's verdict in a gather every rank joins."""
        tier = self._tier().storage
        try:
            files = self._local_files(cand, agreed)
            reason = self._verify_files(tier, cand.name, files, agreed.digest, self._fresh)
        except Exception as e:  # noqa: BLE001 - a verdict, never a rank missing from the verdicts' gather
            reason = f"unreadable: {one_line(e)}"
        return None if reason is None else f"(rank {self.rank} reading from {tier.join(cand.name)}) {reason}"

    def _repair(self, cand: Candidate, reasons: list[str | None], local: bool) -> str | None:
        """Collective, when some ranks found their node tier's copy of ``cand`` damaged and the shared root holds
        the agreed step: the tier leader of each node with such a rank discards the node's copy and fetches it
        again from the shared root (verified while streaming, :meth:`_fetch_into_tier`); the outcomes are
        all-gathered; the ranks of those nodes that read locally (``local``) check the new copy (what the fetch
        just hashed is not hashed again). Returns this rank's verdict for the final agreement: a failed fetch
        (the shared root's copy is bad too, or unreachable) is every rank's verdict, so every rank skips the step.
        """
        agreed = self._opening if local else self._plan.get(cand.step)
        mine: tuple[str | None, str | None, dict[str, Hashed]] = (None, None, {})
        damaged = next((reasons[r] for r in self._tier_group if reasons[r]), None)
        source = self.storage.join(cand.name)
        if damaged is not None and agreed is not None:
            tier = self._tier()
            log.warning(
                "rank %d: the node tier's copy of %s is damaged (%s); fetching it again from %s",
                self.rank,
                cand.name,
                damaged,
                source,
            )
            t0 = time.perf_counter()
            error: str | None = None
            try:
                tier.storage.remove_tree(cand.name)
                fresh, _ = self._fetch_into_tier(cand, agreed.digest)
                mine = (None, damaged, fresh)
            except CorruptCheckpointError as e:
                error = e.reason
            except Exception as e:  # noqa: BLE001 - any failure must reach the gather below, or the others wait
                error = one_line(e)
            if error is not None:
                mine = (f"{damaged}; fetching it again from {source} failed too: {error}", damaged, {})
            # The node's own record, whatever the outcome (the run's log gets skip_invalid when it failed).
            EventLog(os.path.join(tier.root, EVENTS_FILE), "library").emit(
                "tier_refetch",
                step=cand.step,
                rank=self.rank,
                damaged=damaged,
                fetched_from=source,
                ok=error is None,
                error=error,
                seconds=round(time.perf_counter() - t0, 3),
            )
        got = self.ctx.ctl.all_gather(mine)
        failed = next((g[0] for g in got if g[0]), None)
        if failed is not None:
            return failed
        lead = got[self._group[0]] if self._group else mine
        if lead[1] is None or not local or agreed is None:
            return reasons[self.rank]  # nothing here was fetched again: this rank's own verdict stands
        self._fresh = lead[2]
        self._downloaded = True
        self._refetched = {"damaged": lead[1], "from": source}
        return self._check_tier_copy(cand, agreed)

    def _verify_files(
        self, st: Storage, name: str, files: list[str] | None, digest: str | None, fresh: dict[str, Hashed]
    ) -> str | None:
        """Why ``files`` of ``name`` in ``st`` must not be read (manifest not the agreed one, a file that does not
        match it, a refused ``.metadata``), or None. A file the supervisor's token or this restore's own verified
        download (``fresh``) vouches for is not hashed again; :attr:`_hashed` counts what is."""
        where = st.join(name)
        try:
            if files is None:
                raise CorruptCheckpointError(where, "node.json does not list this rank")
            raw, man = read_manifest_bytes(st, name)
            if manifest_digest(raw) != digest:
                raise CorruptCheckpointError(where, "its manifest is not the one agreed on")
            vouch = self._vouch = Vouch(st.local_path(name), raw, man.files, fresh=fresh)
            for rel in files:
                self._hashed += verify_file(st, name, rel, man.files.get(rel), where, vouch)
            if DCP_METADATA in man.files:
                load_dcp_metadata(read_verified(st, name, DCP_METADATA, man), where, man.files)
        except CorruptCheckpointError as e:
            return e.reason
        except OSError as e:
            return f"unreadable: {e}"
        except Exception as e:  # noqa: BLE001 - untrusted bytes: a verdict, never a rank missing from the gather
            return f"unreadable: {one_line(e)}"
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
            # the node tier's copy was found damaged and fetched again: {"damaged": why, "from": the shared step}
            "refetched": self._refetched,
            # the bytes this rank hashed to verify what it reads (a just-downloaded or token-vouched file: none),
            # during the whole restore: a check of a copy found damaged and fetched again counts as well
            "hashed_bytes": self._hashed,
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
