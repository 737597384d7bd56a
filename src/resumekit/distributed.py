"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), with rank agreement on commit and signals.

Used by :class:`~resumekit.manager.CheckpointManager` when ``distributed=True`` (or, by default, whenever
``torch.distributed`` is initialised); the user API does not change. A distributed checkpoint is a native
checkpoint directory whose manifest lists DCP's files, so ``resumekit ls/latest/verify/gc`` handle it as any other::

    step_000001200/
        .metadata                DCP's global plan (a pickle: see "Loading safety" below), written by rank 0
        __0_0.distcp ...         DCP shards: rank R writes __R_*.distcp with its part of every model/optimizer
        rank_00000/state.json    rank R's non-tensor state (scheduler, scaler, sampler, plain values, RNGs) and the
        rank_00000/tensors.safetensors   non-tensor skeleton of the model/optimizer state dicts, in our JSON codec
        distributed.json         world size, entries saved through DCP, torch version (rank 0)
        manifest.json            written last by rank 0: every file above with its size and xxh3 checksum

Save protocol (every phase ends in a collective, so one rank's failure is every rank's failure and nothing hangs):

1. every rank captures its state (``get_model_state_dict`` / ``get_optimizer_state_dict`` for modules and
   optimizers, our codec for the rest); rank 0 creates the step's tmp directory; one ``all_gather_object`` shares
   the tmp name and every rank's "prepared" status;
2. DCP writes every rank's shards into the tmp directory (DCP's own collectives; a failing rank fails ``dcp.save``
   on all ranks), then each rank writes and fsyncs its ``rank_R/`` files and checksums the files it wrote;
3. one ``all_gather_object`` of each rank's file table or error; any error: rank 0 removes the tmp directory and
   every rank raises :class:`~resumekit.errors.CheckpointWriteError` naming the failing rank(s);
4. rank 0 writes ``manifest.json`` (fsync), renames tmp -> ``step_N``, fsyncs the parent, applies retention, and
   broadcasts the outcome, which every rank returns or raises.

Asynchronous saves: phase 1 runs on the training thread and copies every tensor into reused host buffers (DTensor
shards keep their sharding spec); phases 2-4 run on each rank's background thread over a *separate* gloo process
group created for it, so the background collectives never interleave with the training thread's (DDP's, ours).
The commit therefore happens in the background as soon as every rank's persist finished; an error is raised on
every rank at its next save, ``wait()`` or ``close()``.

Restore: rank 0 chooses (newest first, or the requested path), every rank verifies the checksums of a share of the
candidate's files (so verification is parallel), the verdicts are all-gathered; the first candidate valid on all
ranks is loaded by all ranks. Tensors are loaded by DCP into the current model/optimizer layout, which is what makes
resharding work (a checkpoint saved by W ranks restores on any number of ranks for FSDP2/DTensor state;
replicated DDP state restores anywhere). Rank R loads the non-tensor state of saved rank R, or of rank 0 when the
checkpoint had fewer ranks; its RNG state only from saved rank R (a new rank keeps the RNG it was seeded with).

Loading safety: DCP's ``FileSystemReader.read_metadata`` in torch 2.x calls plain ``pickle.load`` on ``.metadata``,
and its default load planner reads non-tensor ("bytes") items with ``torch.load(weights_only=False)``; only tensor
items use ``weights_only=True``. We never let DCP unpickle anything freely: :func:`load_dcp_metadata` reads
``.metadata`` itself after checking its size and xxh3 against our JSON manifest (so only bytes we wrote are parsed),
with :class:`MetadataUnpickler`, an allow-list that accepts only DCP's metadata classes, torch dtypes/Size/layout and
pathlib paths; it checks that every shard the plan references is a safe relative path listed in the manifest. DCP
then gets a reader (``VerifiedReader``) that hands it this parsed plan instead of calling ``pickle.load`` and refuses
any bytes item (we save only tensors through DCP; everything else is JSON). Shards are read by DCP with
``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, MutableMapping, Optional, Sequence,
                    Tuple)

import torch

from .codec import TreeEncoder, decode, dumps_tree, read_tensors, write_tensors
from .errors import (
    CheckpointNotFoundError,
    CheckpointWriteError,
    ConfigError,
    CorruptCheckpointError,
    StateMismatchError,
)
from .events import ENV_RESUME_FROM, EventLog, Heartbeat
from .format import (
    MANIFEST,
    TENSORS_FILE,
    TREE_FILE,
    FileEntry,
    Manifest,
    metadata_jsonable,
    new_hasher,
    parse_step_dirname,
    step_dirname,
    validate_relpath,
)
from .layouts.base import CheckpointInfo, order_by_step
from .layouts.native import check_checkpoint, hash_file, read_manifest
from .state import RNG_KEY, STATE_KEY, apply_state, capture_rng, capture_state, restore_rng
from .storage import Storage, open_storage

if TYPE_CHECKING:  # pragma: no cover
    from .manager import CheckpointManager

log = logging.getLogger("resumekit")

DIST_FILE = "distributed.json"
DCP_METADATA = ".metadata"
DCP_KEY = "dcp"
_REF = "__rk_dcp__"  # marks where a DCP-saved tensor sits in a state dict's JSON skeleton
_PLAIN_OPTIM = "__rk_plain_optimizer__"  # an optimizer saved before its first step (no state to shard)
ENV_ELASTIC_RESTART = "TORCHELASTIC_RESTART_COUNT"


def rank_dir(rank: int) -> str:
    """Directory of one rank's non-tensor files inside a checkpoint."""
    return f"rank_{rank:05d}"


def is_distributed_checkpoint(man: Manifest) -> bool:
    """True for a checkpoint written through DCP by this module."""
    return DIST_FILE in man.files


