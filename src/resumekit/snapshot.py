"""Snapshot-then-persist: copy the state into reused host buffers, write it in the background.

The training thread pays only for :meth:`StagingBuffers.snapshot` (a memory copy into one buffer allocated once and
reused, laid out as the tensor file itself so the persist can hand it to the disk with ``O_DIRECT``; page-locked
for CUDA tensors, with non-blocking copies and a single sync). :class:`BackgroundPersister` runs at most one
persist at a time on a worker thread; the file writes, fsyncs and the xxh3 hashing release the GIL, so the training
step keeps running. Errors are stored and raised at the next call, never dropped.

Rule for overlapping saves: a save requested while the previous persist is still running *waits* for it (the
staging buffers are about to be overwritten, and skipping would silently widen the loss window). The wait is
counted in the save's blocking time and reported, so a too-short interval shows up in ``save_cost``.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable

import torch

from .codec import build_header, ordered

_PAGE = mmap.PAGESIZE


class StagedTensors(dict):
    """The staged tensors (name -> host tensor), all views into one page-aligned file image.

    ``image[:size]`` is the tensor file exactly as :func:`resumekit.codec.write_tensors` would write these tensors
    (safetensors header, then the data in :func:`resumekit.codec.ordered` order), so the persist can hand the
    buffer to the disk as it is (``O_DIRECT``, :mod:`resumekit.storage.direct`) instead of streaming tensor by
    tensor through the page cache. Still a plain ``dict`` to everything else.
    """

    image: memoryview
    size: int


class StagingBuffers:
    """Host buffers that mirror the state's tensors, allocated on first use and reused while the layout holds.

    The buffers are one page-aligned anonymous mapping laid out as the tensor file (header included), so the
    snapshot's one memory copy is also the only copy the persist needs. For CUDA tensors the mapping is
    page-locked in place (``cudaHostRegister``: exact size, where the caching pinned allocator would round a
    multi-GiB request up to the next power of two), so device-to-host copies run non-blocking.

    Peak extra host memory of an async save is therefore one copy of the state (plus its header, a few bytes a
    tensor, and less than a page of rounding).
    """

    def __init__(self) -> None:
        self._signature: tuple | None = None
        self._image: mmap.mmap | None = None
        self._base: torch.Tensor | None = None
        self._views: dict[str, torch.Tensor] = {}
        self._size = 0
        self._pinned = False

    @property
    def nbytes(self) -> int:
        return len(self._image) if self._image is not None else 0

    def snapshot(self, tensors: dict[str, torch.Tensor]) -> StagedTensors:
        items = ordered({k: t.detach() for k, t in tensors.items()})
        signature = tuple((name, t.dtype, tuple(t.shape)) for name, t in items)
        pin = any(t.is_cuda for _, t in items)
        if signature != self._signature or (pin and not self._pinned):
            self._allocate(items, signature, pin)
        out = StagedTensors()
        devices = set()
        for name, t in items:
            buf = self._views[name]
            buf.copy_(t.resolve_conj().resolve_neg(), non_blocking=t.is_cuda and self._pinned)
            if t.is_cuda:
                devices.add(t.device)
            out[name] = buf
        for dev in devices:  # synchronize() without a device only waits for the current one
            torch.cuda.synchronize(dev)
        assert self._image is not None
        out.image = memoryview(self._image)
        out.size = self._size
        return out  # in file order; codec.ordered() (stable) keeps it, so any writer lays them out the same

    def _allocate(self, items: list[tuple[str, torch.Tensor]], signature: tuple, pin: bool) -> None:
        self.release()  # the old image goes first: peak memory stays one copy of the state
        prefix, data_size = build_header(items)
        size = len(prefix) + data_size
        image = _new_image(max(_PAGE, -(-size // _PAGE) * _PAGE))
        image[: len(prefix)] = prefix
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            base = torch.frombuffer(image, dtype=torch.uint8) if len(image) else torch.empty(0, dtype=torch.uint8)
        views: dict[str, torch.Tensor] = {}
        off = len(prefix)
        for name, t in items:
            n = t.numel() * t.element_size()
            if n == 0:
                views[name] = torch.empty(t.shape, dtype=t.dtype)
            else:
                # Offsets are multiples of the element size (codec.ordered: larger elements first, header padded).
                views[name] = base[off : off + n].view(t.dtype).reshape(t.shape)
            off += n
        self._pinned = pin and _pin(base)
        self._image, self._base, self._views = image, base, views
        self._signature, self._size = signature, size

    def release(self) -> None:
        if self._pinned and self._base is not None:
            _unpin(self._base)
        self._pinned = False
        self._views = {}
        self._base = None
        self._image = None  # unmapped once the last view (a persist in flight holds some) is gone
        self._signature = None
        self._size = 0


def _new_image(length: int) -> mmap.mmap:
    """A page-aligned (as ``O_DIRECT`` needs), pre-faulted, private anonymous mapping of ``length`` bytes.

    Pre-faulted (``MAP_POPULATE``) because the first snapshot would otherwise take a page fault per 4 KiB inside
    the training step's copy: the kernel fills the pages in one pass, about half the first save's blocking time
    (measured 0.27 s vs 0.52 s for 768 MiB). Private, with ``MADV_DONTFORK``, so a process forked later (DataLoader
    workers) neither inherits the image nor turns every later snapshot write into a copy-on-write fault; a shared
    mapping avoided the copy-on-write but cannot be pre-faulted any faster than the copy faults it.
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    image = mmap.mmap(-1, length, flags=flags)
    if hasattr(mmap, "MADV_DONTFORK"):
        image.madvise(mmap.MADV_DONTFORK)
    return image


