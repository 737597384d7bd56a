"""Loading a torch file with ``weights_only=True``, only where a layout's full check needs its contents."""

from __future__ import annotations

import os
import re
from typing import Any

from ...storage import Storage
from .common import fail


def load_weights_only(storage: Storage, rel: str, where: str) -> Any:
    """``torch.load(weights_only=True)`` a stored file (torch imported here only); failures name the file and fix.

    Args:
        storage: the checkpoint root.
        rel: the file, relative to the root.
        where: the checkpoint, for the error.

    Returns:
        The loaded object (memory-mapped when the file is local).

    Raises:
        CorruptCheckpointError: the file does not load, or needs more than ``weights_only`` allows.
    """
    import torch  # deferred: layouts must import without torch (the supervisor runs where torch may be absent)

    try:
        storage.size(rel)  # a regular file inside the root, or an UnsafeFileError: torch.load must not open a FIFO
    except FileNotFoundError:
        raise fail(where, f"{os.path.basename(rel)} is missing") from None
    local = storage.local_path(rel)
    try:
        if local:
            return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        with storage.open_read(rel) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, ... for damaged or unsafe data
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if "weights_only" in text or "Unsupported global" in text:
            glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f"{glob.group(1)} is not allowed" if glob else first
            raise fail(
                where,
                f"{os.path.basename(rel)} cannot be loaded with weights_only=True ({what}): it holds "
                "Python objects beyond tensors and plain containers; re-save plain state_dicts, or "
                "allow the types with torch.serialization.add_safe_globals",
            ) from None
        raise fail(where, f"{os.path.basename(rel)} does not load ({type(e).__name__}: {first})") from None
