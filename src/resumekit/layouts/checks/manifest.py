"""resumekit manifests written into foreign checkpoints (by :mod:`resumekit.integrations.hf`) or beside single-file
ones (a "sidecar", by :mod:`resumekit.integrations.lightning`).

When one is present its sizes (and, with ``full``, xxh3 checksums) vouch for every file, so the layout's per-file
content checks are not needed.
"""

from __future__ import annotations

from ...errors import CorruptCheckpointError
from ...format import FOREIGN_MANIFEST, Manifest
from ...storage import Storage
from ...verify import check_checkpoint, hash_file
from .common import fail


def check_foreign_manifest(storage: Storage, name: str, where: str, full: bool, step: int | None = None) -> Manifest:
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


#: what follows a single-file checkpoint's name in the name of the manifest written beside it:
#: ``epoch=1-step=100.ckpt`` -> ``epoch=1-step=100.ckpt.resumekit.manifest.json``
SIDECAR_SUFFIX = "." + FOREIGN_MANIFEST


def sidecar_name(rel: str) -> str:
    """The manifest beside the single-file checkpoint ``rel`` (what :mod:`resumekit.integrations.lightning` writes)."""
    return rel + SIDECAR_SUFFIX


def check_sidecar_manifest(
    storage: Storage, rel: str, where: str, full: bool, shown: str | None = None
) -> Manifest | None:
    """Verify a single-file checkpoint against the manifest beside it (size; xxh3 when ``full``).

    The writer removes the sidecar before it overwrites a file and writes it once the new file is durable, so a
    file newer than its sidecar was written by someone else (a save without the integration, a file copied over
    it): the sidecar cannot vouch for those bytes and is ignored, and the caller checks the file's contents.

    Args:
        storage: the root the file lives under.
        rel: the checkpoint file, relative to the root (a link's target, not the link).
        where: the checkpoint, for the error.
        full: also compare the checksum.
        shown: the file name used in messages (default: ``rel``'s last part).

    Returns:
        The manifest, or None when there is no sidecar that applies.

    Raises:
        CorruptCheckpointError: the file does not match its sidecar, or the sidecar is not a manifest of it.
    """
    side = sidecar_name(rel)
    side_time = storage.mtime(side)
    if side_time is None:
        return None
    file_time = storage.mtime(rel)
    if file_time is not None and file_time > side_time:
        return None
    base = rel.rsplit("/", 1)[-1]
    shown = shown or base
    said = side.rsplit("/", 1)[-1]
    try:
        man = Manifest.from_json(storage.read_bytes(side), where)
    except FileNotFoundError:
        return None  # removed while we looked: the writer is replacing the file
    except CorruptCheckpointError as e:
        raise fail(where, f"{said}: {e.reason}") from None
    ent = man.files.get(base)
    if ent is None or len(man.files) != 1:
        raise fail(where, f"{said} does not describe {base} (it lists {', '.join(sorted(man.files)) or 'nothing'})")
    size = storage.size(rel)
    if size != ent.size:
        raise fail(where, f"{shown} has {size} bytes, {said} says {ent.size} (truncated?)")
    if full:
        _, digest = hash_file(storage, rel)
        if digest != ent.xxh3:
            raise fail(
                where, f"{shown} checksum mismatch (xxh3 {digest} != {ent.xxh3}): the file was altered or damaged"
            )
    return man