# ------------------------------------------------------------------------------------------- process groups
class Collectives:
    """The few collectives the protocol needs, over a given group; trivial when there is only one process.

    Object collectives go over gloo groups created here (CPU, whatever the training backend), so they cost no
    device synchronisation and never share a communicator with the training's collectives.
    """

    def __init__(self, group: Any, rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    def all_gather(self, obj: Any) -> List[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def any_true(self, *flags: bool) -> Tuple[bool, ...]:
        """Element-wise OR over ranks: one tiny all_reduce(MAX) of an int tensor on CPU."""
        if self.world_size == 1:
            return tuple(bool(f) for f in flags)
        import torch.distributed as dist

        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(bool(v) for v in t.tolist())


@dataclass
class DistContext:
    """This process's place in the job and the two gloo groups resumekit uses.

    Attributes:
        rank / world_size / local_rank: from torch.distributed (0 / 1 / 0 without a process group).
        ctl: collectives of the training thread (restore, save agreement, preemption flag).
        bg: collectives of the background persist thread (async saves); a separate group so its messages never
            interleave with the training thread's.
        dcp_group / dcp_bg_group: the process groups handed to DCP on each thread (None when not distributed).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ctl: Collectives = field(default_factory=lambda: Collectives(None, 0, 1))
    bg: Collectives = field(default_factory=lambda: Collectives(None, 0, 1))
    dcp_group: Any = None
    dcp_bg_group: Any = None

    @property
    def use_dist(self) -> bool:
        return self.world_size > 1

    @classmethod
    def create(cls) -> "DistContext":
        """From the initialised default process group; must be called by every rank (group creation is
        collective). Without an initialised group: a single process (world size 1)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if (rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0):
            log.warning("torchrun shares its rendezvous store with the workers and restarts the group up to %s "
                        "times: a restarted group can read the previous attempt's addresses and fail with 'Gloo "
                        "connectFullMesh failed' or NCCL connect errors (pytorch#135712). Export "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun to avoid it",
                        os.environ.get("TORCHELASTIC_MAX_RESTARTS"))
        if world == 1:
            return cls(rank=rank, world_size=1, local_rank=local_rank)
        ctl = dist.new_group(backend="gloo")
        bg = dist.new_group(backend="gloo")
        return cls(rank=rank, world_size=world, local_rank=local_rank, ctl=Collectives(ctl, rank, world),
                   bg=Collectives(bg, rank, world), dcp_group=ctl, dcp_bg_group=bg)


# ----------------------------------------------------------------------------------- splitting state dicts
def split_tensors(tree: Any, prefix: str, out: Dict[str, torch.Tensor]) -> Any:
    """Replace every tensor leaf of ``tree`` by a reference ``{_REF: key}`` and put the tensor in ``out[key]``.

    The tensors go through DCP (sharded, reshardable), the skeleton through our JSON codec: DCP would otherwise
    store the non-tensor leaves (learning rates, betas, param-group lists) as pickled "bytes" items.
    """
    if isinstance(tree, torch.Tensor):
        if prefix in out:
            raise StateMismatchError(f"two tensors of the state map to the DCP key {prefix!r}; rename one")
        out[prefix] = tree
        return {_REF: prefix}
    if isinstance(tree, dict):
        if _REF in tree:
            raise StateMismatchError(f"state{prefix!r} holds the reserved key {_REF!r}")
        return {k: split_tensors(v, f"{prefix}/{k}", out) for k, v in tree.items()}
    if isinstance(tree, list):
        return [split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(tree)]
    if isinstance(tree, tuple):
        return tuple(split_tensors(v, f"{prefix}/{i}", out) for i, v in enumerate(tree))
    return tree


def join_tensors(tree: Any, tensors: Mapping[str, Any]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(tree, dict):
        if set(tree) == {_REF}:
            return tensors[tree[_REF]]
        return {k: join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [join_tensors(v, tensors) for v in tree]
    if isinstance(tree, tuple):
        return tuple(join_tensors(v, tensors) for v in tree)
    return tree


def ref_keys(tree: Any) -> List[str]:
    """The DCP keys a skeleton references."""
    out: List[str] = []

    def walk(t: Any) -> None:
        if isinstance(t, dict):
            if set(t) == {_REF}:
                out.append(t[_REF])
                return
            for v in t.values():
                walk(v)
        elif isinstance(t, (list, tuple)):
            for v in t:
                walk(v)

    walk(tree)
    return out


def dcp_entries(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries saved through DCP: modules (plain, DDP, FSDP2) and optimizers."""
    return {k: v for k, v in state.items()
            if isinstance(v, (torch.nn.Module, torch.optim.Optimizer))}


def optimizer_owner(key: str, optim: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module]) -> torch.nn.Module:
    """The module whose parameters ``optim`` updates (DCP's optimizer state dicts are keyed by its FQNs)."""
    ids = {id(p) for g in optim.param_groups for p in g["params"]}
    for m in modules.values():
        if any(id(p) in ids for p in m.parameters()):
            return m
    raise StateMismatchError(
        f"state[{key!r}] is an optimizer whose parameters belong to none of the modules in the state "
        f"({sorted(modules)}); put the model it trains in the state passed to save/restore")


def _entry_state_dict(key: str, obj: Any, modules: Mapping[str, torch.nn.Module]) -> Any:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    if isinstance(obj, torch.nn.Module):
        return get_model_state_dict(obj)
    if not obj.state:
        # get_optimizer_state_dict would initialise the state with a zero-gradient step (step=1, zero moments),
        # changing the run; an optimizer that has not stepped yet has nothing to shard anyway.
        return {_PLAIN_OPTIM: obj.state_dict()}
    return get_optimizer_state_dict(optimizer_owner(key, obj, modules), obj)


# ------------------------------------------------------------------------------------------------- staging
class ShardStaging:
    """Host copies of the DCP tensors for asynchronous saves, allocated once and reused while shapes hold.

    A DTensor is staged as a DTensor with the same sharding spec whose local shard is a host buffer, so DCP
    plans the write exactly as for the live tensor.
    """

    def __init__(self) -> None:
        self._bufs: Dict[str, Any] = {}

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        return t.to_local() if isinstance(t, DTensor) else t

    def _alloc(self, t: torch.Tensor) -> Any:
        from torch.distributed.tensor import DTensor

        local = self._local(t).detach()
        buf = torch.empty(local.shape, dtype=local.dtype, pin_memory=local.is_cuda)
        if isinstance(t, DTensor):
            if t.device.type == "cpu":
                return DTensor.from_local(buf, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                          stride=t.stride())
            # from_local would move the buffer to the mesh's device; DCP's own async staging keeps the spec of a
            # device DTensor with a host local shard this way.
            staged = t.detach().to("cpu")
            staged._local_tensor = buf  # noqa: SLF001 - DTensor has no public "replace the local shard"
            return staged
        return buf

    def snapshot(self, tensors: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        any_cuda = False
        for k, t in tensors.items():
            src = self._local(t).detach()
            buf = self._bufs.get(k)
            if buf is None or self._local(buf).shape != src.shape or self._local(buf).dtype != src.dtype:
                buf = self._alloc(t)
                self._bufs[k] = buf
            self._local(buf).copy_(src, non_blocking=src.is_cuda)
            any_cuda |= src.is_cuda
            out[k] = buf
        if any_cuda:
            torch.cuda.synchronize()
        for stale in set(self._bufs) - set(tensors):
            del self._bufs[stale]
        return out

    def release(self) -> None:
        self._bufs.clear()


# --------------------------------------------------------------------------------------- DCP storage I/O
def _recording_writer_cls() -> type:
    from torch.distributed.checkpoint import FileSystemWriter

    class RecordingWriter(FileSystemWriter):
        """DCP's file writer that remembers which files this rank wrote (for the manifest)."""

        written: List[str]

        def write_data(self, plan: Any, planner: Any) -> Any:
            self.written = []
            fut = super().write_data(plan, planner)
            # FileSystemWriter completes synchronously; the future already holds the results.
            self.written = sorted({wr.storage_data.relative_path for wr in fut.wait()})
            return fut

    return RecordingWriter


def make_writer(path: str) -> Any:
    """A DCP writer into ``path``: one file per rank, fsynced, single-threaded (saves run beside training)."""
    writer = _recording_writer_cls()(path, single_file_per_rank=True, sync_files=True, thread_count=1)
    writer.written = []
    return writer


_SAFE_TORCH_CLASSES = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
} | {("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only the classes DCP puts there; anything else is refused, so a
    forged file cannot name a callable (``os.system``, ``builtins.eval``, ...)."""

    def __init__(self, data: bytes, where: str):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_TORCH_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format,
                                                                           torch.layout)):
            return getattr(torch, name)
        raise CorruptCheckpointError(self.where, f"{DCP_METADATA} refers to {module}.{name}, which a DCP metadata "
                                                 "file never contains; refusing to load it (forged or foreign file)")


def load_dcp_metadata(data: bytes, where: str, files: Mapping[str, FileEntry]) -> Any:
    """Parse verified ``.metadata`` bytes and check that every shard it points to is a listed, safe path."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        md = MetadataUnpickler(data, where).load()
    except CorruptCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CorruptCheckpointError(where, f"{DCP_METADATA} does not parse: {e}") from None
    if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
        raise CorruptCheckpointError(where, f"{DCP_METADATA} is not a DCP Metadata object")
    for info in md.storage_data.values():
        rel = getattr(info, "relative_path", None)
        validate_relpath(rel, where)
        if rel not in files:
            raise CorruptCheckpointError(where, f"{DCP_METADATA} points to {rel!r}, which the manifest does not list")
    return md


def _verified_reader_cls() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.planner import LoadItemType
    from torch.distributed.checkpoint.metadata import StorageMeta

    class VerifiedReader(FileSystemReader):
        """DCP's file reader with our metadata check instead of ``pickle.load`` and no bytes items."""

        def __init__(self, path: str, metadata: Any, where: str):
            super().__init__(path)
            self._md = metadata
            self._where = where

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise CorruptCheckpointError(self._where, "rank-local DCP metadata is not used by resumekit")
            md = copy.copy(self._md)
            md.storage_meta = copy.copy(md.storage_meta) if md.storage_meta is not None else StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

        def read_data(self, plan: Any, planner: Any) -> Any:
            for item in plan.items:
                if item.type == LoadItemType.BYTE_IO:
                    # DCP's planner would torch.load(weights_only=False) it; resumekit never writes bytes items.
                    raise CorruptCheckpointError(
                        self._where, f"{DCP_METADATA} declares {item.storage_index.fqn!r} as a pickled object; "
                        "resumekit checkpoints store only tensors through DCP")
            return super().read_data(plan, planner)

    return VerifiedReader


# ---------------------------------------------------------------------------------------- error helpers
def _describe(e: BaseException) -> str:
    if type(e).__name__ == "CheckpointException" and hasattr(e, "failures"):
        parts = []
        failures = sorted(e.failures.items())  # type: ignore[attr-defined]
        for r, pair in failures:
            exc = pair[0] if isinstance(pair, tuple) else pair
            text = f"{type(exc).__name__}: {exc}"
            parts.append(text if len(failures) == 1 else f"rank {r}: {text}")
        return "; ".join(parts)
    return f"{type(e).__name__}: {e}"


def _failed_ranks(e: BaseException, default: int) -> List[int]:
    if type(e).__name__ == "CheckpointException" and hasattr(e, "failures"):
        return sorted(e.failures)  # type: ignore[attr-defined]
    return [default]


def _hint(e: BaseException) -> str:
    err = getattr(e, "errno", None)
    return {28: "the disk is full: free space or lower keep_last",
            13: "permission denied: make the checkpoint directory writable",
            30: "the file system is read-only"}.get(err or 0, "check that directory on the failing rank's node")


def _raise_if_failed(statuses: Sequence[Optional[str]], make: Callable[[List[int], str], BaseException]) -> None:
    bad = [(r, s) for r, s in enumerate(statuses) if s]
    if bad:
        raise make([r for r, _ in bad], "; ".join(f"rank {r}: {s}" for r, s in bad))


# -------------------------------------------------------------------------------------------- the engine
@dataclass
class _Prepared:
    step: int
    name: str
    tmp_rel: Optional[str]
    skip: bool
    tensors: Dict[str, Any]
    encoded: Any
    rank_tensors: Dict[str, torch.Tensor]
    entries: List[str]
    dcp_keys: List[str]
    meta: Dict[str, Any]
    dcp_entries: List[str] = field(default_factory=list)
    txn: Any = None


class DistributedCheckpointer:
    """The sharded save/restore path of a :class:`~resumekit.manager.CheckpointManager`.

    Args:
        manager: the owning manager (its options, storage, event log, retention and background persister).
        ctx: the process layout; :meth:`DistContext.create` by default.
    """

    def __init__(self, manager: "CheckpointManager", ctx: Optional[DistContext] = None):
        self.m = manager
        if getattr(manager, "tier", None) is not None:
            raise ConfigError("CheckpointOptions.local_tier is not supported with distributed checkpoints yet: "
                              "save to a shared file system path (or pass distributed=False for a single process)")
        if not manager.storage.is_local:
            raise ConfigError(
                f"distributed checkpoints need a local or mounted shared directory (every rank writes its shards "
                f"there); {manager.storage.uri} is an object store. Use a shared file system path (NFS, SFS Turbo, "
                "Lustre) or a per-node local path with a single node")
        self.ctx = ctx or DistContext.create()
        self.staging = ShardStaging()
        # One writer of the event log (rank 0) and one heartbeat per node (local rank 0): a hung rank stalls
        # rank 0 at its next collective, so the node's heartbeat still goes stale.
        if self.ctx.rank != 0:
            manager.events = EventLog(None, manager.events.source)
        if self.ctx.local_rank != 0:
            manager.heartbeat = Heartbeat(None)

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def world(self) -> int:
        return self.ctx.world_size

    # ------------------------------------------------------------------------------------------- agreement
    @property
    def needs_agreement(self) -> bool:
        """Whether ``maybe_save`` must ask the other ranks each step.

        Step-based saves are the same decision on every rank; a signal (SIGTERM on one rank) or a clock
        (``every_seconds``) is not. The question is one all_reduce of two int32 on the gloo group (tens of
        microseconds within a node), made only when one of those can differ. A job with ``handle_sigterm=False``
        that calls ``request_preemption()`` must call it on every rank.
        """
        o = self.m.options
        return self.world > 1 and (o.handle_sigterm or o.every_seconds is not None)

    def agree(self, preempt: bool, due: bool) -> Tuple[bool, bool]:
        """(any rank preempted, any rank due): every rank takes the same save decision at the same step."""
        return self.ctx.ctl.any_true(preempt, due)  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, state: Mapping[str, Any], *, metrics: Optional[Mapping[str, Any]], block: bool,
             t0: float) -> Optional[str]:
        m = self.m
        # Join the previous background save before raising its error: the error was agreed by all ranks, and
        # joining first makes every rank raise it at this same call.
        waited = m._persister.wait(raise_error=True)
        prep = self._prepare(step, state, metrics, stage=not block)
        if prep.skip:
            log.info("step %d is already committed at %s; not saving it again", step, m.storage.join(prep.name))
            m.last_saved_step = step
            return None
        if block:
            blocking: Optional[float] = None
            self._persist(prep, self.ctx.ctl, self.ctx.dcp_group, None, waited, t0)
        else:
            blocking = time.perf_counter() - t0
            m._persister.submit(lambda: self._persist(prep, self.ctx.bg, self.ctx.dcp_bg_group, blocking, waited,
                                                      t0))
        m.last_saved_step = step
        m._last_save_time = time.monotonic()
        return m.storage.join(prep.name)

    def _prepare(self, step: int, state: Mapping[str, Any], metrics: Optional[Mapping[str, Any]],
                 stage: bool) -> _Prepared:
        """Phase 1 (training thread): capture and encode; rank 0 opens the transaction; all ranks agree."""
        m = self.m
        name = step_dirname(step)
        err: Optional[str] = None
        tensors: Dict[str, Any] = {}
        encoded: Any = None
        rank_tensors: Dict[str, torch.Tensor] = {}
        meta: Dict[str, Any] = {}
        entries: Dict[str, Any] = {}
        prep_exc: Optional[BaseException] = None
        try:
            entries = dcp_entries(state)
            modules = {k: v for k, v in entries.items() if isinstance(v, torch.nn.Module)}
            skeleton = {k: split_tensors(_entry_state_dict(k, v, modules), k, tensors) for k, v in entries.items()}
            rest = {k: v for k, v in state.items() if k not in entries}
            enc = TreeEncoder()
            encoded = {STATE_KEY: enc.encode(capture_state(rest)), DCP_KEY: enc.encode(skeleton, ("<dcp>",))}
            if m.options.save_rng:
                encoded[RNG_KEY] = enc.encode(capture_rng(), ("<rng>",))
            meta = metadata_jsonable(metrics)
            if stage:
                tensors = self.staging.snapshot(tensors)
                rank_tensors = m._staging.snapshot(enc.tensors) if m._staging is not None else \
                    {k: t.detach().cpu().clone() for k, t in enc.tensors.items()}
            else:
                rank_tensors = {k: t.detach().cpu().contiguous() for k, t in enc.tensors.items()}
        except Exception as e:  # noqa: BLE001 - shared with every rank below, then raised
            prep_exc, err = e, f"{type(e).__name__}: {e}"
        skip, tmp_rel, txn = False, None, None
        if self.rank == 0 and err is None:
            try:
                skip = m._already_committed(step, name)
                if not skip:
                    txn = m.storage.begin(name)
                    tmp_rel = os.path.basename(txn.tmp_path)
            except Exception as e:  # noqa: BLE001
                prep_exc, err = e, f"{type(e).__name__}: {e}"
        statuses = self.ctx.ctl.all_gather((err, skip, tmp_rel))
        skip, tmp_rel = statuses[0][1], statuses[0][2]
        errors = [s[0] for s in statuses]
        if any(errors):
            if txn is not None:
                txn.abort()
            if prep_exc is not None:
                raise prep_exc  # a failing rank raises its own error (UnsupportedStateError naming the key, ...)
            _raise_if_failed(errors, lambda ranks, msg: _write_error(
                None, f"saving step {step} to {m.storage.join(name)} failed before writing, on rank(s) "
                f"{', '.join(map(str, ranks))} of {self.world}: {msg}. Nothing was written; the previous "
                "checkpoint is untouched."))
        return _Prepared(step=step, name=name, tmp_rel=tmp_rel, skip=skip, tensors=tensors, encoded=encoded,
                         rank_tensors=rank_tensors, entries=list(state.keys()), dcp_keys=sorted(tensors), meta=meta,
                         dcp_entries=sorted(entries), txn=txn)

    def _persist(self, p: _Prepared, coll: Collectives, dcp_group: Any, blocking: Optional[float], waited: float,
                 t0: float) -> str:
        """Phases 2-4: shards + rank files, gather, manifest + commit by rank 0, outcome to all."""
        import torch.distributed.checkpoint as dcp

        from .checkpoint import _pause
        from .storage.local import _DurableFile, fsync_dir

        m = self.m
        t_persist = time.perf_counter()
        tmp_path = m.storage.join(p.tmp_rel or "")
        where = m.storage.join(p.name)
        files: Dict[str, Tuple[int, str]] = {}
        err: Optional[str] = None
        failed: List[int] = []
        errno_: Optional[int] = None
        writer = make_writer(tmp_path)
        try:
            with _quiet_single_process():
                dcp.save(p.tensors, storage_writer=writer, process_group=dcp_group, no_dist=not self.ctx.use_dist)
        except BaseException as e:  # noqa: BLE001 - DCP raises CheckpointException (a BaseException) on all ranks
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            err, failed = _describe(e), _failed_ranks(e, self.rank)
            errno_ = _first_errno(e)
        if err is None:
            try:
                _pause()
                rdir = rank_dir(self.rank)
                os.makedirs(os.path.join(tmp_path, rdir), exist_ok=True)
                h = new_hasher()
                with _DurableFile(os.path.join(tmp_path, rdir, TENSORS_FILE)) as f:
                    n = write_tensors(f, p.rank_tensors, h)
                files[f"{rdir}/{TENSORS_FILE}"] = (n, h.hexdigest())
                blob = dumps_tree(p.encoded)
                h = new_hasher()
                h.update(blob)
                with _DurableFile(os.path.join(tmp_path, rdir, TREE_FILE)) as f:
                    f.write(blob)
                files[f"{rdir}/{TREE_FILE}"] = (len(blob), h.hexdigest())
                fsync_dir(os.path.join(tmp_path, rdir))
                own = list(writer.written) + ([DCP_METADATA] if self.rank == 0 else [])
                for rel in own:
                    files[rel] = hash_file(m.storage, f"{p.tmp_rel}/{rel}")
            except Exception as e:  # noqa: BLE001
                err, failed, errno_ = f"{type(e).__name__}: {e}", [self.rank], getattr(e, "errno", None)
        reports = coll.all_gather((err, failed, files, errno_))
        bad = sorted({r for rep in reports if rep[0] for r in rep[1]})
        if bad:
            if p.txn is not None:
                p.txn.abort()
            msg = next(rep[0] for rep in reports if rep[0])
            errnos = [rep[3] for rep in reports if rep[3]]
            hint = _hint(OSError(errnos[0], "")) if errnos else "see the failing rank's log"
            raise _write_error(
                errnos[0] if errnos else None,
                f"saving step {p.step} to {where} failed on rank{'s' if len(bad) > 1 else ''} "
                f"{', '.join(map(str, bad))} of {self.world}: "
                f"{msg}; {hint}. Nothing was committed on any rank; the previous checkpoint is untouched.")
        result: Tuple[Optional[str], Any] = (None, None)
        if self.rank == 0:
            try:
                allfiles: Dict[str, FileEntry] = {}
                for rep in reports:
                    for rel, (size, digest) in rep[2].items():
                        allfiles[rel] = FileEntry(size, digest)
                doc = json.dumps({"world_size": self.world, "dcp_entries": p.dcp_entries,
                                  "dcp_keys": len(p.dcp_keys), "torch": torch.__version__,
                                  "writer_files": {str(r): sorted(rep[2]) for r, rep in enumerate(reports)}},
                                 indent=1).encode()
                with p.txn.open_write(DIST_FILE) as f:
                    f.write(doc)
                h = new_hasher()
                h.update(doc)
                allfiles[DIST_FILE] = FileEntry(len(doc), h.hexdigest())
                _pause()
                man = Manifest(step=p.step, files=allfiles, metadata=dict(p.meta), entries=list(p.entries))
                path = p.txn.commit(man.to_json())
                result = (None, (path, man.total_bytes))
            except Exception as e:  # noqa: BLE001
                p.txn.abort()
                result = (f"{type(e).__name__}: {e} ({_hint(e)})", None)
        result = coll.broadcast(result)
        if result[0]:
            raise _write_error(
                None, f"committing step {p.step} to {where} failed on rank 0: {result[0]}. Nothing was committed; "
                "the previous checkpoint is untouched.")
        path, total = result[1]
        persist_s = time.perf_counter() - t_persist
        if blocking is None:
            blocking = time.perf_counter() - t0
        c = m.cost
        c.saves += 1
        c.blocking_s_total += blocking
        c.persist_s_total += persist_s
        c.last_blocking_s, c.last_persist_s, c.bytes_last = blocking, persist_s, total
        m.events.emit("save", step=p.step, path=path, bytes=total, blocking_s=blocking, persist_s=persist_s,
                      waited_s=waited, metrics=p.meta, world_size=self.world)
        if self.rank == 0:
            m._apply_retention(protect={p.step})
        return path

    # --------------------------------------------------------------------------------------------- restore
    def restore(self, state: MutableMapping[str, Any], *, mode: str, only: Optional[Sequence[str]],
                strict: bool, t0: float) -> int:
        m = self.m
        plan = None
        if self.rank == 0:
            m._clean_stale_tmp()
            try:
                plan = ("ok", self._plan(mode))
            except Exception as e:  # noqa: BLE001 - exceptions do not all survive pickling: send the text
                plan = ("error", f"rank 0 could not list checkpoints in {m.storage.uri}: {type(e).__name__}: {e}")
        plan = self.ctx.ctl.broadcast(plan)
        if plan[0] == "error":
            raise CheckpointNotFoundError(plan[1])
        explicit, candidates = plan[1]
        chosen = self._first_valid(candidates)
        if chosen is None:
            if explicit is not None and explicit[1]:
                raise CheckpointNotFoundError(f"no valid resumekit checkpoint at {explicit[0]}; pass a step_N "
                                              "directory or a run directory that holds one")
            if m.options.init_from:
                return self._init_from(state, t0)
            m.events.emit("restore", step=0, path=None, skipped=[s.as_dict() for s in m.skipped],
                          seconds=time.perf_counter() - t0, world_size=self.world)
            return 0
        root, name, step = chosen
        st = open_storage(root, create=False)
        self.load(st, name, state, only=only, strict=strict, rng=only is None and m.options.save_rng)
        info = CheckpointInfo(step=step, name=name, path=st.join(name), layout="native", valid=True)
        m.restored_from = info
        m.last_saved_step = step
        m._last_save_time = time.monotonic()
        secs = time.perf_counter() - t0
        m.events.emit("restore", step=step, path=info.path, seconds=secs, world_size=self.world,
                      skipped=[{"path": s.path, "reason": s.reason} for s in m.skipped])
        log.info("rank %d: resumed from %s (step %d) in %.2fs", self.rank, info.path, step, secs)
        return step

    def _plan(self, mode: str) -> Tuple[Optional[Tuple[str, bool]], List[Tuple[str, str, int, bool]]]:
        """Rank 0: candidates as (root, name, step, explicit), newest first; explicit = (path, must_exist)."""
        m = self.m
        if mode == "never":
            return None, []
        if mode != "auto":
            return (mode, True), _candidates_at(mode, m)
        env_path = os.environ.get(ENV_RESUME_FROM, "")
        restarts = int(os.environ.get(ENV_ELASTIC_RESTART, "0") or 0)
        cands: List[Tuple[str, str, int, bool]] = []
        if env_path and restarts == 0:
            # After torchrun's agent restarted the group, the supervisor's hand-off predates the newest save.
            cands = [(r, n, s, False) for r, n, s, _ in _candidates_at(env_path, m)][:1]
            if not cands:
                log.warning("%s=%s is not usable; searching %s instead", ENV_RESUME_FROM, env_path, m.storage.uri)
        cands += [(m.storage.uri, i.name, i.step, False)
                  for i in reversed(order_by_step(m.layout.list(m.storage)))]
        return None, cands

    def _first_valid(self, candidates: List[Tuple[str, str, int, bool]]) -> Optional[Tuple[str, str, int]]:
        """Verify candidates in order, every rank hashing a share of the files; the first valid on all wins.

        An invalid explicit candidate (a step directory the user named) raises; others are skipped with the
        reason logged, as when resuming a single-process run.
        """
        m = self.m
        seen = set()
        for root, name, step, is_explicit in candidates:
            if (root, name) in seen:
                continue
            seen.add((root, name))
            st = open_storage(root, create=False)
            reason: Optional[str] = None
            try:
                man = check_checkpoint(st, name, full=False)
                if not is_distributed_checkpoint(man):
                    raise CorruptCheckpointError(st.join(name), "is a single-process checkpoint (no "
                                                 f"{DIST_FILE}); restore it with CheckpointManager(..., "
                                                 "distributed=False) or save a distributed one")
                mine = sorted(man.files)[self.rank::self.world]
                for rel in mine:
                    size, digest = hash_file(st, f"{name}/{rel}")
                    if digest != man.files[rel].xxh3:
                        raise CorruptCheckpointError(st.join(name), f"{rel} checksum mismatch (xxh3 {digest} != "
                                                     f"{man.files[rel].xxh3}): the file was altered or damaged")
                # Every rank parses the plan it will load with, so a checkpoint whose .metadata is refused (forged
                # classes, shards outside the manifest) is skipped like a corrupt one, before any state changes.
                if DCP_METADATA in man.files:
                    load_dcp_metadata(_read_verified(st, name, DCP_METADATA, man), st.join(name), man.files)
            except CorruptCheckpointError as e:
                reason = e.reason
            except OSError as e:
                reason = f"unreadable: {e}"
            reasons = self.ctx.ctl.all_gather(reason)
            bad = next((r for r in reasons if r), None)
            if bad is None:
                return root, name, step
            info = CheckpointInfo(step=step, name=name, path=st.join(name), layout="native")
            if is_explicit:
                raise CorruptCheckpointError(st.join(name), bad)
            m._skip(info, bad)
        return None

    def _init_from(self, state: MutableMapping[str, Any], t0: float) -> int:
        m = self.m
        cands = _candidates_at(m.options.init_from, m) if self.rank == 0 else []
        cands = self.ctx.ctl.broadcast(cands)
        chosen = self._first_valid(cands)
        if chosen is None:
            raise CheckpointNotFoundError(f"no valid resumekit checkpoint at {m.options.init_from}")
        root, name, _ = chosen
        st = open_storage(root, create=False)
        keys = list(m.options.init_keys) if m.options.init_keys is not None else None
        loaded = self.load(st, name, state, only=keys, strict=m.options.strict, rng=False)
        m.events.emit("init_from", path=st.join(name), step=0, keys=loaded, seconds=time.perf_counter() - t0)
        return 0

    def load(self, st: Storage, name: str, state: MutableMapping[str, Any], *, only: Optional[Sequence[str]],
             strict: bool, rng: bool) -> List[str]:
        """Load checkpoint ``name`` of ``st`` into ``state`` on every rank (collective); returns the keys loaded.

        Raises:
            StateMismatchError: the checkpoint does not fit the objects (names the key and the rank).
            CorruptCheckpointError: a file does not match the manifest.
        """
        import torch.distributed.checkpoint as dcp

        where = st.join(name)
        # Phase A (local): read and check everything; no collective may be skipped on an error, so errors are
        # collected and shared before DCP's collective load.
        err: Optional[BaseException] = None
        load_flat: Dict[str, Any] = {}
        pending: List[Tuple[str, Any, Any]] = []
        tree: Dict[str, Any] = {}
        keys: List[str] = []
        md: Any = None
        saved_world = 1
        try:
            man = read_manifest(st, name)
            doc = json.loads(_read_verified(st, name, DIST_FILE, man))
            saved_world = int(doc["world_size"])
            src = self.rank if self.rank < saved_world else 0
            tree = _read_rank_tree(st, name, src, man)
            if man.files.get(DCP_METADATA) is not None:
                md = load_dcp_metadata(_read_verified(st, name, DCP_METADATA, man), where, man.files)
            skeleton = tree.get(DCP_KEY, {})
            rest = tree.get(STATE_KEY, {})
            saved_keys = set(skeleton) | set(rest)
            keys = list(only) if only is not None else list(state.keys())
            if only is not None:
                unknown = [k for k in keys if k not in state]
                if unknown:
                    raise StateMismatchError(f"cannot load {unknown} from {where}: no such entries in the state "
                                             f"passed to restore() (it has {sorted(state)})")
            missing = [k for k in keys if k not in saved_keys]
            if missing and (strict or only is not None):
                raise StateMismatchError(
                    f"{where} has no entry for {missing} (it has {sorted(saved_keys)}); pass only=[...] to load a "
                    "subset or strict=False to start those entries fresh")
            entries = dcp_entries(state)
            modules = {k: v for k, v in entries.items() if isinstance(v, torch.nn.Module)}
            for key in keys:
                if key not in skeleton:
                    continue
                obj = state[key]
                if key not in entries:
                    raise StateMismatchError(f"state[{key!r}] is a {type(obj).__name__}, but {where} saved it as "
                                             "a module/optimizer through DCP")
                saved = skeleton[key]
                if isinstance(saved, dict) and _PLAIN_OPTIM in saved:
                    pending.append((key, obj, saved))
                    continue
                if isinstance(obj, torch.optim.Optimizer) and not obj.state:
                    current = _init_template(key, obj, modules)
                else:
                    current = _entry_state_dict(key, obj, modules)
                template_flat: Dict[str, Any] = {}
                split_tensors(current, key, template_flat)
                need = ref_keys(saved)
                absent = sorted(set(need) - set(template_flat))
                extra = sorted(set(template_flat) - set(need)) if isinstance(obj, torch.nn.Module) else []
                if absent or extra:
                    parts = ([f"missing keys {[k[len(key) + 1:] for k in extra]}"] if extra else []) + \
                            ([f"unexpected keys {[k[len(key) + 1:] for k in absent]}"] if absent else [])
                    raise StateMismatchError(f"state[{key!r}] does not match {where}: {', '.join(parts)}")
                if md is not None:
                    _check_shapes(key, need, template_flat, md, where)
                for k in need:
                    load_flat[k] = template_flat[k]
                pending.append((key, obj, saved))
        except Exception as e:  # noqa: BLE001
            err = e
        self._agree_or_raise(err, where, "reading")
        if load_flat:
            try:
                with _quiet_single_process():
                    dcp.load(load_flat, storage_reader=_verified_reader_cls()(st.join(name), md, where),
                             process_group=self.ctx.dcp_group, no_dist=not self.ctx.use_dist)
            except BaseException as e:  # noqa: BLE001 - CheckpointException is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                raise CorruptCheckpointError(where, f"loading the DCP shards failed: {_describe(e)}") from None
        # Phase C (local): hand the loaded state to the objects; again agreed before returning.
        err = None
        loaded: List[str] = []
        try:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            for key, obj, saved in pending:
                if isinstance(saved, dict) and _PLAIN_OPTIM in saved:
                    obj.load_state_dict(saved[_PLAIN_OPTIM])
                else:
                    sd = join_tensors(saved, load_flat)
                    try:
                        if isinstance(obj, torch.nn.Module):
                            set_model_state_dict(obj, sd)
                        else:
                            set_optimizer_state_dict(optimizer_owner(key, obj, modules), obj, sd)
                    except (RuntimeError, ValueError, KeyError, TypeError) as e:
                        raise StateMismatchError(f"state[{key!r}] ({type(obj).__name__}) refused the state in "
                                                 f"{where}: {e}") from e
                loaded.append(key)
            saved_rest = tree.get(STATE_KEY, {})
            # Missing entries were judged above (strict / only); here only what the checkpoint has is applied.
            rest_keys = [k for k in keys if k not in tree.get(DCP_KEY, {}) and k in saved_rest]
            loaded += apply_state(state, saved_rest, only=rest_keys, strict=False, where=where)
            if rng and RNG_KEY in tree:
                if self.rank < saved_world:
                    restore_rng(tree[RNG_KEY])
                else:
                    log.warning("rank %d: %s was saved by %d ranks and has no RNG state for this rank; it keeps "
                                "the RNG state it was seeded with", self.rank, where, saved_world)
        except Exception as e:  # noqa: BLE001
            err = e
        self._agree_or_raise(err, where, "applying")
        return loaded

    def _agree_or_raise(self, err: Optional[BaseException], where: str, phase: str) -> None:
        """Every rank learns whether any rank failed; the failing rank raises its own error, the others an
        error of the same kind naming it (so no rank goes on alone into the next collective)."""
        corrupt = isinstance(err, CorruptCheckpointError)
        msgs = self.ctx.ctl.all_gather(None if err is None else (corrupt, f"{type(err).__name__}: {err}"))
        if err is not None:
            if self.world > 1:
                _add_rank(err, self.rank)
            raise err
        bad = [(r, s) for r, s in enumerate(msgs) if s]
        if bad:
            r, (was_corrupt, text) = bad[0]
            msg = f"failed while {phase} on rank {r} of {self.world}: {text}"
            if was_corrupt:
                raise CorruptCheckpointError(where, msg)
            raise StateMismatchError(f"restoring {where} {msg}")


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every call that it "assumes the intent is to load in a single process" without a process
    group; in a world of one that is exactly the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to", category=UserWarning)
        yield


def _write_error(errno_: Optional[int], msg: str) -> CheckpointWriteError:
    """A CheckpointWriteError whose text is ``msg`` (OSError would print "[Errno None]" for a missing errno)."""
    return CheckpointWriteError(errno_, msg) if errno_ else CheckpointWriteError(msg)


def _add_rank(err: BaseException, rank: int) -> None:
    if isinstance(err, CorruptCheckpointError):
        err.reason = f"(rank {rank}) {err.reason}"
    err.args = (f"rank {rank}: {err.args[0]}",) + tuple(err.args[1:]) if err.args else (f"rank {rank}",)


def _first_errno(e: BaseException) -> Optional[int]:
    if type(e).__name__ == "CheckpointException" and hasattr(e, "failures"):
        for pair in e.failures.values():  # type: ignore[attr-defined]
            exc = pair[0] if isinstance(pair, tuple) else pair
            if getattr(exc, "errno", None):
                return exc.errno
        return None
    return getattr(e, "errno", None)


def _init_template(key: str, optim: torch.optim.Optimizer, modules: Mapping[str, torch.nn.Module]) -> Any:
    """A state dict shaped like the saved one for an optimizer that has not stepped in this process yet.

    ``get_optimizer_state_dict`` initialises the moments with a zero-gradient, zero-lr step; the values it creates
    are all overwritten by the load.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(optimizer_owner(key, optim, modules), optim)


def _check_shapes(key: str, need: Sequence[str], template: Mapping[str, Any], md: Any, where: str) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    bad = []
    for k in need:
        smd = md.state_dict_metadata.get(k)
        if smd is None:
            raise CorruptCheckpointError(where, f"{DCP_METADATA} has no entry for {k!r}")
        if not isinstance(smd, TensorStorageMetadata):
            raise CorruptCheckpointError(where, f"{DCP_METADATA} stores {k!r} as pickled bytes, not a tensor")
        shape = tuple(template[k].shape)
        if tuple(smd.size) != shape:
            bad.append(f"{k[len(key) + 1:]}: checkpoint {tuple(smd.size)} vs model {shape}")
    if bad:
        raise StateMismatchError(f"state[{key!r}] does not match {where}: shape mismatch " + "; ".join(bad))


def _read_verified(st: Storage, name: str, rel: str, man: Manifest) -> bytes:
    where = st.join(name)
    ent = man.files.get(rel)
    if ent is None:
        raise CorruptCheckpointError(where, f"manifest does not list {rel}")
    try:
        data = st.read_bytes(f"{name}/{rel}")
    except FileNotFoundError:
        raise CorruptCheckpointError(where, f"{rel} is missing") from None
    h = new_hasher()
    h.update(data)
    if len(data) != ent.size or h.hexdigest() != ent.xxh3:
        raise CorruptCheckpointError(where, f"{rel} does not match the manifest (size or checksum): the file was "
                                            "altered or damaged")
    return data


def _read_rank_tree(st: Storage, name: str, rank: int, man: Manifest) -> Dict[str, Any]:
    where = st.join(name)
    rdir = rank_dir(rank)
    trel, jrel = f"{rdir}/{TENSORS_FILE}", f"{rdir}/{TREE_FILE}"
    if trel not in man.files or jrel not in man.files:
        raise CorruptCheckpointError(where, f"manifest does not list {rdir}/ (saved by fewer ranks?)")
    ent = man.files[trel]
    h = new_hasher()
    with st.open_read(f"{name}/{trel}") as f:
        tensors = read_tensors(f, ent.size, f"{where}/{trel}", h)
    if h.hexdigest() != ent.xxh3:
        raise CorruptCheckpointError(where, f"{trel} checksum mismatch: the file was altered or damaged")
    blob = _read_verified(st, name, jrel, man)
    try:
        return decode(json.loads(blob), tensors)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(where, f"{jrel} does not decode: {e}") from None


def _candidates_at(path: str, m: "CheckpointManager") -> List[Tuple[str, str, int, bool]]:
    """(root, name, step, explicit) for a step directory (explicit: an invalid one is an error), or every step of
    a run directory newest first (not explicit: invalid ones are skipped, as when resuming)."""
    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    st = open_storage(parent or ".", create=False)
    step = parse_step_dirname(name)
    if step is not None and st.exists(f"{name}/{MANIFEST}"):
        return [(st.uri, name, step, True)]
    run = open_storage(path, create=False)
    return [(run.uri, i.name, i.step, False) for i in reversed(order_by_step(m.layout.list(run)))]


def read_sharded(path: str) -> Tuple[Manifest, Dict[str, torch.Tensor], Dict[int, Any]]:
    """Load a whole distributed checkpoint into this one process, without a process group.

    For inspection, export and comparisons (``resumekit demo --nproc``): every DCP tensor comes back unsharded
    (key ``"<entry>/<state-dict path>"``, e.g. ``"model/0.weight"``) and every saved rank's non-tensor tree
    decoded. Everything is verified against the manifest first; nothing is unpickled freely.

    Raises:
        CorruptCheckpointError: the checkpoint is invalid or not a distributed one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = path.rstrip("/")
    parent, _, name = path.rpartition("/")
    st = open_storage(parent or ".", create=False)
    where = st.join(name)
    man = check_checkpoint(st, name, full=True)
    if not is_distributed_checkpoint(man):
        raise CorruptCheckpointError(where, f"is not a distributed checkpoint (no {DIST_FILE}); use "
                                            "resumekit.checkpoint.read_checkpoint")
    world = int(json.loads(_read_verified(st, name, DIST_FILE, man))["world_size"])
    tensors: Dict[str, torch.Tensor] = {}
    if DCP_METADATA in man.files:
        md = load_dcp_metadata(_read_verified(st, name, DCP_METADATA, man), where, man.files)
        for key, smd in md.state_dict_metadata.items():
            if not isinstance(smd, TensorStorageMetadata):
                raise CorruptCheckpointError(where, f"{DCP_METADATA} stores {key!r} as pickled bytes")
            tensors[key] = torch.empty(tuple(smd.size), dtype=smd.properties.dtype)
        if tensors:
            with _quiet_single_process():
                dcp.load(tensors, storage_reader=_verified_reader_cls()(where, md, where), no_dist=True)
    trees = {r: _read_rank_tree(st, name, r, man) for r in range(world)}
    return man, tensors, trees


def wants_distributed(option: Optional[bool]) -> bool:
    """The ``distributed`` option resolved: None means "when torch.distributed is initialised"."""
    if option is not None:
        return bool(option)
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


__all__ = ["DistributedCheckpointer", "DistContext", "Collectives", "MetadataUnpickler", "load_dcp_metadata",
           "read_sharded", "is_distributed_checkpoint", "wants_distributed", "DIST_FILE", "DCP_METADATA", "rank_dir"]
