"""``torch.save`` files: a zip archive whose central directory is written last, at the end of the file.

A file cut short, or one whose writer died before the directory, has no end-of-central-directory record, so a
quick check reads only that directory; nothing here imports torch or unpickles anything.
"""

from __future__ import annotations

import struct
import zipfile

from ...storage import Storage
from .common import fail


def check_torch_zip(storage: Storage, rel: str, where: str, full: bool, shown: str | None = None) -> None:
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

    Raises:
        CorruptCheckpointError: naming the file and what is wrong.
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
            raise fail(
                where,
                f"{shown} is not a zip archive: a torch file in the legacy format (re-save it with "
                "torch>=1.6) or not a torch.save file at all",
            )
        try:
            zf = zipfile.ZipFile(f)  # reads only the end record and the central directory
        except zipfile.BadZipFile:
            raise fail(
                where,
                f"{shown} is not a complete torch file: its zip central directory is missing "
                "(truncated or still being written)",
            ) from None
        except (OSError, ValueError, EOFError, struct.error) as e:
            raise fail(where, f"{shown} is unreadable ({e})") from None
        with zf:
            start_dir = getattr(zf, "start_dir", None)
            unpacked = 0
            for zi in zf.infolist():
                if start_dir is not None and zi.header_offset + zi.compress_size > start_dir:
                    raise fail(where, f"{shown} is damaged: member {zi.filename} runs past the zip directory")
                unpacked += zi.file_size
            if full and start_dir is not None and unpacked > 1000 * (start_dir + 1) + (64 << 20):
                # torch.save stores members uncompressed; a "zip bomb" would make the CRC pass unpack gigabytes.
                raise fail(where, f"{shown} unpacks to {unpacked} bytes from {start_dir}: not a torch.save file")
            if full:
                try:
                    bad = zf.testzip()
                except (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, NotImplementedError) as e:
                    raise fail(where, f"{shown} is damaged ({e})") from None
                if bad is not None:
                    raise fail(where, f"{shown} is damaged: CRC mismatch in member {bad}")
