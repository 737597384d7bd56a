"""A sharded checkpoint's per-rank files, and reading a whole one into one process (no process group)."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..codec import decode_tree, dumps_tree, read_tensors, write_tensors
from ..errors import CorruptCheckpointError
from ..format import DIST_FILE, TENSORS_FILE, TREE_FILE, Manifest, new_hasher, parse_json
from ..storage import Storage, open_parent
from ..storage.local import _DurableFile as DurableFile
from ..storage.local import fsync_dir
from ..storage.verified import Vouch
from ..verify import check_checkpoint, read_verified
from .dcp_io import load_dcp_metadata, quiet_single_process, verified_reader_cls
from .statedict import DCP_METADATA


def rank_dir(rank: int) -> str:
    """Directory of one rank's non-tensor files inside a checkpoint."""
    return f"rank_{rank:05d}"


def is_distributed_checkpoint(man: Manifest) -> bool:
    """True for a checkpoint written through DCP by resumekit."""
    return DIST_FILE in man.files


class _NoHash:
    """The hasher of a read whose bytes are vouched for (see :class:`~resumekit.storage.verified.Vouch`)."""

    def update(self, data: Any) -> None:
        pass


def read_rank_tree(st: Storage, name: str, rank: int, man: Manifest, vouch: Vouch | None = None) -> dict[str, Any]:
    """Rank ``rank``'s non-tensor tree of checkpoint ``name``, its tensors checked against the manifest while they
    are read, unless ``vouch`` covers the very file opened (a verified download just made it, or the supervisor's
    token names it)."""
    where = st.join(name)
    rdir = rank_dir(rank)
    trel, jrel = f"{rdir}/{TENSORS_FILE}", f"{rdir}/{TREE_FILE}"
    if trel not in man.files or jrel not in man.files:
        raise CorruptCheckpointError(where, f"manifest does not list {rdir}/ (saved by fewer ranks?)")
    ent = man.files[trel]
    h = new_hasher()
    with st.open_read(f"{name}/{trel}") as f:
        vouched = vouch is not None and vouch.covers(trel, f, ent)
        tensors = read_tensors(f, ent.size, f"{where}/{trel}", _NoHash() if vouched else h)
    if not vouched and h.hexdigest() != ent.xxh3:
        raise CorruptCheckpointError(where, f"{trel} checksum mismatch: the file was altered or damaged")
    return decode_tree(read_verified(st, name, jrel, man), tensors, where, jrel)


def read_sharded(path: str) -> tuple[Manifest, dict[str, torch.Tensor], dict[int, Any]]:
    """Load a whole distributed checkpoint into this one process, without a process group.

    For inspection, export and comparisons (``resumekit demo --nproc``): every DCP tensor comes back unsharded
    (key ``"<entry>/<state-dict path>"``, e.g. ``"model/0.weight"``) and every saved rank's non-tensor tree
    decoded. Everything is verified against the manifest first; nothing is unpickled freely.

    Raises:
        CorruptCheckpointError: the checkpoint is invalid or not a distributed one.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    st, name = open_parent(path)
    where = st.join(name)
    man = check_checkpoint(st, name, full=True)
    if not is_distributed_checkpoint(man):
        raise CorruptCheckpointError(
            where,
            f"is not a distributed checkpoint (no {DIST_FILE}); use resumekit.checkpointers.native.read_checkpoint",
        )
    doc = parse_json(read_verified(st, name, DIST_FILE, man), where, DIST_FILE)
    world = doc.get("world_size") if isinstance(doc, dict) else None
    if type(world) is not int or world < 1:
        raise CorruptCheckpointError(where, f"{DIST_FILE} has no positive integer world_size")
    tensors: dict[str, torch.Tensor] = {}
    if DCP_METADATA in man.files:
        md = load_dcp_metadata(read_verified(st, name, DCP_METADATA, man), where, man.files)
        # Sizes come from a file: nothing is allocated before they are known to fit in the shards that hold them.
        room = sum(e.size for rel, e in man.files.items() if rel.endswith(".distcp"))
        need = 0
        for key, smd in md.state_dict_metadata.items():
            if not isinstance(smd, TensorStorageMetadata):
                raise CorruptCheckpointError(where, f"{DCP_METADATA} stores {key!r} as pickled bytes")
            dims = tuple(smd.size)
            if not all(type(d) is int and d >= 0 for d in dims) or not isinstance(smd.properties.dtype, torch.dtype):
                raise CorruptCheckpointError(where, f"{DCP_METADATA} gives {key!r} a malformed size or dtype")
            count = 1
            for d in dims:
                count = min(count * d, room + 1)
            need += count * torch.empty((), dtype=smd.properties.dtype).element_size()
            if need > room:
                raise CorruptCheckpointError(
                    where, f"{DCP_METADATA} describes more tensor data than its {room} bytes of shards hold"
                )
        for key, smd in md.state_dict_metadata.items():
            tensors[key] = torch.empty(tuple(smd.size), dtype=smd.properties.dtype)
        if tensors:
            with quiet_single_process():
                dcp.load(tensors, storage_reader=verified_reader_cls()(where, md, where), no_dist=True)
    trees = {r: read_rank_tree(st, name, r, man) for r in range(world)}
    return man, tensors, trees


def write_rank_files(
    tmp_path: str, rank: int, tensors: dict[str, torch.Tensor], encoded: Any
) -> dict[str, tuple[int, str]]:
    """Write and fsync one rank's own files (its non-tensor tree and the tensors DCP does not shard) into the
    step's tmp directory; returns ``{relative path: (size, xxh3)}`` for the manifest."""
    rdir = rank_dir(rank)
    os.makedirs(os.path.join(tmp_path, rdir), exist_ok=True)
    files: dict[str, tuple[int, str]] = {}
    h = new_hasher()
    with DurableFile(os.path.join(tmp_path, rdir, TENSORS_FILE)) as f:
        n = write_tensors(f, tensors, h)
    files[f"{rdir}/{TENSORS_FILE}"] = (n, h.hexdigest())
    blob = dumps_tree(encoded)
    h = new_hasher()
    h.update(blob)
    with DurableFile(os.path.join(tmp_path, rdir, TREE_FILE)) as f:
        f.write(blob)
    files[f"{rdir}/{TREE_FILE}"] = (len(blob), h.hexdigest())
    fsync_dir(os.path.join(tmp_path, rdir))
    return files
