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

An object store as the durable root (``s3://``, ``obs://``; :mod:`resumekit.distributed.remote_commit`): a node
tier is required. Phase 1 also opens, on each node's tier leader, a staging directory in the node tier; in phase 2
DCP and the rank files write there and every rank uploads its own files under ``step_N/`` (verified while they
stream); phase 3 is the same gather (any failure: rank 0 removes the prefix, nothing counts); in phase 4 rank 0
writes ``distributed.json``, checks every object's size in one listing and PUTs ``manifest.json`` last: that PUT is
the commit. Each staging directory then becomes its node's tier copy. Restore: a node whose tier lacks the agreed
step has its tier leader download it first; every rank then reads its tier (:mod:`.dcp_tiers`).

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
    fill_tier_copy,
    needed_files,
    read_set,
    tier_groups,
    tier_keep,
)
from ..distributed.remote_commit import (
    check_uploaded,
    remove_unfinished,
    upload_files,
    verify_file,
)
from ..distributed.sharded import is_distributed_checkpoint, write_rank_files
from ..distributed.staging import ShardStaging
from ..distributed.statedict import DCP_KEY, DCP_METADATA, dcp_entries, entry_state_dict, split_tensors
from ..errors import CheckpointNotFoundError, CheckpointWriteError, ConfigError, CorruptCheckpointError
from ..events import ENV_LOCAL_TIER
from ..format import DIST_FILE, FileEntry, Manifest, new_hasher, step_dirname
from ..layouts.base import CheckpointInfo
from ..snapshot import StagingBuffers
from ..state import RNG_KEY, STATE_KEY, capture_rng, capture_state
from ..storage import Storage, Transaction
from ..storage.verified import Vouch
from ..units import errno_hint, one_line
from ..verify import Hashed, check_checkpoint_raw, hash_file, read_verified
from .base import Candidate, Committed, Opened, Snapshot, candidates_at, is_committed, remove_stale_tmp, root_candidates
from .dcp_tiers import NodeTierRestore
from .native import pause_between_files

log = logging.getLogger("resumekit")

ENV_ELASTIC_RESTART = "TORCHELASTIC_RESTART_COUNT"
_RANK_HINT = "check that directory on the failing rank's node"


def _write_error(errno_: int | None, msg: str) -> CheckpointWriteError:
    """A CheckpointWriteError whose text is ``msg`` (OSError would print "[Errno None]" for a missing errno)."""
    return CheckpointWriteError(errno_, msg) if errno_ else CheckpointWriteError(msg)


