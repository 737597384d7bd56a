"""Small scalars read out of a torch file's pickle by walking its opcodes, never by unpickling it.

:func:`pickletools.genops` decodes opcodes and never runs them, so this is safe on untrusted files. The layouts use
it to cross-check parallel sizes that DeepSpeed and Megatron record inside their files against the file names.
"""

from __future__ import annotations

import pickletools
import struct
import zipfile
from typing import Any, Dict, Iterable, Optional

from ...storage import Storage

#: what :func:`scan_pickle_scalars` reports for a key whose value is not an int, bool or None
NOT_SCALAR = Ellipsis

_INT_OPS = ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG")
_STR_OPS = ("BINUNICODE", "SHORT_BINUNICODE", "UNICODE", "BINUNICODE8")
_MEMO_OPS = ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE")


def scan_pickle_scalars(storage: Storage, rel: str, keys: Iterable[str]) -> Dict[str, Any]:
    """Read small scalar values stored under string keys in a torch file's pickle, without unpickling it.

    A key string immediately followed by an int, None or bool opcode yields that value, any other value yields
    :data:`NOT_SCALAR` (first occurrence wins).

    Args:
        storage: the checkpoint root.
        rel: the torch file, relative to the root.
        keys: the dictionary keys to look for.

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
            if name in _MEMO_OPS:
                continue  # memo bookkeeping sits between a key and its value
            if pending is not None:
                if name in _INT_OPS:
                    found.setdefault(pending, int(arg) if not isinstance(arg, bool) else arg)
                elif name == "NONE":
                    found.setdefault(pending, None)
                elif name in ("NEWTRUE", "NEWFALSE"):
                    found.setdefault(pending, name == "NEWTRUE")
                else:
                    found.setdefault(pending, NOT_SCALAR)
                pending = None
            if name in _STR_OPS and arg in wanted:
                pending = arg
            if len(found) == len(wanted):
                break
    except (ValueError, struct.error, IndexError):
        pass  # a damaged stream just yields what was found before the damage
    return found
