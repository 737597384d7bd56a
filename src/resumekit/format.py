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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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
#: in a node tier's copy of a sharded step: which of the node's ranks reads which file (a cache, not a checkpoint)
NODE_FILE = "node.json"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
#: a committed checkpoint waiting to replace ``step_N`` (a re-save): never garbage, see :func:`keep_dirname`
KEEP_PREFIX = ".keep-"
QUARANTINE_PREFIX = "quarantined-"
#: the writer lease of a checkpoint root (see :mod:`resumekit.storage.lease`)
LEASE_FILE = ".resumekit-lease"
HASH_NAME = "xxh3_64"

# Bounds on everything parsed from a checkpoint: a forged or damaged file gets a verdict, never a hang or an OOM.
#: the largest manifest.json (about 300,000 listed files)
MAX_MANIFEST_BYTES = 64 << 20
#: the largest small JSON file a layout reads (trainer_state.json with a long log history, metadata.json, ...)
MAX_JSON_BYTES = 256 << 20
#: the largest state.json (the non-tensor part of a training state)
MAX_TREE_BYTES = 1 << 30
#: the deepest nesting of any JSON document read from a checkpoint
MAX_JSON_DEPTH = 128

_STEP_RE = re.compile(r"^step_(\d+)$")


def step_dirname(step: int) -> str:
    """Directory name of a step; zero-padded for humans, always parsed back as an integer."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"{STEP_PREFIX}{step:09d}"


def parse_step_dirname(name: str) -> int | None:
    """The step of a committed checkpoint directory name, or None for anything else (tmp dirs included)."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


def tmp_dirname(step: int) -> str:
    """A unique in-progress name; discovery ignores it and gc removes it once stale."""
    return f"{TMP_PREFIX}{step_dirname(step)}-{uuid.uuid4().hex[:10]}"


def keep_dirname(name: str) -> str:
    """A unique name for a re-save of ``name`` committed beside it: the new copy stays whole under this name until
    it has replaced ``name``, so a kill between the two never leaves the step without a valid copy."""
    return f"{KEEP_PREFIX}{name}-{uuid.uuid4().hex[:10]}"


def parse_keep_dirname(entry: str) -> str | None:
    """The checkpoint name a :func:`keep_dirname` stands for (``.keep-step_000000100-ab12`` -> ``step_000000100``)."""
    if not entry.startswith(KEEP_PREFIX):
        return None
    name, sep, _ = entry[len(KEEP_PREFIX) :].rpartition("-")
    return name if sep and name else None


def json_depth_ok(doc: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a parsed JSON document nests at most ``limit`` containers deep (iterative: no recursion)."""
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return False
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def parse_json(data: bytes, where: str, shown: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON read from a checkpoint: every defect (syntax, encoding, nesting deeper than ``limit``, a number
    too long to convert) is a :class:`CorruptCheckpointError` naming ``shown``, never a raw exception."""
    try:
        doc = json.loads(data)
    except RecursionError:
        raise CorruptCheckpointError(where, f"{shown} is nested too deeply (more than {limit} levels)") from None
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise CorruptCheckpointError(where, f"{shown} is not valid JSON ({shorten(e)})") from None
    if isinstance(doc, (dict, list)) and not json_depth_ok(doc, limit):
        raise CorruptCheckpointError(where, f"{shown} is nested too deeply (more than {limit} levels)")
    return doc


def shorten(e: Any, limit: int = 120) -> str:
    """``e`` (an exception or any text) on one line, cut to ``limit`` characters: a forged file's content must
    not turn a one-line reason into megabytes."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def new_hasher() -> xxhash.xxh3_64:
    """The checksum used everywhere: xxh3-64 runs at memory speed, so verification never bounds a save."""
    return xxhash.xxh3_64()


def validate_relpath(rel: object, where: str) -> str:
    """Reject manifest paths that could escape the checkpoint directory (``rel`` comes from the file: any type)."""
    if not isinstance(rel, str) or not rel:
        raise UnsafePathError(where, f"manifest lists an empty or non-string file name {shorten(repr(rel), 80)}")
    if rel.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", rel):
        raise UnsafePathError(
            where, f"manifest lists an absolute path {shorten(repr(rel), 80)}; only relative names are allowed"
        )
    parts = rel.replace("\\", "/").split("/")
    if any(p in ("..", "") for p in parts) or posixpath.normpath(rel) != rel or "\0" in rel:
        raise UnsafePathError(
            where, f"manifest lists an unsafe path {shorten(repr(rel), 80)} (no '..', no empty parts)"
        )
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
    files: dict[str, FileEntry]
    time: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)
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
    def from_json(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate a manifest; every defect is a CorruptCheckpointError naming ``where``."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(where, f"manifest.json has {len(data)} bytes, more than a manifest can have")
        doc = parse_json(data, where, "manifest.json")
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
        entries: dict[str, FileEntry] = {}
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
                raise CorruptCheckpointError(where, f"manifest entry for {shorten(repr(rel), 80)} lacks size/xxh3")
            entries[rel] = FileEntry(ent["size"], ent["xxh3"])
        meta = doc.get("metadata") or {}
        t = doc.get("time") or 0.0
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise CorruptCheckpointError(where, f"manifest.json has a non-numeric time {shorten(repr(t), 40)}")
        try:
            t = float(t)
        except OverflowError:
            raise CorruptCheckpointError(where, "manifest.json has a time out of range") from None
        names = doc.get("entries") or []
        return cls(
            step=step,
            files=entries,
            time=t,
            metadata=meta if isinstance(meta, dict) else {},
            entries=[n for n in names if isinstance(n, str)] if isinstance(names, list) else [],
            version=version,
        )


def metadata_jsonable(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics and user metadata must be plain JSON; numbers from tensors/numpy are converted."""
    out: dict[str, Any] = {}
    for k, v in (metadata or {}).items():
        if hasattr(v, "item") and callable(v.item):
            v = v.item()
        try:
            json.dumps(v, allow_nan=True)
        except TypeError:
            raise TypeError(f"metadata[{k!r}] is a {type(v).__name__}; metadata must be JSON values") from None
        out[str(k)] = v
    return out
