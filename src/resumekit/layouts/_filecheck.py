"""File-level checks shared by the foreign layouts: is this file whole, readable to its end, what does it say.

Frameworks rarely write a commit record, so "complete" has to be read off the files themselves:

* a torch file (``torch.save``) is a zip archive whose central directory is written last, at the end of the file;
  a file cut short has no end-of-central-directory record, and a quick check opens only that directory;
* a safetensors file starts with an 8-byte little-endian header length and a JSON header whose tensor offsets must
  end exactly at the end of the file;
* JSON files written last (``trainer_state.json``, ``metadata.json``) must parse.

Every failed check raises :class:`~resumekit.errors.CorruptCheckpointError` naming the file and what is wrong, so
a layout's ``validate`` turns it into the reason shown to the user. Nothing here imports torch or unpickles
anything: :func:`scan_pickle_scalars` reads pickle *opcodes* only, it never executes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import re
import struct
import zipfile
from dataclasses import replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..errors import CorruptCheckpointError
from ..format import Manifest
from ..storage import Entry, Storage
from .base import CheckpointInfo, invalid
from .native import check_checkpoint

#: file name of the resumekit manifest written into foreign checkpoint directories (see integrations/hf.py)
FOREIGN_MANIFEST = "resumekit.manifest.json"

#: a safetensors header larger than this is certainly garbage (the format itself caps it at 100 MB)
_MAX_SAFETENSORS_HEADER = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
    "C64": 8,
}
_CHUNK = 8 << 20
#: what :func:`scan_pickle_scalars` reports for a key whose value is not an int, bool or None
NOT_SCALAR = Ellipsis


def fail(where: str, reason: str) -> CorruptCheckpointError:
    """The error every check raises; ``where`` is the checkpoint, ``reason`` a sentence naming the file."""
    return CorruptCheckpointError(where, reason)


def files_of(storage: Storage, rel: str) -> Dict[str, Entry]:
    """The direct children of ``rel`` by name (empty when it does not exist)."""
    return {e.name: e for e in storage.listdir(rel)}


def join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


# --- torch zip files --------------------------------------------------------------------------------------------

def check_torch_zip(storage: Storage, rel: str, where: str, full: bool, shown: Optional[str] = None) -> None:
    """Check that a ``torch.save`` file is a complete zip archive.

    Quick: the end-of-central-directory record and the central directory parse, and every member's data lies
    before the directory (what a file cut short, or one whose writer died before the directory, cannot satisfy).
    Full: additionally every member's CRC-32 is checked (reads the whole file).

    Args:
        storage: the checkpoint root.
        rel: the file, relative to the root.
        where: the checkpoint, for the error.
        full: also CRC-check every member.
        shown: the file name used in messages (default: ``rel``).
    """
    shown = shown or rel
    try:
        f = storage.open_read(rel)
    except FileNotFoundError:
        raise fail(where, f"{shown} is missing") from None
    with f:
        head = f.read(4)
        f.seek(0)
        if not head:
            raise fail(where, f"{shown} is empty (truncated or still being written)")
        if head[:2] != b"PK":
            raise fail(where, f"{shown} is not a zip archive: a torch file in the legacy format (re-save it with "
                              "torch>=1.6) or not a torch.save file at all")
        try:
            zf = zipfile.ZipFile(f)  # reads only the end record and the central directory
        except zipfile.BadZipFile:
            raise fail(where, f"{shown} is not a complete torch file: its zip central directory is missing "
                              "(truncated or still being written)") from None
        except (OSError, ValueError, EOFError, struct.error) as e:
            raise fail(where, f"{shown} is unreadable ({e})") from None
        with zf:
            start_dir = getattr(zf, "start_dir", None)
            for zi in zf.infolist():
                if start_dir is not None and zi.header_offset + zi.compress_size > start_dir:
                    raise fail(where, f"{shown} is damaged: member {zi.filename} runs past the zip directory")
            if full:
                try:
                    bad = zf.testzip()
                except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error) as e:
                    raise fail(where, f"{shown} is damaged ({e})") from None
                if bad is not None:
                    raise fail(where, f"{shown} is damaged: CRC mismatch in member {bad}")


def scan_pickle_scalars(storage: Storage, rel: str, keys: Iterable[str]) -> Dict[str, Any]:
    """Read small scalar values stored under string keys in a torch file's pickle, without unpickling it.

    The pickle stream is walked with :func:`pickletools.genops`, which decodes opcodes and never runs them, so this
    is safe on untrusted files. A key string immediately followed by an int, None or bool opcode yields that
    value, any other value yields :data:`NOT_SCALAR` (first occurrence wins). Used to cross-check world sizes
    recorded inside DeepSpeed/Megatron files.

    Returns:
        The keys that were found, with their values; an empty dict when the file cannot be read.
    """
    wanted = set(keys)
    found: Dict[str, Any] = {}
    try:
        with storage.open_read(rel) as f, zipfile.ZipFile(f) as zf:
            names = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                return found
            data = zf.read(names[0])
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, struct.error):
        return found
    pending: Optional[str] = None
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                continue  # memo bookkeeping sits between a key and its value
            if pending is not None:
                if name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG"):
                    found.setdefault(pending, int(arg) if not isinstance(arg, bool) else arg)
                elif name == "NONE":
                    found.setdefault(pending, None)
                elif name in ("NEWTRUE", "NEWFALSE"):
                    found.setdefault(pending, name == "NEWTRUE")
                else:
                    found.setdefault(pending, NOT_SCALAR)
                pending = None
            if name in ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8") and arg in wanted:
                pending = arg
            if len(found) == len(wanted):
                break
    except (ValueError, struct.error, IndexError):
        pass  # a damaged stream just yields what was found before the damage
    return found


# --- safetensors ------------------------------------------------------------------------------------------------

def check_safetensors(storage: Storage, rel: str, where: str, full: bool, size: Optional[int] = None,
                      shown: Optional[str] = None) -> Dict[str, Any]:
    """Check that a safetensors file's header is whole and describes exactly the bytes that follow it.

    Quick and full both read only the header. Full additionally checks every tensor's byte range against its
    dtype and shape and that the ranges tile the data area without gaps or overlaps.

    Returns:
        The parsed header.
    """
    shown = shown or rel
    try:
        if size is None:
            size = storage.size(rel)
        with storage.open_read(rel) as f:
            head = _read_exact(f, 8)
            if len(head) < 8:
                raise fail(where, f"{shown} is truncated: {size} bytes, shorter than the 8-byte safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                raise fail(where, f"{shown} is truncated or not safetensors: header length {n} does not fit in "
                                  f"its {size} bytes")
            raw = _read_exact(f, n)
    except FileNotFoundError:
        raise fail(where, f"{shown} is missing") from None
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise fail(where, f"{shown} has a damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise fail(where, f"{shown} has a damaged safetensors header (not a JSON object)")
    data_size = size - 8 - n
    ranges: List[Tuple[int, int, str]] = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offs = t.get("data_offsets") if isinstance(t, dict) else None
        if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
                or offs[0] < 0 or offs[1] < offs[0]):
            raise fail(where, f"{shown} has a damaged safetensors header (bad data_offsets for {name!r})")
        ranges.append((offs[0], offs[1], name))
    end = max((r[1] for r in ranges), default=0)
    if end != data_size:
        if end > data_size:
            raise fail(where, f"{shown} is truncated: its header describes {end} bytes of tensor data but only "
                              f"{data_size} follow it")
        raise fail(where, f"{shown} has {data_size - end} unexpected bytes after its tensor data")
    if full:
        for begin, stop, name in ranges:
            t = header[name]
            width = _DTYPE_BYTES.get(str(t.get("dtype")))
            shape = t.get("shape")
            if width is not None and isinstance(shape, list) and all(isinstance(d, int) for d in shape):
                count = 1
                for d in shape:
                    count *= d
                if count * width != stop - begin:
                    raise fail(where, f"{shown}: tensor {name!r} has {stop - begin} bytes, its dtype and shape "
                                      f"need {count * width}")
        pos = 0
        for begin, stop, name in sorted(ranges):
            if begin != pos:
                raise fail(where, f"{shown}: tensor {name!r} starts at byte {begin}, expected {pos} "
                                  "(overlapping or missing tensor data)")
            pos = stop
    return header


def _read_exact(f, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = f.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


# --- JSON and small text files ----------------------------------------------------------------------------------

def read_json(storage: Storage, rel: str, where: str, why_missing: str = "", shown: Optional[str] = None) -> Any:
    """Parse a JSON file; a missing or unparseable one fails with a reason naming it."""
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
    ent = files.get(name)
    if ent is None or ent.is_dir:
        raise fail(where, f"{shown} is missing{' ' + why_missing if why_missing else ''}")
    if ent.size == 0:
        raise fail(where, f"{shown} is empty (truncated or still being written)")


# --- rank sets --------------------------------------------------------------------------------------------------

def missing_ranks(present: Set[int], expected: Optional[int] = None) -> List[int]:
    """Ranks absent from ``present``, which must be exactly ``0..expected-1`` (``0..max`` when not given)."""
    n = expected if expected is not None else (max(present) + 1 if present else 0)
    return [r for r in range(n) if r not in present]


def describe_ranks(ranks: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(r) for r in ranks[:limit])
    return shown + (f" and {len(ranks) - limit} more" if len(ranks) > limit else "")


def grid_missing(coords: Set[Tuple[int, ...]]) -> List[Tuple[int, ...]]:
    """Points missing from the full grid ``range(max_0+1) x range(max_1+1) x ...`` spanned by ``coords``."""
    if not coords:
        return []
    dims = len(next(iter(coords)))
    sizes = [max(c[i] for c in coords) + 1 for i in range(dims)]
    out: List[Tuple[int, ...]] = []

    def walk(prefix: Tuple[int, ...]) -> None:
        if len(prefix) == dims:
            if prefix not in coords:
                out.append(prefix)
            return
        for i in range(sizes[len(prefix)]):
            walk(prefix + (i,))

    walk(())
    return out


# --- torch.distributed.checkpoint directories -------------------------------------------------------------------

def check_dcp_dir(storage: Storage, rel: str, where: str, shown: Optional[str] = None) -> Dict[str, Entry]:
    """A torch.distributed.checkpoint directory: ``.metadata`` (written last by the coordinator) + ``*.distcp``.

    ``.metadata`` is a pickle and is never loaded; its presence after every rank's data files is the commit mark.
    """
    shown = rel if shown is None else shown
    files = files_of(storage, rel)
    prefix = f"{shown}/" if shown else ""
    if not files:
        raise fail(where, f"{shown or 'the checkpoint directory'} is missing or empty")
    check_file_nonempty(files, ".metadata", where, f"{prefix}.metadata",
                        "(torch.distributed.checkpoint writes it once every rank has finished: the save never "
                        "finished)")
    if not any(n.endswith(".distcp") for n in files):
        raise fail(where, f"{prefix}*.distcp data files are missing")
    return files


# --- resumekit manifests inside foreign checkpoints -------------------------------------------------------------

def check_foreign_manifest(storage: Storage, name: str, where: str, full: bool,
                           step: Optional[int] = None) -> Manifest:
    """Verify a foreign checkpoint against the resumekit manifest written into it (sizes; xxh3 when ``full``)."""
    try:
        return check_checkpoint(storage, name, full=full, manifest=FOREIGN_MANIFEST, step=step)
    except CorruptCheckpointError as e:
        raise fail(where, e.reason) from None


def sha256_file(storage: Storage, rel: str) -> str:
    h = hashlib.sha256()
    with storage.open_read(rel) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


# --- loading, only where a layout's full check requires it -------------------------------------------------

def load_weights_only(storage: Storage, rel: str, where: str) -> Any:
    """``torch.load(weights_only=True)`` a stored file (torch imported here only); failures name the file and fix."""
    import torch  # deferred: layouts must import without torch (the supervisor runs where torch may be absent)

    local = storage.local_path(rel)
    try:
        if local:
            return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        with storage.open_read(rel) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for damaged or unsafe data
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        if "weights_only" in text or "Unsupported global" in text:
            glob = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
            what = f"{glob.group(1)} is not allowed" if glob else first
            raise fail(where, f"{os.path.basename(rel)} cannot be loaded with weights_only=True ({what}): it holds "
                              "Python objects beyond tensors and plain containers; re-save plain state_dicts, or "
                              "allow the types with torch.serialization.add_safe_globals") from None
        raise fail(where, f"{os.path.basename(rel)} does not load ({type(e).__name__}: {first})") from None


# --- validate() plumbing ----------------------------------------------------------------------------------------

def run_check(info: CheckpointInfo, check) -> CheckpointInfo:
    """Run ``check() -> dict of CheckpointInfo fields`` and turn its failure into an invalid info."""
    try:
        fields = check() or {}
    except CorruptCheckpointError as e:
        return invalid(info, e.reason)
    except OSError as e:
        return invalid(info, f"unreadable: {e}")
    return replace(info, valid=True, reason="", **fields)


def sum_sizes(files: Dict[str, Entry]) -> int:
    return sum(e.size for e in files.values() if not e.is_dir)


def newest_mtime(files: Dict[str, Entry], *names: str) -> Optional[float]:
    times = [files[n].mtime for n in names if n in files and files[n].mtime is not None]
    return max(times) if times else None  # type: ignore[type-var]