class DcpCheckpointer(NodeTierRestore):
    """The sharded :class:`~resumekit.checkpointers.base.Checkpointer`; every call is collective.

    Args:
        storage: the durable root: a local or mounted shared directory every rank can write, or an object store
            (``s3://``, ``obs://``; then ``node_tier`` is required: every rank stages its files there and uploads
            them, see :mod:`resumekit.distributed.remote_commit`).
        ctx: the process layout; :meth:`DistContext.create` by default (collective: every rank must construct).
        node_tier: this node's local tier (a directory of this node only), or None (for an object-store root:
            ``RESUMEKIT_LOCAL_TIER``, which ``resumekit run --local-tier`` exports). Ranks that name the same
            directory on the same host share it; its lowest rank writes it.
        keep_last: the job's retention; a tier made here from ``RESUMEKIT_LOCAL_TIER`` keeps
            :func:`~resumekit.distributed.nodetier.tier_keep` of it, as one passed as ``local_tier=`` does.

    Raises:
        ConfigError: an object-store root without a node-local directory.
    """

    collective = True

    def __init__(
        self,
        storage: Storage,
        ctx: DistContext | None = None,
        node_tier: NodeTier | None = None,
        keep_last: int | None = None,
    ):
        # An object store has no rename and DCP writes through a file system: every rank stages in its node's tier.
        self.remote = not storage.is_local
        if self.remote and node_tier is None:
            if not os.environ.get(ENV_LOCAL_TIER):
                raise ConfigError(
                    f"distributed checkpoints to {storage.uri} are staged on each node's local disk first: pass "
                    f"local_tier=DIR (a directory of this node) or run under resumekit run --local-tier DIR"
                )
            node_tier = NodeTier(os.environ[ENV_LOCAL_TIER], keep=tier_keep(keep_last))
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
        self._group = group  # the ranks sharing this rank's tier (this one included), lowest (the leader) first
        self._tier_group = group if group and group[0] == self.rank else []  # non-empty on a tier leader only
        self._plan: dict[int, AgreedStep] = {}
        self._source = SHARED  # where this rank read the step it opened last (for the resume_agreed event)
        self._inventories: list[list[int]] = []
        self._downloaded = False  # this node's leader fetched the step opened last from the object store
        self._fresh: dict[str, Hashed] = {}  # what this node's leader just downloaded into the tier, verified
        self._refetched: dict[str, str] | None = None  # the tier copy was damaged and fetched again (why, whence)
        self._hashed = 0  # bytes this rank hashed verifying the step opened last
        self._vouch: Vouch | None = None  # what spared that verification hashing (the load reads with it)
        self._opening: AgreedStep | None = None  # where every rank reads the tier step being opened

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
        skip, tmp_rel, stage_rel = False, None, None
        txn: Transaction | None = None
        staged: Transaction | None = None  # (object-store root, tier leader) the node's staging directory
        if self.rank == 0 and err is None:
            try:
                skip = skip_if_committed and is_committed(self.storage, name)
                if not skip:
                    txn = self.storage.begin(name)
                    # A local root's transaction has a tmp_path (DCP writes there); an object store's is the prefix
                    # every rank uploads under (step_N, or a keep name when a valid step_N is being replaced).
                    tmp_rel = txn.name if self.remote else os.path.basename(txn.tmp_path)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001
                prep_exc, err = e, f"{type(e).__name__}: {e}"
        if self.remote and self._tier_group and err is None:
            try:
                assert self.node_tier is not None
                self.node_tier.remove_stale_tmp()  # one save at a time: a tmp dir here is a killed save's
                staged = self.node_tier.storage.begin(name)  # this node's ranks stage their files here
                stage_rel = os.path.basename(staged.tmp_path)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001
                prep_exc, err = e, f"{type(e).__name__}: {e}"
        statuses = self.ctx.ctl.all_gather((err, skip, tmp_rel, stage_rel))
        skip, tmp_rel = statuses[0][1], statuses[0][2]
        if self._group:
            stage_rel = statuses[self._group[0]][3]
        bad = [(r, s[0]) for r, s in enumerate(statuses) if s[0]]
        if (bad or skip) and staged is not None:
            staged.abort()
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
            "stage": staged,
            "stage_rel": stage_rel,
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
        # Where this rank's files are written: the shared root's tmp directory, or (object store) its node's stage.
        local_st: Storage = self.storage
        local_rel = p["tmp_rel"]
        if self.remote:
            assert self.node_tier is not None
            local_st, local_rel = self.node_tier.storage, p["stage_rel"]
        tmp_path = local_st.join(local_rel or "")
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
                    files[rel] = hash_file(local_st, f"{local_rel}/{rel}")
                if self._tiered:
                    reads = read_set(p["tensors"], md)
                if self.remote:
                    # Each rank uploads its own files (DCP's shards are per rank): the upload bandwidth of every
                    # node is used at once, and no rank waits for another's bytes.
                    upload_files(tmp_path, files, self.storage, p["tmp_rel"], between=pause_between_files)
            except Exception as e:  # noqa: BLE001
                err, failed, errno_ = f"{type(e).__name__}: {e}", [self.rank], getattr(e, "errno", None)
        reports = coll.all_gather((err, failed, files, errno_, reads))
        bad = sorted({r for rep in reports if rep[0] for r in rep[1]})
        if bad:
            if p["txn"] is not None:
                p["txn"].abort()  # on an object store: every rank's uploaded objects go with the prefix
            if p["stage"] is not None:
                p["stage"].abort()
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
        path, total, raw = result[1]
        if self._tier_group:
            self._keep_in_tier(snap, reports, raw)
        return Committed(step=snap.step, path=path, nbytes=total, seconds=time.perf_counter() - t0)

    def _keep_in_tier(self, snap: Snapshot, reports: list[Any], raw: bytes) -> None:
        """Tier leader, after the shared commit: copy what this node's ranks read into the node tier (on an object
        store: the stage directory becomes the tier copy, only other nodes' files it reads are downloaded). A
        failure costs only speed at the next restore (the shared root has the step), so it is logged, not raised."""
        assert self.node_tier is not None
        needs = {r: needed_files(r, reports[r][4], reports[r][2]) for r in self._tier_group}
        try:
            if self.remote:
                man = Manifest.from_json(raw, self.storage.join(snap.name))
                present = {f for r in self._tier_group for f in reports[r][2]}
                fill_tier_copy(snap.payload["stage"], self.storage, snap.name, raw, man, needs, self.world, present)
                self.node_tier.retain(protect=snap.name)
            else:
                self.node_tier.keep_step(self.storage, snap.name, needs, self.world)
        except Exception as e:  # noqa: BLE001 - the durable commit already succeeded
            if snap.payload["stage"] is not None:
                snap.payload["stage"].abort()
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
                    # What each rank reads back at this world size: a node fetching the step from an object store
                    # into its tier downloads only its ranks' files.
                    **({"reader_files": {str(r): rep[4] for r, rep in enumerate(reports)}} if self._tiered else {}),
                },
                indent=1,
            ).encode()
            with txn.open_write(DIST_FILE) as f:
                f.write(doc)
            h = new_hasher()
            h.update(doc)
            allfiles[DIST_FILE] = FileEntry(len(doc), h.hexdigest())
            pause_between_files()
            if self.remote:
                # Every rank's objects are there at their size before the manifest vouches for them (one listing).
                check_uploaded(self.storage, txn.name, {k: v for k, v in allfiles.items() if k != DIST_FILE})
            man = Manifest(step=snap.step, files=allfiles, metadata=dict(snap.metadata), entries=list(snap.entries))
            raw = man.to_json()
            return None, (txn.commit(raw), man.total_bytes, raw)
        except Exception as e:  # noqa: BLE001
            txn.abort()
            return f"{type(e).__name__}: {e} ({errno_hint(getattr(e, 'errno', None), _RANK_HINT)})", None

    # --------------------------------------------------------------------------------------------- restore
    def candidates(self, path: str | None = None) -> list[Candidate]:
        """Rank 0 lists, every rank gets the same list (so every rank walks it in step)."""
        plan: Any = None
        if path is not None:
            path = self._in_root(path)
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

    def open(self, cand: Candidate) -> Opened:
        """Every rank hashes a share of the candidate's files and parses the DCP plan; the verdicts are agreed.

        A checkpoint whose ``.metadata`` is refused (forged classes, shards outside the manifest) fails here like a
        corrupt one, before any state changes.
        """
        agreed = self._plan.get(cand.step) if cand.root == self.storage.uri else None
        self._downloaded, self._fresh, self._refetched, self._hashed, self._vouch = False, {}, None, 0, None
        if self.remote and cand.root == self.storage.uri:
            return self._open_local(cand, self._fetch(cand, agreed))
        if agreed is not None and agreed.sources[self.rank] == LOCAL:
            return self._open_local(cand, agreed)
        self._source = SHARED
        st = cand.storage()
        where = st.join(cand.name)
        if not st.is_local:
            # Only a run's own object-store root is read (through the node tiers); DCP reads files.
            return self._agree_open(
                cand,
                where,
                f"a sharded checkpoint in an object store is restored through its run: pass {cand.root} "
                "as the checkpoint root (with local_tier=) instead",
                st,
            )
        reason: str | None = None
        # With a tier, the ranks that read this step from the shared root verify it between them.
        readers = [r for r in range(self.world) if agreed is None or agreed.sources[r] == SHARED]
        try:
            raw, man = check_checkpoint_raw(st, cand.name, full=False)
            if not is_distributed_checkpoint(man):
                raise CorruptCheckpointError(
                    where,
                    f"is a single-process checkpoint (no {DIST_FILE}); restore it "
                    "with CheckpointManager(..., distributed=False) or save a "
                    "distributed one",
                )
            # the supervisor's token, when it is for this step (load_sharded takes it too, for the rank files)
            vouch = self._vouch = Vouch(st.local_path(cand.name), raw, man.files)
            for rel in sorted(man.files)[readers.index(self.rank) :: len(readers)]:
                self._hashed += verify_file(st, cand.name, rel, man.files[rel], where, vouch)
            if DCP_METADATA in man.files:
                load_dcp_metadata(read_verified(st, cand.name, DCP_METADATA, man), where, man.files)
        except CorruptCheckpointError as e:
            reason = e.reason
        except OSError as e:
            reason = f"unreadable: {e}"
        return self._agree_open(cand, where, reason, st)

    def _agree_open(
        self, cand: Candidate, where: str, reason: str | None, st: Storage, repairable: bool = False
    ) -> Opened:
        """Every rank's verdict, agreed: the first failing rank's reason fails the candidate on every rank.

        Args:
            repairable: this rank read its node tier's copy of a step the shared root holds: when every failing
                rank is such a one, the damaged copies are fetched again and checked (one more gather of the
                outcome, one more of the verdicts; every rank sees the same verdicts, so every rank takes it).
        """
        verdicts = self.ctx.ctl.all_gather((reason, repairable))
        if any(v[0] for v in verdicts) and all(v[1] for v in verdicts if v[0]):
            reason = self._repair(cand, [v[0] for v in verdicts], repairable)
            verdicts = self.ctx.ctl.all_gather((reason, False))
        bad = next((v[0] for v in verdicts if v[0]), None)
        if bad is not None:
            raise CorruptCheckpointError(where, bad)
        # The event path is the shared one on every rank; the payload is where this rank reads from.
        return Opened(
            info=CheckpointInfo(step=cand.step, name=cand.name, path=where, layout="native", valid=True), payload=st
        )

    def load(
        self, opened: Opened, state: MutableMapping[str, Any], *, only: Sequence[str] | None, strict: bool, rng: bool
    ) -> list[str]:
        loaded = load_sharded(
            self.ctx, opened.payload, opened.info.name, state, only=only, strict=strict, rng=rng, vouch=self._vouch
        )
        if self._tiered:
            self._log_agreement(opened)
        return loaded

    # ------------------------------------------------------------------------------------------- lifecycle
    def clean_stale_tmp(self) -> None:
        if self.rank == 0:
            remove_stale_tmp(self.storage)
            if self.remote:
                remove_unfinished(self.storage)  # step_N/ prefixes of killed uploads, their multipart uploads

    def release(self) -> None:
        self.staging.release()
        self._rank_staging.release()


__all__ = ["DcpCheckpointer"]
