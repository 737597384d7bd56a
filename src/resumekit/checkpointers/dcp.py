"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), with rank agreement on commit and restore.

Used by :class:`~resumekit.manager.CheckpointManager` when ``distributed=True`` (or, by default, whenever
``torch.distributed`` is initialised); the user API does not change. A distributed checkpoint is a native
checkpoint directory whose manifest lists DCP's files, so ``resumekit ls/latest/verify/gc`` handle it as any other::

    step_000001200/
        .metadata                DCP's global plan (a pickle, parsed only by an allow-list), written by rank 0
        __0_0.distcp ...         DCP shards: rank R writes __R_*.distcp with its part of every model/optimizer
        rank_00000/state.json    rank R's non-tensor state (scheduler, scaler, sampler, plain values, RNGs) and the
        rank_00000/tensors.safetensors   non-tensor skeleton of the model/optimizer state dicts, in our JSON codec
        distributed.json         world size, entries saved through DCP, torch version (rank 0)
        manifest.json            written last by rank 0: every file above with its size and xxh3 checksum

Save protocol (every phase ends in a collective, so one rank's failure is every rank's failure and nothing hangs):

1. :meth:`DcpCheckpointer.snapshot` (training thread): every rank captures its state (``get_model_state_dict`` /
   ``get_optimizer_state_dict`` for modules and optimizers, our codec for the rest); rank 0 creates the step's tmp
   directory; one ``all_gather_object`` shares the tmp name and every rank's "prepared" status;
2. :meth:`DcpCheckpointer.persist`: DCP writes every rank's shards into the tmp directory (DCP's own collectives),
   then each rank writes and fsyncs its ``rank_R/`` files and checksums the files it wrote;
3. one ``all_gather_object`` of each rank's file table or error; any error: rank 0 removes the tmp directory and
   every rank raises :class:`~resumekit.errors.CheckpointWriteError` naming the failing rank(s);
4. rank 0 writes ``manifest.json`` (fsync), renames tmp -> ``step_N``, fsyncs the parent, and broadcasts the
   outcome, which every rank returns or raises.

Asynchronous saves: phase 1 copies every tensor into reused host buffers (DTensor shards keep their sharding spec);
phases 2-4 run on each rank's background thread over a *separate* gloo process group, so the background
collectives never interleave with the training thread's (DDP's, ours).

Restore: rank 0 lists the candidates and broadcasts them; for each, every rank verifies the checksums of a share of
its files (so verification is parallel) and the verdicts are all-gathered; the first candidate valid on all ranks
is loaded by all (:func:`resumekit.distributed.loader.load_sharded`). Tensors are loaded by DCP into the current
model/optimizer layout, which is what makes resharding work.

With a node-local tier (:mod:`resumekit.distributed.nodetier`): after each shared commit every node's tier leader
copies the files its ranks read into the node's directory; a restore gathers every rank's tier inventory, rank 0
proposes the steps every rank can read (:func:`~resumekit.distributed.nodetier.plan_resume`), each rank verifies
what it will read (its tier copy or the shared root) and the verdicts are agreed as above, so all ranks load one
step, and every rank logs a ``resume_agreed`` event naming it and where each rank read it from.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch

from ..codec import TreeEncoder
from ..distributed.context import DistContext
from ..distributed.dcp_io import (
    describe_failure,
    failed_ranks,
    first_errno,
    load_dcp_metadata,
    make_writer,
    quiet_single_process,
)
from ..distributed.loader import load_sharded
from ..distributed.nodetier import (
    LOCAL,
    SHARED,
    AgreedStep,
    NodeTier,
    manifest_digest,
    needed_files,
    plan_resume,
    read_set,
    shared_digests,
    tier_groups,
)
from ..distributed.sharded import is_distributed_checkpoint, write_rank_files
from ..distributed.staging import ShardStaging
from ..distributed.statedict import DCP_KEY, DCP_METADATA, dcp_entries, entry_state_dict, split_tensors
from ..errors import CheckpointNotFoundError, CheckpointWriteError, ConfigError, CorruptCheckpointError
from ..events import EVENTS_FILE, EventLog
from ..format import DIST_FILE, FileEntry, Manifest, new_hasher, step_dirname
from ..layouts.base import CheckpointInfo
from ..snapshot import StagingBuffers
from ..state import RNG_KEY, STATE_KEY, capture_rng, capture_state
from ..storage import Storage
from ..storage.transfer import read_manifest_bytes
from ..units import errno_hint, one_line
from ..verify import check_checkpoint, hash_file, read_verified
from .base import Candidate, Committed, Opened, Snapshot, candidates_at, is_committed, remove_stale_tmp, root_candidates
from .native import pause_between_files

