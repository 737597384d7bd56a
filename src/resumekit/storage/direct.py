"""Direct I/O for the persist: write a page-aligned, in-memory file image with ``O_DIRECT`` where the file system
takes it, so the disk's DMA moves the bytes and the training process's CPU does not.

Why: a buffered write copies every byte into the page cache (CPU time on the training process's cores), then the
kernel's writeback moves it again and, when the checkpoint is deleted by retention, evicts every page. Measured on
this project's 2-core machines, a buffered 512 MiB write + fsync cost ~1 s of CPU; the same bytes with ``O_DIRECT``
cost ~0.02 s. The async snapshot already holds the whole tensor file, laid out byte for byte, in one aligned host
buffer (:class:`resumekit.snapshot.StagingBuffers`), so nothing has to be copied to satisfy ``O_DIRECT``'s alignment.

Safety is unchanged: the file is still ``fsync``-ed before close (``O_DIRECT`` alone does not make the file's size
and block allocation durable), the manifest is still written after it, and the commit is still the rename. Support
is probed once per file system (one aligned block written to a scratch file); where it is refused (``EINVAL``:
some FUSE and network file systems, older tmpfs) the same image is written with ordinary buffered writes, and a
refusal seen later, mid-file, falls back the same way for the rest of the run. Imports no torch.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import uuid
from collections.abc import Callable

from ..events import note_progress

#: alignment of buffer addresses, file offsets and lengths for O_DIRECT: a page covers every logical block size
#: seen in practice (512 or 4096 bytes).
ALIGN = 4096
#: bytes per write call; large enough that per-call overhead vanishes, small enough to spread over the writers.
CHUNK = 16 << 20
#: concurrent writers: one O_DIRECT write is synchronous, two in flight keep the device queue busy.
WRITERS = 2

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_support: dict[int, bool] = {}  # st_dev -> O_DIRECT works there (probed once per file system)
_support_lock = threading.Lock()
# Test hook: "0" forces the buffered path everywhere, as on a file system that refuses O_DIRECT.
_ENV_DISABLE = "RESUMEKIT_DIRECT_IO"


def address(buf: memoryview) -> int:
    """The address of a writable buffer's first byte (to check its alignment); -1 for a read-only one, which
    therefore never counts as aligned."""
    if len(buf) == 0:
        return 0
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except TypeError:
        return -1


def enabled() -> bool:
    """False when ``RESUMEKIT_DIRECT_IO=0`` (buffered writes everywhere)."""
    return os.environ.get(_ENV_DISABLE, "1") != "0" and _O_DIRECT != 0


def supported(directory: str) -> bool:
    """Whether ``directory``'s file system accepts ``O_DIRECT`` writes; probed once per file system, cached."""
    if not enabled():
        return False
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return False
    with _support_lock:
        if dev in _support:
            return _support[dev]
    ok = _probe(directory)
    with _support_lock:
        _support[dev] = ok
    return ok


def forget(directory: str | None = None) -> None:
    """Forget the probe results (all, or ``directory``'s file system): the next write probes again."""
    with _support_lock:
        if directory is None:
            _support.clear()
            return
        try:
            _support.pop(os.stat(directory).st_dev, None)
        except OSError:
            pass


def _mark_unsupported(directory: str) -> None:
    try:
        dev = os.stat(directory).st_dev
    except OSError:
        return
    with _support_lock:
        _support[dev] = False