def _pin(base: torch.Tensor) -> bool:
    """Page-lock ``base`` for CUDA copies; False (pageable memory, copies still correct) when CUDA refuses."""
    if base.numel() == 0:
        return False
    try:
        err = torch.cuda.cudart().cudaHostRegister(base.data_ptr(), base.numel(), 0)
    except Exception:  # noqa: BLE001 - no CUDA runtime here: pageable memory works, only slower
        return False
    return int(err) == 0


def _unpin(base: torch.Tensor) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(base.data_ptr())
    except Exception:  # noqa: BLE001 - nothing to undo
        pass


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The synchronous path: CPU contiguous views where possible (no copy for CPU contiguous tensors)."""
    return {k: t.detach().resolve_conj().resolve_neg().cpu().contiguous() for k, t in tensors.items()}


#: how much nicer than the training the persist thread runs: 0 (off) unless ``RESUMEKIT_PERSIST_NICE`` says so
PERSIST_NICE = 0


def _lower_priority() -> None:
    """Make the calling (persist) thread yield the CPU to the training threads, when ``RESUMEKIT_PERSIST_NICE=N``.

    For CPU-only jobs. When every core runs a training thread, a parallel step waits for its slowest thread, and a
    persist thread of equal priority preempting one of them stalls the whole step: in the CPU-bound benchmark that
    cost about twice the persist's own CPU time (async step overhead 0.104, interleaved windows), and at nice +10
    the overhead was -0.007 (noise) while the persist took 0.66 s instead of 0.49 s. It is off by default because
    the same runs measured the accelerator stand-in (one compute thread, a core free: the GPU/NPU jobs this
    library is for) *worse* with it (0.088 and 0.041 against 0.003-0.007 without), for reasons not yet
    understood. Linux applies nice per thread (``setpriority`` on the thread id); elsewhere that call would renice
    the whole process, so it is left alone there. The threads this thread starts (the O_DIRECT writers) inherit it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        delta = int(os.environ.get("RESUMEKIT_PERSIST_NICE", PERSIST_NICE))
    except ValueError:
        delta = PERSIST_NICE
    if delta <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + delta))
    except OSError:  # a sandbox that forbids it: the persist runs at the training's priority, as before
        pass


class BackgroundPersister:
    """At most one background job in flight; its exception is kept until someone asks."""

    def __init__(self, name: str = "resumekit-persist") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        t = self._thread  # read once: wait() on another thread may set it to None in between
        return t is not None and t.is_alive()

    def submit(self, job: Callable[[], object]) -> float:  # the job's return value is ignored
        """Wait for the previous job, then start ``job``; returns the seconds spent waiting."""
        waited = self.wait(raise_error=True)

        def run() -> None:
            _lower_priority()
            try:
                job()
            except BaseException as e:  # noqa: BLE001 - stored and re-raised on the training thread
                with self._lock:
                    self._error = e

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        return waited

    def wait(self, raise_error: bool = True) -> float:
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if raise_error:
            self.raise_pending()
        return time.perf_counter() - t0

    def raise_pending(self) -> None:
        with self._lock:
            err, self._error = self._error, None
        if err is not None:
            raise err

    @property
    def pending_error(self) -> BaseException | None:
        return self._error
