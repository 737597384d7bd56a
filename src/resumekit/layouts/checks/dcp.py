"""torch.distributed.checkpoint directories: ``*.distcp`` data files and ``.metadata``, written last."""

from __future__ import annotations

from ...storage import Entry, Storage
from .common import fail, files_of
from .jsonfile import check_file_nonempty


def check_dcp_dir(storage: Storage, rel: str, where: str, shown: str | None = None) -> dict[str, Entry]:
    """A torch.distributed.checkpoint directory: ``.metadata`` (written last by the coordinator) + ``*.distcp``.

    ``.metadata`` is a pickle and is never loaded; its presence after every rank's data files is the commit mark.

    Args:
        storage: the checkpoint root.
        rel: the directory, relative to the root.
        where: the checkpoint, for the error.
        shown: the prefix of file names in messages (default ``rel``; ``""`` for the checkpoint itself).

    Returns:
        The directory's children by name.

    Raises:
        CorruptCheckpointError: the directory is empty, ``.metadata`` is missing or empty, or no data file exists.
    """
    shown = rel if shown is None else shown
    files = files_of(storage, rel)
    prefix = f"{shown}/" if shown else ""
    if not files:
        raise fail(where, f"{shown or 'the checkpoint directory'} is missing or empty")
    check_file_nonempty(
        files,
        ".metadata",
        where,
        f"{prefix}.metadata",
        "(torch.distributed.checkpoint writes it once every rank has finished: the save never finished)",
    )
    if not any(n.endswith(".distcp") for n in files):
        raise fail(where, f"{prefix}*.distcp data files are missing")
    return files