def _probe(directory: str) -> bool:
    path = os.path.join(directory, f".direct-probe-{uuid.uuid4().hex[:8]}")
    block = mmap.mmap(-1, ALIGN)  # anonymous mappings are page-aligned
    try:
        # A file system that refuses O_DIRECT may still create the file before failing the open (ramfs does).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DIRECT | os.O_CLOEXEC, 0o600)
        try:
            return os.write(fd, block) == ALIGN
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        block.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def write_image(
    path: str,
    image: memoryview,
    size: int,
    hash_update: Callable[[memoryview], object] | None = None,
) -> str:
    """Create ``path`` holding ``image[:size]``, durable (fsynced) on return; returns the mode used.

    The aligned body goes out with ``O_DIRECT`` from ``WRITERS`` threads while the calling thread hashes the same
    buffer (``hash_update`` gets it in order, in chunks; xxh3 and the writes release the GIL); the tail below one
    block is written buffered on the same descriptor once ``O_DIRECT`` is switched off, then the file is fsynced.

    Args:
        path: the new file (must not exist).
        image: the bytes; O_DIRECT is used only when its address is ``ALIGN``-aligned.
        size: bytes of ``image`` that make up the file.
        hash_update: fed every byte of the file, in order.

    Returns:
        ``"direct"`` or ``"buffered"`` (the file system refused O_DIRECT, or the buffer is not aligned).

    Raises:
        OSError: the write failed (ENOSPC, EIO, ...); the caller removes the partial file with its transaction.
    """
    mv = image[:size]
    directory = os.path.dirname(path) or "."
    use_direct = size >= ALIGN and address(image) >= 0 and address(image) % ALIGN == 0 and supported(directory)
    if use_direct:
        try:
            _write_direct(path, mv, hash_update)
            return "direct"
        except _Refused:
            # Accepted by the probe, refused by this file (a mount with its own rules): buffered from now on. The
            # hash pass over the buffer already ran to its end (a refusal is only raised after it), so the rewrite
            # must not feed the hasher a second time.
            _mark_unsupported(directory)
            _write_buffered(path, mv, None)
            return "buffered"
    _write_buffered(path, mv, hash_update)
    return "buffered"


class _Refused(Exception):
    """O_DIRECT refused on this file (EINVAL) before anything could be relied on: rewrite buffered."""


def _write_buffered(path: str, mv: memoryview, hash_update: Callable[[memoryview], object] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for off in range(0, len(mv), CHUNK):
            chunk = mv[off : off + CHUNK]
            if hash_update is not None:
                hash_update(chunk)
            _write_all(fd, chunk, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunk: memoryview, offset: int) -> None:
    done = 0
    while done < len(chunk):
        n = os.pwrite(fd, chunk[done:], offset + done)
        if n <= 0:  # pragma: no cover - a regular file never returns 0 for a non-empty write
            raise OSError(errno.EIO, "write returned 0 bytes")
        done += n
        note_progress(n)  # a blocking save's heartbeat ticker beats while bytes move


def _write_direct(path: str, mv: memoryview, hash_update: Callable[[memoryview], object] | None) -> None:
    body = len(mv) - len(mv) % ALIGN
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | _O_DIRECT, 0o644)
    try:
        offsets = list(range(0, body, CHUNK))
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                for off in offsets[k::WRITERS]:
                    if errors:
                        return  # another writer failed: stop early, the transaction is aborted anyway
                    # Each chunk is a multiple of ALIGN (CHUNK is, and the body is): aligned for O_DIRECT.
                    _write_all(fd, mv[off : min(off + CHUNK, body)], off)
            except BaseException as e:  # noqa: BLE001 - collected and raised on the calling thread
                errors.append(e)

        threads = [
            threading.Thread(target=writer, args=(k,), name=f"resumekit-direct-{k}", daemon=True)
            for k in range(min(WRITERS, len(offsets)))
        ]
        for t in threads:
            t.start()
        try:
            if hash_update is not None:
                for off in range(0, len(mv), CHUNK):
                    hash_update(mv[off : off + CHUNK])
        finally:
            for t in threads:
                t.join()
        if errors:
            e = errors[0]
            if isinstance(e, OSError) and e.errno == errno.EINVAL:
                raise _Refused() from e  # safe at any point: the buffered rewrite truncates the file
            raise e
        if body < len(mv):
            # The tail below one block cannot go out with O_DIRECT: switch it off on this descriptor and write the
            # tail through the page cache; the fsync below makes both parts (and the size) durable.
            flags = _fcntl_getfl(fd)
            _fcntl_setfl(fd, flags & ~_O_DIRECT)
            _write_all(fd, mv[body:], body)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fcntl_getfl(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _fcntl_setfl(fd: int, flags: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, flags)


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """An anonymous, page-aligned buffer of ``nbytes`` (rounded up to ``ALIGN``); freed when closed or dropped."""
    return mmap.mmap(-1, max(ALIGN, -(-nbytes // ALIGN) * ALIGN))


__all__ = ["ALIGN", "write_image", "supported", "enabled", "forget", "aligned_buffer", "address"]
