"""The native on-disk format: names, manifest schema and checksums. Imports no torch.

A checkpoint is one directory per step::

    step_000001200/
        tensors.safetensors   every tensor of the state, in the safetensors layout
        state.json            the rest of the state tree, tensors replaced by references
        manifest.json         written last: format, version, step, time, files with size and xxh3-64

The manifest is the commit record: a directory without one, or whose files do not match it, is not a checkpoint.
Tensor and tree (de)serialisation lives in :mod:`resumekit.codec`, which is the only part that needs torch.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import xxhash

from .errors import CorruptCheckpointError, UnsafePathError

FORMAT_NAME = "resumekit"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: our manifest written into foreign checkpoint directories (HF ``checkpoint-N/``) by the integrations
FOREIGN_MANIFEST = "resumekit.manifest.json"
TENSORS_FILE = "tensors.safetensors"
TREE_FILE = "state.json"
DIST_FILE = "distributed.json"  # marks a sharded (torch.distributed.checkpoint) checkpoint: world size, entries
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
QUARANTINE_PREFIX = "quarantined-"
HASH_NAME = "xxh3_64"

_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dirname(step: int) -> str:
    """Directory name of a step; zero-padded for humans, always parsed back as an integer."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{STEP_PREFIX}{step:09d}"


def parse_step_dirname(name: str) -> Optional[int]:
    """The step of a committed checkpoint directory name, or None for anything else (tmp dirs included)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def tmp_dirname(step: int) -> str:
    """A unique in-progress name; discovery ignores it and gc removes it once stale."""
    return f"{TMP_PREFIX}{step_dirname(step)}-{uuid.uuid4().hex[:10]}"


def new_hasher() -> "xxhash.xxh3_64":
    """The checksum used everywhere: xxh3-64 runs at memory speed, so verification never bounds a save."""
    return xxhash.xxh3_64()


def validate_relpath(rel: str, where: str) -> str:
    """Reject manifest paths that could escape the checkpoint directory."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(where, f"manifest lists an empty or non-string file name {rel!r}")
    if rel.startswith("/") or rel.startswith("\\") or re.match(r"^[A-Za-z]:", rel):
        raise UnsafePathError(where, f"manifest lists an absolute path {rel!r}; only relative names are allowed")
    parts = rel.replace("\\", "/").split("/")
    if any(p in ("..", "") for p in parts) or posixpath.normpath(rel) != rel:
        raise UnsafePathError(where, f"manifest lists an unsafe path {rel!r} (no '..', no empty parts)")
    return rel


@dataclass
class FileEntry:
    """One file of a checkpoint as the manifest records it."""

    size: int
    xxh3: str


@dataclass
class Manifest:
    """The commit record of one native checkpoint."""

    step: int
    files: Dict[str, FileEntry]
    time: float = field(default_factory=time.time)
    metadata: Dict[str, Any] = field(default_factory=dict)
    entries: list = field(default_factory=list)
    version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_NAME,
            "version": self.version,
            "step": self.step,
            "time": self.time,
            "hash": HASH_NAME,
            "entries": list(self.entries),
            "files": {k: {"size": v.size, "xxh3": v.xxh3} for k, v in sorted(self.files.items())},
            "metadata": self.metadata,
        }
        return (json.dumps(doc, indent=1, allow_nan=True) + "\n").encode()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        """Parse and validate a manifest; every defect is a CorruptCheckpointError naming ``where``."""
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(where, f"manifest.json is not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(where, "manifest.json is not a resumekit manifest")
        version = doc.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CorruptCheckpointError(
                where,
                f"manifest format version {version!r} is newer than this resumekit supports "
                f"({FORMAT_VERSION}); upgrade resumekit",
            )
        step = doc.get("step")
        files = doc.get("files")
        if not isinstance(step, int) or step < 0 or not isinstance(files, dict):
            raise CorruptCheckpointError(where, "manifest.json lacks an integer 'step' or a 'files' table")
        entries: Dict[str, FileEntry] = {}
        for rel, ent in files.items():
            validate_relpath(rel, where)
            if rel == MANIFEST:
                raise CorruptCheckpointError(where, "manifest.json lists itself")
            if (
                not isinstance(ent, dict)
                or not isinstance(ent.get("size"), int)
                or ent["size"] < 0
                or not isinstance(ent.get("xxh3"), str)
            ):
                raise CorruptCheckpointError(where, f"manifest entry for {rel!r} lacks size/xxh3")
            entries[rel] = FileEntry(ent["size"], ent["xxh3"])
        meta = doc.get("metadata") or {}
        t = doc.get("time") or 0.0
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise CorruptCheckpointError(where, f"manifest.json has a non-numeric time {t!r}")
        return cls(
            step=step,
            files=entries,
            time=float(t),
            metadata=meta if isinstance(meta, dict) else {},
            entries=list(doc.get("entries") or []),
            version=version,
        )


def metadata_jsonable(metadata: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Metrics and user metadata must be plain JSON; numbers from tensors/numpy are converted."""
    out: Dict[str, Any] = {}
    for k, v in (metadata or {}).items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        try:
            json.dumps(v, allow_nan=True)
        except TypeError:
            raise TypeError(f"metadata[{k!r}] is a {type(v).__name__}; metadata must be JSON values") from None
        out[str(k)] = v
    return out
