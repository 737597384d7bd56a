"""safetensors files, checked by the one header parser in :mod:`resumekit.verify` through a storage file."""

from __future__ import annotations

from ...storage import Storage
from ...verify import TensorSpan, read_safetensors_header
from .common import fail


def check_safetensors(
    storage: Storage, rel: str, where: str, full: bool, size: int | None = None, shown: str | None = None
) -> list[TensorSpan]:
    """Check that a safetensors file's header is whole and describes exactly the bytes that follow it.

    Quick and full both read only the header (see :func:`resumekit.verify.read_safetensors_header`). Full
    additionally checks every tensor's byte range against its dtype and shape and that the ranges tile the data
    area without gaps or overlaps.

    Args:
        storage: the checkpoint root.
        rel: the file, relative to the root.
        where: the checkpoint, for the error.
        full: the full header check.
        size: the file's size when the caller already listed it (saves a stat).
        shown: the file name used in messages (default: ``rel``).

    Returns:
        The tensors the header describes, sorted by their position in the file.

    Raises:
        CorruptCheckpointError: naming the file and what is wrong.
    """
    shown = shown or rel
    try:
        if size is None:
            size = storage.size(rel)
        with storage.open_read(rel) as f:
            spans, _ = read_safetensors_header(f, size, where, shown, full=full)
    except FileNotFoundError:
        raise fail(where, f"{shown} is missing") from None
    return spans
