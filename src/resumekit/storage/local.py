"""Local or mounted (NFS / SFS Turbo) directories: tmp dir, fsync every file, manifest, rename, fsync parent."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from typing import BinaryIO, List, Optional

from ..errors import CheckpointWriteError
from ..format import MANIFEST, TMP_PREFIX
from .base import Entry, Storage, Transaction

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
        self._f = open(path, "wb", buffering=_WRITE_BUFFER)

    def write(self, data) -> int:
        return self._f.write(data)

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


def atomic_write(path: str, data: bytes, mode: Optional[int] = None) -> None:
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
    def __init__(self, storage: "LocalStorage", name: str, tmp_name: str):
        self.storage = storage
        self.name = name
        self.tmp_path = os.path.join(storage.root, tmp_name)
        self.final_path = os.path.join(storage.root, name)
        os.makedirs(self.tmp_path)

    def open_write(self, rel: str) -> BinaryIO:
        path = os.path.join(self.tmp_path, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return _DurableFile(path)  # type: ignore[return-value]

    def commit(self, manifest: bytes) -> str:
        with _DurableFile(os.path.join(self.tmp_path, MANIFEST)) as f:
            f.write(manifest)
        fsync_dir(self.tmp_path)
        if os.path.exists(self.final_path):
            # Only reached when an invalid directory of the same step is in the way (the manager keeps valid
            # ones): move it aside under a tmp name, which discovery ignores, then remove it.
            aside = os.path.join(self.storage.root, f"{TMP_PREFIX}replaced-{self.name}-{uuid.uuid4().hex[:8]}")
            os.rename(self.final_path, aside)
            os.rename(self.tmp_path, self.final_path)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(self.tmp_path, self.final_path)
        fsync_dir(self.storage.root)
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

    def local_path(self, rel: str = "") -> Optional[str]:
        return self.join(rel)

    def listdir(self, rel: str = "") -> List[Entry]:
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

    def size(self, rel: str) -> int:
        return os.stat(self.join(rel)).st_size

    def mtime(self, rel: str) -> Optional[float]:
        try:
            return os.stat(self.join(rel)).st_mtime
        except FileNotFoundError:
            return None

    def open_read(self, rel: str) -> BinaryIO:
        return open(self.join(rel), "rb", buffering=0)

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

    def free_bytes(self) -> Optional[int]:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize
