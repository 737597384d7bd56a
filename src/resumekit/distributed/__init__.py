"""The torch.distributed mechanics behind sharded checkpoints (used by :mod:`resumekit.checkpointers.dcp`).

- :mod:`.context`: this process's rank, world and the gloo groups for resumekit's own collectives;
- :mod:`.statedict`: state dicts split into DCP tensors and a JSON skeleton, and joined back;
- :mod:`.staging`: host copies of (D)tensor shards for asynchronous saves;
- :mod:`.dcp_io`: DCP's writer and a verified reader; the allow-list unpickler for ``.metadata``;
- :mod:`.sharded`: one rank's files, and :func:`read_sharded` to read a whole checkpoint in one process;
- :mod:`.loader`: loading into live objects on every rank, agreeing at each phase.
- :mod:`.nodetier`: node-local tiers (each node keeps the files its ranks read) and the agreement on the resume step.
"""

from __future__ import annotations

from ..format import DIST_FILE
from .context import Collectives, DistContext, wants_distributed
from .dcp_io import MetadataUnpickler, load_dcp_metadata
from .sharded import is_distributed_checkpoint, rank_dir, read_sharded
from .statedict import DCP_METADATA

__all__ = [
    "DistContext",
    "Collectives",
    "MetadataUnpickler",
    "load_dcp_metadata",
    "read_sharded",
    "is_distributed_checkpoint",
    "wants_distributed",
    "DIST_FILE",
    "DCP_METADATA",
    "rank_dir",
]
