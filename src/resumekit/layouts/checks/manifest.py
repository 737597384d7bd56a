"""resumekit manifests written into foreign checkpoints (by :mod:`resumekit.integrations.hf`).

When one is present its sizes (and, with ``full``, xxh3 checksums) vouch for every file, so the layout's per-file
content checks are not needed.
"""

from __future__ import annotations

from typing import Optional

from ...errors import CorruptCheckpointError
from ...format import FOREIGN_MANIFEST, Manifest
from ...storage import Storage
from ...verify import check_checkpoint
from .common import fail


def check_foreign_manifest(storage: Storage, name: str, where: str, full: bool, step: Optional[int] = None) -> Manifest:
    """Verify a foreign checkpoint against the resumekit manifest written into it (sizes; xxh3 when ``full``).

    Args:
        storage: the root the checkpoint lives under.
        name: the checkpoint directory, relative to the root.
        where: the checkpoint, for the error.
        full: also compare checksums.
        step: the step the manifest must record (None: not checked).

    Returns:
        The manifest.

    Raises:
        CorruptCheckpointError: for ``where``, with the manifest check's reason.
    """
    try:
        return check_checkpoint(storage, name, full=full, manifest=FOREIGN_MANIFEST, step=step)
    except CorruptCheckpointError as e:
        raise fail(where, e.reason) from None
