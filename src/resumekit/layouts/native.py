"""resumekit's own layout: ``step_NNNNNNNNN/`` directories committed by a manifest written last."""

from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

from ..errors import CorruptCheckpointError
from ..format import MANIFEST, Manifest, new_hasher, parse_step_dirname
from ..storage import Storage
from .base import CheckpointInfo, Layout, invalid

_CHUNK = 8 << 20


def read_manifest(storage: Storage, name: str, manifest: str = MANIFEST) -> Manifest:
    """Load and validate ``name/<manifest>``; a missing or bad one is a CorruptCheckpointError."""
    where = storage.join(name)
    try:
        data = storage.read_bytes(f"{name}/{manifest}")
    except FileNotFoundError:
        raise CorruptCheckpointError(where, f"{manifest} is missing (the save never finished)") from None
    return Manifest.from_json(data, where)


def hash_file(storage: Storage, rel: str) -> tuple:
    """(size, xxh3 hex) of a stored file, read in large sequential chunks."""
    h = new_hasher()
    n = 0
    with storage.open_read(rel) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


def check_checkpoint(storage: Storage, name: str, full: bool = True, manifest: str = MANIFEST,
                     step: Optional[int] = None) -> Manifest:
    """Verify a checkpoint against its resumekit manifest; raises CorruptCheckpointError with the reason.

    Args:
        manifest: the manifest's file name (foreign layouts carry ours under another name).
        step: the step the checkpoint must have (default: parsed from a ``step_N`` directory name).
    """
    where = storage.join(name)
    man = read_manifest(storage, name, manifest)
    said = "manifest" if manifest == MANIFEST else manifest
    if step is None:
        step = parse_step_dirname(name.rsplit("/", 1)[-1])
    if step is not None and step != man.step:
        raise CorruptCheckpointError(where, f"{said} says step {man.step} but the directory is step {step}")
    listed = "" if manifest == MANIFEST else f" (listed in {manifest})"
    for rel, ent in man.files.items():
        try:
            size = storage.size(f"{name}/{rel}")
        except FileNotFoundError:
            raise CorruptCheckpointError(where, f"{rel} is missing{listed}") from None
        if size != ent.size:
            raise CorruptCheckpointError(where, f"{rel} has {size} bytes, {said} says {ent.size} (truncated?)")
    if full:
        for rel, ent in man.files.items():
            _, digest = hash_file(storage, f"{name}/{rel}")
            if digest != ent.xxh3:
                raise CorruptCheckpointError(where, f"{rel} checksum mismatch (xxh3 {digest} != {ent.xxh3}): "
                                                    "the file was altered or damaged")
    return man


class NativeLayout(Layout):
    name = "native"

    def detect(self, storage: Storage) -> bool:
        return any(e.is_dir and parse_step_dirname(e.name) is not None for e in storage.listdir(""))

    def list(self, storage: Storage) -> List[CheckpointInfo]:
        out = []
        for e in storage.listdir(""):
            step = parse_step_dirname(e.name)
            if e.is_dir and step is not None:
                out.append(CheckpointInfo(step=step, name=e.name, path=storage.join(e.name), layout=self.name))
        return out

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        try:
            man = check_checkpoint(storage, info.name, full=full)
        except CorruptCheckpointError as e:
            return invalid(info, e.reason)
        except OSError as e:
            return invalid(info, f"unreadable: {e}")
        return replace(info, valid=True, reason="", size=man.total_bytes, time=man.time,
                       metadata=dict(man.metadata))
