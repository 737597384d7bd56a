"""Checkpointers: how one checkpoint is captured, made durable, found again and loaded (see :mod:`.base`).

- :mod:`.base`: the :class:`Checkpointer` protocol and what its calls exchange;
- :mod:`.native`: the native format's handler (``write_checkpoint`` / ``read_checkpoint`` of one ``step_N``);
- :mod:`.local`: :class:`LocalCheckpointer`, one process (any storage, tiered included);
- :mod:`.dcp`: ``DcpCheckpointer``, sharded state through torch.distributed.checkpoint.
"""

from __future__ import annotations

from .base import Candidate, Checkpointer, Committed, Opened, Snapshot
from .local import LocalCheckpointer
from .native import SaveResult, read_checkpoint, write_checkpoint

__all__ = [
    "Checkpointer",
    "Snapshot",
    "Committed",
    "Candidate",
    "Opened",
    "LocalCheckpointer",
    "read_checkpoint",
    "write_checkpoint",
    "SaveResult",
]
