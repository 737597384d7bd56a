"""Snapshot-then-persist: copy the state into reused host buffers, write it in the background.

The training thread pays only for :meth:`StagingBuffers.snapshot` (a memory copy into buffers allocated once and
reused; pinned host memory plus non-blocking copies and a single sync for CUDA tensors). :class:`BackgroundPersister`
runs at most one persist at a time on a worker thread; the file writes, fsyncs and the xxh3 hashing release the GIL,
so the training step keeps running. Errors are stored and raised at the next call, never dropped.

Rule for overlapping saves: a save requested while the previous persist is still running *waits* for it (the
staging buffers are about to be overwritten, and skipping would silently widen the loss window). The wait is
counted in the save's blocking time and reported, so a too-short interval shows up in ``save_cost``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch


class StagingBuffers:
    """Host buffers that mirror the state's tensors, allocated on first use and reused while shapes hold.

    Peak extra host memory of an async save is therefore one copy of the state.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def snapshot(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        devices = set()
        for name, t in tensors.items():
            t = t.detach()
            buf = self._bufs.get(name)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                # Pinned memory only pays off (and only exists) for device-to-host copies.
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
                self._bufs[name] = buf
            buf.copy_(t.resolve_conj().resolve_neg(), non_blocking=t.is_cuda)
            if t.is_cuda:
                devices.add(t.device)
            out[name] = buf
        for dev in devices:  # synchronize() without a device only waits for the current one
            torch.cuda.synchronize(dev)
        for stale in set(self._bufs) - set(tensors):
            del self._bufs[stale]
        return out

    def release(self) -> None:
        self._bufs.clear()


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The synchronous path: CPU contiguous views where possible (no copy for CPU contiguous tensors)."""
    return {k: t.detach().resolve_conj().resolve_neg().cpu().contiguous() for k, t in tensors.items()}


class BackgroundPersister:
    """At most one background job in flight; its exception is kept until someone asks."""

    def __init__(self, name: str = "resumekit-persist") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[], object]) -> float:  # the job's return value is ignored
        """Wait for the previous job, then start ``job``; returns the seconds spent waiting."""
        waited = self.wait(raise_error=True)

        def run() -> None:
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
