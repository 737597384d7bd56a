"""Local or mounted (NFS / SFS Turbo) directories: tmp dir, fsync every file, manifest, rename, fsync parent.

Reading is as careful as writing: only regular files are opened (``lstat`` + ``O_NOFOLLOW|O_NONBLOCK`` and the
descriptor's own ``fstat``), so a FIFO, a device or a socket planted in a checkpoint gets a verdict instead of
hanging the reader, and a symlink is followed only at the root's top level (Lightning's ``last.ckpt``) and only to
a target inside the root: a symlink inside a checkpoint never leads a reader out of it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from typing import BinaryIO

from ..errors import CheckpointWriteError, UnsafeFileError
from ..events import note_progress
from ..format import MANIFEST, TMP_PREFIX, keep_dirname
from ..units import file_kind, open_regular
from . import direct
from .base import Entry, Storage, Transaction
from .resave import exchange_dirs, fault_point, promote

_WRITE_BUFFER = 1 << 20


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network file systems refuse fsync on directories; the rename is still ordered.
    finally:
        os.close(fd)


class _DurableFile:
    """A buffered file that fsyncs on close, so a closed file is on disk before the manifest names it."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "wb", buffering=_WRITE_BUFFER)  # noqa: SIM115 - held by this writer until close()

    def write(self, data) -> int:
        n = self._f.write(data)
        note_progress(n or 0)  # a blocking save's heartbeat ticker beats while bytes move
        return n

    def flush(self) -> None:
        self._f.flush()

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        if self._f.closed:
            return
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            try:
                self._f.close()
            except OSError:
                pass