log = logging.getLogger("resumekit")

ENV_ELASTIC_RESTART = "TORCHELASTIC_RESTART_COUNT"
_RANK_HINT = "check that directory on the failing rank's node"


def _write_error(errno_: int | None, msg: str) -> CheckpointWriteError:
    """A CheckpointWriteError whose text is ``msg`` (OSError would print "[Errno None]" for a missing errno)."""
    return CheckpointWriteError(errno_, msg) if errno_ else CheckpointWriteError(msg)


class DcpCheckpointer:
    """The sharded :class:`~resumekit.checkpointers.base.Checkpointer`; every call is collective.

    Args:
        storage: the root: a local or mounted shared directory every rank can write.
        ctx: the process layout; :meth:`DistContext.create` by default (collective: every rank must construct).
        node_tier: this node's local tier (a directory of this node only), or None. Ranks that name the same
            directory on the same host share it; its lowest rank writes it.
    """

    collective = True

    def __init__(self, storage: Storage, ctx: DistContext | None = None, node_tier: NodeTier | None = None):
        if not storage.is_local:
            raise ConfigError(
                f"distributed checkpoints need a local or mounted shared directory (every rank writes its shards "
                f"there); {storage.uri} is an object store. Use a shared file system path (NFS, SFS Turbo, "
                "Lustre) or a per-node local path with a single node; a node-local tier (local_tier=) speeds up "
                "restores but does not replace the shared root"
            )
        self.storage = storage
        self.ctx = ctx or DistContext.create()
        self.staging = ShardStaging()
        self._rank_staging = StagingBuffers()
        # One writer of the event log (rank 0) and one heartbeat per node (local rank 0): a hung rank stalls
        # rank 0 at its next collective, so the node's heartbeat still goes stale.
        self.leads_job = self.ctx.rank == 0
        self.leads_node = self.ctx.local_rank == 0
        self.node_tier = node_tier
        # Which ranks share a tier is learnt once, here (construction is collective anyway): it decides who copies
        # which ranks' files after each commit.
        ids = self.ctx.ctl.all_gather(node_tier.identity() if node_tier is not None else None)
        self._tiered = any(i is not None for i in ids)
        group = next((g for g in tier_groups(ids) if self.rank in g), [])
        self._tier_group = group if group and group[0] == self.rank else []  # non-empty on a tier leader only
        self._plan: dict[int, AgreedStep] = {}
        self._source = SHARED  # where this rank read the step it opened last (for the resume_agreed event)
        self._inventories: list[list[int]] = []

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world_size

    # ---------------------------------------------------------------------------------------- coordination
    def event_fields(self) -> dict[str, Any]:
        return {"world_size": self.world}

    def needs_agreement(self, handle_sigterm: bool, clock_based: bool) -> bool:
        """Step-based saves are the same decision on every rank; a signal (SIGTERM on one rank) or a clock
        (``every_seconds``) is not. The question is one all_reduce of two int32 on the gloo group (tens of
        microseconds within a node), made only when one of those can differ. A job with ``handle_sigterm=False``
        that calls ``request_preemption()`` must call it on every rank."""
        return self.world > 1 and (handle_sigterm or clock_based)

    def agree(self, preempt: bool, due: bool) -> tuple[bool, bool]:
        p, d = self.ctx.ctl.any_true(preempt, due)
        return p, d

    def honours_resume_env(self) -> bool:
        # After torchrun's agent restarted the group, the supervisor's hand-off predates the newest save.
        return int(os.environ.get(ENV_ELASTIC_RESTART, "0") or 0) == 0

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
        """Phase 1 (training thread): capture and encode; rank 0 opens the transaction; all ranks agree."""
        name = step_dirname(step)
        err: str | None = None
        prep_exc: BaseException | None = None
        tensors: dict[str, Any] = {}
        encoded: Any = None
        rank_tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        try:
            entries = dcp_entries(state)
            modules = {k: v for k, v in entries.items() if isinstance(v, torch.nn.Module)}
            skeleton = {k: split_tensors(entry_state_dict(k, v, modules), k, tensors) for k, v in entries.items()}
            rest = {k: v for k, v in state.items() if k not in entries}
            enc = TreeEncoder()
            encoded = {STATE_KEY: enc.encode(capture_state(rest)), DCP_KEY: enc.encode(skeleton, ("<dcp>",))}
            if rng:
                encoded[RNG_KEY] = enc.encode(capture_rng(), ("<rng>",))
            if stage:
                tensors = self.staging.snapshot(tensors)
                rank_tensors = self._rank_staging.snapshot(enc.tensors)
            else:
                rank_tensors = {k: t.detach().cpu().contiguous() for k, t in enc.tensors.items()}
        except Exception as e:  # noqa: BLE001 - shared with every rank below, then raised
            prep_exc, err = e, f"{type(e).__name__}: {e}"
        skip, tmp_rel, txn = False, None, None
        if self.rank == 0 and err is None:
            try:
                skip = skip_if_committed and is_committed(self.storage, name)
                if not skip:
                    txn = self.storage.begin(name)
                    # DCP writes to a local root only, whose transactions have a tmp_path; Transaction does not say so.
                    tmp_rel = os.path.basename(txn.tmp_path)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001
                prep_exc, err = e, f"{type(e).__name__}: {e}"
        statuses = self.ctx.ctl.all_gather((err, skip, tmp_rel))
        skip, tmp_rel = statuses[0][1], statuses[0][2]
        bad = [(r, s[0]) for r, s in enumerate(statuses) if s[0]]
        if bad:
            if txn is not None:
                txn.abort()
            if prep_exc is not None:
                raise prep_exc  # a failing rank raises its own error (UnsupportedStateError naming the key, ...)
            raise _write_error(
                None,
                f"saving step {step} to {self.storage.join(name)} failed before writing, on rank(s) "
                f"{', '.join(str(r) for r, _ in bad)} of {self.world}: {'; '.join(f'rank {r}: {s}' for r, s in bad)}. "
                "Nothing was written; the previous checkpoint is untouched.",
            )
        if skip:
            return None
        payload = {
            "tmp_rel": tmp_rel,
            "txn": txn,
            "tensors": tensors,
            "encoded": encoded,
            "rank_tensors": rank_tensors,
            "dcp_entries": sorted(entries),
        }
        return Snapshot(step=step, name=name, metadata=metadata, entries=list(state.keys()), payload=payload)

    def persist(self, snap: Snapshot, *, background: bool) -> Committed:
        """Phases 2-4: shards + rank files, gather, manifest + commit by rank 0, outcome to all."""
        import torch.distributed.checkpoint as dcp

        coll, group = (self.ctx.bg, self.ctx.dcp_bg_group) if background else (self.ctx.ctl, self.ctx.dcp_group)
        p = snap.payload
        t0 = time.perf_counter()
        tmp_path = self.storage.join(p["tmp_rel"] or "")
        where = self.storage.join(snap.name)
        files: dict[str, tuple[int, str]] = {}
        err: str | None = None
        failed: list[int] = []
        errno_: int | None = None
        reads: list[str] = []
        md: Any = None
        writer = make_writer(tmp_path)
        try:
            with quiet_single_process():
                md = dcp.save(p["tensors"], storage_writer=writer, process_group=group, no_dist=not self.ctx.use_dist)
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            err, failed, errno_ = describe_failure(e), failed_ranks(e, self.rank), first_errno(e)
        if err is None:
            try:
                pause_between_files()
                files = write_rank_files(tmp_path, self.rank, p["rank_tensors"], p["encoded"])
                own = list(writer.written) + ([DCP_METADATA] if self.rank == 0 else [])
                for rel in own:
                    files[rel] = hash_file(self.storage, f"{p['tmp_rel']}/{rel}")
                if self._tiered:
                    reads = read_set(p["tensors"], md)
            except Exception as e:  # noqa: BLE001
                err, failed, errno_ = f"{type(e).__name__}: {e}", [self.rank], getattr(e, "errno", None)
        reports = coll.all_gather((err, failed, files, errno_, reads))
        bad = sorted({r for rep in reports if rep[0] for r in rep[1]})
        if bad:
            if p["txn"] is not None:
                p["txn"].abort()
            msg = next(rep[0] for rep in reports if rep[0])
            errnos = [rep[3] for rep in reports if rep[3]]
            hint = errno_hint(errnos[0], _RANK_HINT) if errnos else "see the failing rank's log"
            raise _write_error(
                errnos[0] if errnos else None,
                f"saving step {snap.step} to {where} failed on rank{'s' if len(bad) > 1 else ''} "
                f"{', '.join(map(str, bad))} of {self.world}: "
                f"{msg}; {hint}. Nothing was committed on any rank; the previous checkpoint is untouched.",
            )
        result = coll.broadcast(self._commit(snap, reports) if self.rank == 0 else (None, None))
        if result[0]:
            raise _write_error(
                None,
                f"committing step {snap.step} to {where} failed on rank 0: {result[0]}. Nothing was "
                "committed; the previous checkpoint is untouched.",
            )
        path, total = result[1]
        if self._tier_group:
            self._keep_in_tier(snap, reports)
        return Committed(step=snap.step, path=path, nbytes=total, seconds=time.perf_counter() - t0)

    def _keep_in_tier(self, snap: Snapshot, reports: list[Any]) -> None:
        """Tier leader, after the shared commit: copy what this node's ranks read into the node tier. A failure
        costs only speed at the next restore (the shared root has the step), so it is logged, not raised."""
        assert self.node_tier is not None
        needs = {r: needed_files(r, reports[r][4], reports[r][2]) for r in self._tier_group}
        try:
            self.node_tier.keep_step(self.storage, snap.name, needs, self.world)
        except Exception as e:  # noqa: BLE001 - the durable commit already succeeded
            log.warning(
                "rank %d: could not keep %s in the node tier %s (a restore reads it from the shared root): %s",
                self.rank,
                snap.name,
                self.node_tier.root,
                one_line(e),
            )

    def _commit(self, snap: Snapshot, reports: list[Any]) -> tuple[str | None, Any]:
        """Rank 0: ``distributed.json``, then the manifest listing every rank's files, then the commit."""
        txn = snap.payload["txn"]
        try:
            allfiles = {rel: FileEntry(size, digest) for rep in reports for rel, (size, digest) in rep[2].items()}
            doc = json.dumps(
                {
                    "world_size": self.world,
                    "dcp_entries": snap.payload["dcp_entries"],
                    "dcp_keys": len(snap.payload["tensors"]),
                    "torch": torch.__version__,
                    "writer_files": {str(r): sorted(rep[2]) for r, rep in enumerate(reports)},
                },
                indent=1,
            ).encode()
            with txn.open_write(DIST_FILE) as f:
                f.write(doc)
            h = new_hasher()
            h.update(doc)
            allfiles[DIST_FILE] = FileEntry(len(doc), h.hexdigest())
            pause_between_files()
            man = Manifest(step=snap.step, files=allfiles, metadata=dict(snap.metadata), entries=list(snap.entries))
            return None, (txn.commit(man.to_json()), man.total_bytes)
        except Exception as e:  # noqa: BLE001
            txn.abort()
            return f"{type(e).__name__}: {e} ({errno_hint(getattr(e, 'errno', None), _RANK_HINT)})", None

    # --------------------------------------------------------------------------------------------- restore
    def candidates(self, path: str | None = None) -> list[Candidate]:
        """Rank 0 lists, every rank gets the same list (so every rank walks it in step)."""
        plan: Any = None
        if self.rank == 0:
            try:
                plan = ("ok", candidates_at(path) if path is not None else root_candidates(self.storage))
            except Exception as e:  # noqa: BLE001 - exceptions do not all survive pickling: send the text
                plan = (
                    "error",
                    f"rank 0 could not list checkpoints in {path or self.storage.uri}: "
                    f"{type(e).__name__}: {one_line(e)}",
                )
        plan = self.ctx.ctl.broadcast(plan)
        if plan[0] == "error":
            raise CheckpointNotFoundError(plan[1])
        if not self._tiered:
            return plan[1]
        return self._agree_candidates(plan[1], allow_tier_only=path is None)

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

    def open(self, cand: Candidate) -> Opened:
        """Every rank hashes a share of the candidate's files and parses the DCP plan; the verdicts are agreed.

        A checkpoint whose ``.metadata`` is refused (forged classes, shards outside the manifest) fails here like a
        corrupt one, before any state changes.
        """
        agreed = self._plan.get(cand.step) if cand.root == self.storage.uri else None
        if agreed is not None and agreed.sources[self.rank] == LOCAL:
            return self._open_local(cand, agreed)
        self._source = SHARED
        st = cand.storage()
        where = st.join(cand.name)
        reason: str | None = None
        # With a tier, the ranks that read this step from the shared root verify it between them.
        readers = [r for r in range(self.world) if agreed is None or agreed.sources[r] == SHARED]
        try:
            man = check_checkpoint(st, cand.name, full=False)
            if not is_distributed_checkpoint(man):
                raise CorruptCheckpointError(
                    where,
                    f"is a single-process checkpoint (no {DIST_FILE}); restore it "
                    "with CheckpointManager(..., distributed=False) or save a "
                    "distributed one",
                )
            for rel in sorted(man.files)[readers.index(self.rank) :: len(readers)]:
                _, digest = hash_file(st, f"{cand.name}/{rel}")
                if digest != man.files[rel].xxh3:
                    raise CorruptCheckpointError(
                        where,
                        f"{rel} checksum mismatch (xxh3 {digest} != "
                        f"{man.files[rel].xxh3}): the file was altered or damaged",
                    )
            if DCP_METADATA in man.files:
                load_dcp_metadata(read_verified(st, cand.name, DCP_METADATA, man), where, man.files)
        except CorruptCheckpointError as e:
            reason = e.reason
        except OSError as e:
            reason = f"unreadable: {e}"
        return self._agree_open(cand, where, reason, st)

    def _open_local(self, cand: Candidate, agreed: AgreedStep) -> Opened:
        """This rank reads ``cand`` from its node tier: every file it needs is checked (size and xxh3) against the
        manifest copy, which must be the one agreed on."""
        assert self.node_tier is not None
        tier = self.node_tier.storage
        files = self.node_tier.needs(cand.name, self.rank, self.world)
        reason = self._verify_files(tier, cand.name, files, agreed.digest)
        st: Storage = tier
        self._source = LOCAL
        if reason is not None and agreed.in_shared and files is not None:
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
                ent = man.files.get(rel)
                got = hash_file(st, f"{name}/{rel}")
                if ent is None or got != (ent.size, ent.xxh3):
                    raise CorruptCheckpointError(where, f"{rel} does not match the manifest (size or xxh3)")
            if DCP_METADATA in man.files:
                load_dcp_metadata(read_verified(st, name, DCP_METADATA, man), where, man.files)
        except CorruptCheckpointError as e:
            return e.reason
        except OSError as e:
            return f"unreadable: {e}"
        return None

    def _agree_open(self, cand: Candidate, where: str, reason: str | None, st: Storage) -> Opened:
        bad = next((r for r in self.ctx.ctl.all_gather(reason) if r), None)
        if bad is not None:
            raise CorruptCheckpointError(where, bad)
        # The event path is the shared one on every rank; the payload is where this rank reads from.
        return Opened(
            info=CheckpointInfo(step=cand.step, name=cand.name, path=where, layout="native", valid=True), payload=st
        )

    def load(
        self, opened: Opened, state: MutableMapping[str, Any], *, only: Sequence[str] | None, strict: bool, rng: bool
    ) -> list[str]:
        loaded = load_sharded(self.ctx, opened.payload, opened.info.name, state, only=only, strict=strict, rng=rng)
        if self._tiered:
            self._log_agreement(opened)
        return loaded

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
        }
        if self.node_tier is not None:
            EventLog(os.path.join(self.node_tier.root, EVENTS_FILE), "library").emit("resume_agreed", **fields)
        if self.rank == 0 and self.storage.is_local:
            EventLog.for_dir(self.storage.local_path(), "library").emit("resume_agreed", **fields)

    # ------------------------------------------------------------------------------------------- lifecycle
    def clean_stale_tmp(self) -> None:
        if self.rank == 0:
            remove_stale_tmp(self.storage)

    def release(self) -> None:
        self.staging.release()
        self._rank_staging.release()


__all__ = ["DcpCheckpointer"]
