"""JSON and small marker files that frameworks write last (``trainer_state.json``, ``metadata.json``, ...)."""

from __future__ import annotations

from typing import Any

from ...errors import CorruptCheckpointError
from ...format import MAX_JSON_BYTES, parse_json
from ...storage import Entry, Storage
from ...verify import read_capped
from .common import fail


def read_json(storage: Storage, rel: str, where: str, why_missing: str = "", shown: str | None = None) -> Any:
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
        data = read_capped(storage, rel, MAX_JSON_BYTES, where, shown)
    except FileNotFoundError:
        raise fail(where, f"{shown} is missing{' ' + why_missing if why_missing else ''}") from None
    try:
        return parse_json(data, where, shown)
    except CorruptCheckpointError as e:
        if "nested too deeply" in e.reason:
            raise
        raise fail(where, f"{shown} is not valid JSON (truncated or still being written)") from None


#: the largest tracker or tag file (``latest``, ``latest_checkpointed_iteration.txt``): a name or a number
MAX_SMALL_FILE = 4096


def read_small(storage: Storage, rel: str, where: str, shown: str | None = None) -> str:
    """The stripped text of a small pointer file (a tracker, DeepSpeed's ``latest``), refused when it is not a
    small regular file.

    Raises:
        FileNotFoundError: it is missing.
        CorruptCheckpointError: it is larger than :data:`MAX_SMALL_FILE` or not a regular file.
    """
    data = read_capped(storage, rel, MAX_SMALL_FILE, where, shown or rel)
    return data.decode("utf-8", "replace").strip()


def check_file_nonempty(files: dict[str, Entry], name: str, where: str, shown: str, why_missing: str = "") -> None:
    """Check that ``name`` is a plain, non-empty file among the listed ``files`` (no read: sizes only).

    Raises:
        CorruptCheckpointError: it is missing (or a directory) or empty.
    """
    ent = files.get(name)
    if ent is None or ent.is_dir:
        raise fail(where, f"{shown} is missing{' ' + why_missing if why_missing else ''}")
    if ent.size == 0:
        raise fail(where, f"{shown} is empty (truncated or still being written)")