def atomic_write(path: str, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably: temp file, fsync, rename, fsync the directory."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with _DurableFile(tmp) as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(d)


class LocalTransaction(Transaction):
    def __init__(self, storage: LocalStorage, name: str, tmp_name: str):
        self.storage = storage
        self.name = name
        self.tmp_path = os.path.join(storage.root, tmp_name)
        self.final_path = os.path.join(storage.root, name)
        os.makedirs(self.tmp_path)

    def open_write(self, rel: str) -> BinaryIO:
        path = os.path.join(self.tmp_path, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _DurableFile(path)  # type: ignore[return-value]

    def write_image(self, rel: str, image: memoryview, size: int, hash_update=None) -> str:
        """Write ``image[:size]`` as the file ``rel``, durable on return, with ``O_DIRECT`` where the file system
        takes it (:func:`resumekit.storage.direct.write_image`); returns ``"direct"`` or ``"buffered"``."""
        path = os.path.join(self.tmp_path, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return direct.write_image(path, image, size, hash_update)

    def commit(self, manifest: bytes) -> str:
        with _DurableFile(os.path.join(self.tmp_path, MANIFEST)) as f:
            f.write(manifest)
        fsync_dir(self.tmp_path)
        root = self.storage.root
        if not os.path.lexists(self.final_path):
            os.rename(self.tmp_path, self.final_path)
        elif exchange_dirs(self.tmp_path, self.final_path):
            # A re-save (the directory in the way is not this run's): the new copy and the old one swapped names
            # atomically, so the step is never without a copy; the old one now sits under the ignored tmp name.
            fsync_dir(root)
            fault_point("resave-exchanged")
            _remove_any(self.tmp_path)
        else:
            # No atomic exchange here (NFS, non-Linux): commit under a protected keep name first, then swap. A kill
            # in between leaves the keep copy whole; the next writer's recover_resaves() completes the swap.
            keep = keep_dirname(self.name)
            os.rename(self.tmp_path, os.path.join(root, keep))
            fsync_dir(root)
            promote(self.storage, keep, self.name)
        fsync_dir(root)
        return self.final_path

    def abort(self) -> None:
        shutil.rmtree(self.tmp_path, ignore_errors=True)


class LocalStorage(Storage):
    """A directory on a local or mounted POSIX file system."""

    is_local = True

    def __init__(self, root: str, create: bool = True):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.uri = self.root
        if create:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as e:
                raise CheckpointWriteError(
                    e.errno,
                    f"cannot create checkpoint directory {self.root}: {e.strerror}; "
                    "choose a writable location or fix its permissions",
                ) from None

    def join(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def local_path(self, rel: str = "") -> str | None:
        return self.join(rel)

    def listdir(self, rel: str = "") -> list[Entry]:
        out = []
        try:
            it = os.scandir(self.join(rel))
        except (FileNotFoundError, NotADirectoryError):
            return []
        with it:
            for de in it:
                try:
                    st = de.stat()
                    out.append(Entry(de.name, de.is_dir(), st.st_size, st.st_mtime))
                except FileNotFoundError:
                    continue  # removed while listing
        return out

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.join(rel))

    def regular_path(self, rel: str) -> str:
        """The path of the regular file ``rel``, checked without opening it: no symlink below the root except a
        top-level entry whose target stays inside the root, and the file itself regular.

        Raises:
            FileNotFoundError: it does not exist.
            UnsafeFileError: a symlink leads elsewhere, or the file is a FIFO, device, socket or directory.
        """
        parts = [p for p in rel.split("/") if p not in ("", ".")]
        shown = "/".join(parts[1:]) if len(parts) > 1 else rel
        if not parts or ".." in parts:
            raise UnsafeFileError(self.join(rel), f"{shown} is not a path inside {self.root}")
        cur = self.root
        for i, part in enumerate(parts):
            cur = os.path.join(cur, part)
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                real, real_root = os.path.realpath(cur), os.path.realpath(self.root)
                if i > 0 or os.path.commonpath([real, real_root]) != real_root:
                    where = "inside the checkpoint" if i > 0 else f"leading out of {self.root}"
                    raise UnsafeFileError(
                        self.join(rel), f"{shown} is a symlink {where}; a checkpoint must hold its own files"
                    )
                cur = real
                st = os.stat(cur)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(self.join(rel), f"{shown} is {file_kind(st.st_mode)}, not a regular file")
        return cur

    def size(self, rel: str) -> int:
        return os.stat(self.regular_path(rel)).st_size

    def mtime(self, rel: str) -> float | None:
        try:
            return os.stat(self.join(rel)).st_mtime
        except FileNotFoundError:
            return None

    def open_read(self, rel: str) -> BinaryIO:
        path = self.regular_path(rel)
        try:
            fd = open_regular(path)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                raise
            # Swapped for a FIFO or a symlink since the check above: the same verdict, without waiting on it.
            raise UnsafeFileError(self.join(rel), f"{rel} is not a regular file ({e.strerror})") from None
        return os.fdopen(fd, "rb", buffering=0)

    def begin(self, name: str) -> Transaction:
        tmp = f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:10]}"
        try:
            return LocalTransaction(self, name, tmp)
        except OSError as e:
            raise CheckpointWriteError(
                e.errno,
                f"cannot create {os.path.join(self.root, tmp)}: {e.strerror}; "
                "check that the checkpoint directory is writable",
            ) from None

    def remove_tree(self, rel: str) -> None:
        path = self.join(rel)
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
            os.unlink(path)  # a stray file or link: nothing to hide while deleting
            return
        if not os.path.exists(path):
            return
        # Rename first so a half-deleted directory is never taken for a checkpoint.
        aside = os.path.join(self.root, f"{TMP_PREFIX}deleting-{os.path.basename(rel)}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, aside)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        fsync_dir(self.root)
        shutil.rmtree(aside, ignore_errors=True)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self.join(src), self.join(dst))
        fsync_dir(self.root)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        atomic_write(self.join(rel), data)

    def free_bytes(self) -> int | None:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize


def _remove_any(path: str) -> None:
    """Remove a directory tree, or a file or symlink, ignoring errors (what is left is ignored tmp garbage)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass
