"""JSON and small marker files that frameworks write last (``trainer_state.json``, ``metadata.json``, ...)."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from ...storage import Entry, Storage
from .common import fail


def read_json(storage: Storage, rel: str, where: str, why_missing: str = "", shown: Optional[str] = None) -> Any:
    """Parse a JSON file; a missing or unparseable one fails with a reason naming it.

    Args:
        storage: the checkpoint root.
        rel: the file, relative to the root.
        where: the checkpoint, for the error.
        why_missing: appended to the "is missing" reason (why its absence means the save never finished).
        shown: the file name used in messages (default: ``rel``).

    Returns:
        The parsed document.

    Raises:
        CorruptCheckpointError: the file is missing or not valid JSON.
    """
    shown = shown or rel
    try:
        data = storage.read_bytes(rel)
    except FileNotFoundError:
        raise fail(where, f"{shown} is missing{' ' + why_missing if why_missing else ''}") from None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise fail(where, f"{shown} is not valid JSON (truncated or still being written)") from None


def check_file_nonempty(files: Dict[str, Entry], name: str, where: str, shown: str, why_missing: str = "") -> None:
    """Check that ``name`` is a plain, non-empty file among the listed ``files`` (no read: sizes only).

    Raises:
        CorruptCheckpointError: it is missing (or a directory) or empty.
    """
    ent = files.get(name)
    if ent is None or ent.is_dir:
        raise fail(where, f"{shown} is missing{' ' + why_missing if why_missing else ''}")
    if ent.size == 0:
        raise fail(where, f"{shown} is empty (truncated or still being written)")
