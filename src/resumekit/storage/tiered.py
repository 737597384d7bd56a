"""Two tiers: saves commit to a fast local directory, a background uploader copies each committed step to a remote
root (an object store, or a slower shared file system), and a restore pre-downloads the remote newest when it is
newer than anything local. Imports no torch: the supervisor uses it too.

Ordering guarantees (each one is what makes a crash at any instant harmless):

* The upload of step N starts only after the local commit of N (it is queued by the local transaction's commit,
  after the rename and the directory fsync), so the uploader only ever reads complete, committed files.
* The remote commit of N is its manifest, PUT last (see :mod:`resumekit.storage.remote`); a crash during an upload
  leaves the remote's previous checkpoint as its newest valid one and an unfinished ``step_N/`` that does not count.
  The next start (:meth:`TieredStorage.resync`, called by ``CheckpointManager.restore``) queues again every local
  step newer than the remote's newest valid one.
* Local retention never deletes a step that is queued, uploading or failed to upload (the deletion is deferred
  until the step is on the remote or no longer needed); remote retention runs after each upload, with the same
  policy, on the remote's own valid steps, and never deletes the remote's newest valid one.
* Bytes are verified against the manifest's xxh3 on every copy, in both directions
  (:func:`resumekit.storage.transfer.copy_step`); a download lands in a local tmp dir renamed into place only when
  complete and verified. Which steps of a tier count is :func:`resumekit.verify.check_checkpoint`'s quick check.
* A store outage never stops training: a failed upload is retried in the background with a growing delay while
  local commits go on; the failure is logged and in the events (with the remote's lag), and ``wait``/``close``
  raise it when their own try fails. The backlog of steps waiting for the remote is bounded (steps and local free
  space); when it is full, new policy saves wait instead of filling the disk, and no waiting step is ever deleted
  before it is uploaded. See :mod:`resumekit.storage.uploader`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, BinaryIO

from ..errors import ConfigError
from ..events import EventLog
from ..format import Manifest, parse_step_dirname
from .base import Entry, Storage, Transaction
from .local import LocalStorage
from .memtier import in_memory, mem_available, tier_space_verdict
from .steps import Retention, newest_valid, plan_uploads, step_dirs, steps_to_resync, valid_manifest

# copy_step is looked up in this module by the uploader (through TieredStorage.upload_step) and by download (tests
# slow it down here); the supervisor and the benchmarks import it from here too.
from .transfer import PROGRESS_MIN_BYTES, copy_step, progress_bar, read_manifest_bytes
from .uploader import Uploader, UploadOptions, upload_status

log = logging.getLogger("resumekit")


# ------------------------------------------------------------------------------------------------------------------
# The tiered storage
# ------------------------------------------------------------------------------------------------------------------


class _TieredTransaction(Transaction):
    def __init__(self, tier: TieredStorage, inner: Transaction):
        self.tier = tier
        self.inner = inner
        self.name = inner.name

    def open_write(self, rel: str) -> BinaryIO:
        return self.inner.open_write(rel)

    def write_image(self, rel: str, image: memoryview, size: int, hash_update=None) -> str:
        """The local tier's direct write (see :meth:`LocalTransaction.write_image`)."""
        return self.inner.write_image(rel, image, size, hash_update)  # type: ignore[attr-defined]

    def commit(self, manifest: bytes) -> str:
        path = self.inner.commit(manifest)
        # Queued only now: the local step is committed (renamed, fsynced), so the uploader reads complete files.
        self.tier.enqueue_upload(self.name)
        return path

    def abort(self) -> None:
        self.inner.abort()


class TieredStorage(Storage):
    """A local tier that saves commit to, backed by a remote tier that committed steps are uploaded to.

    As a :class:`Storage` it *is* the local tier (listing, reading and writing go there, so training waits only
    for the local commit); the remote tier is reached through :meth:`enqueue_upload` (called by every commit),
    :meth:`download`, :meth:`resync` and the retention the uploader applies after each upload.

    Args:
        remote: the remote root (``s3://bucket/prefix`` or any path/URI :func:`open_storage` takes), or a Storage.
        local_dir: the fast local directory.
        retention: the policy the uploader applies to the remote after each upload (None: keep everything).
        events: event log for ``upload``/``download`` events (default: ``local_dir/events.jsonl``).
        create: create the local directory and check the remote now.
        upload_options: background retries, backlog bound and lag warning (default:
            :meth:`UploadOptions.from_env`, the ``RESUMEKIT_UPLOAD_*`` variables).

    Example::

        tier = TieredStorage("s3://bucket/run", "/fast/ckpt")
        mgr = CheckpointManager("s3://bucket/run", local_tier="/fast/ckpt")   # what the manager does for you
    """

    is_local = True

    def __init__(
        self,
        remote: Any,
        local_dir: str,
        *,
        retention: Retention | None = None,
        events: EventLog | None = None,
        create: bool = True,
        upload_options: UploadOptions | None = None,
    ):
        from . import open_storage

        self.local = LocalStorage(local_dir, create=create)
        self.remote: Storage = open_storage(remote, create=create)
        if self.remote.is_local and self.remote.local_path() == self.local.root:
            raise ConfigError(
                f"the local tier {self.local.root} is the remote root itself; choose a different "
                "local_tier (a fast local disk) or drop it"
            )
        self.uri = self.local.uri
        self.retention = retention
        self.events = events if events is not None else EventLog.for_dir(self.local.root, "library")
        self._up = Uploader(self, upload_options)
        #: the local tier is on tmpfs/ramfs: restores run at memory speed, and its files count against RAM (see
        #: :mod:`resumekit.storage.memtier` for the space rule the supervisor checks before each start)
        self.in_memory = in_memory(self.local.root)
        if self.in_memory:
            log.info(
                "local tier %s is in memory (tmpfs): it holds keep_last + 1 checkpoints of RAM; the durable copy is %s",
                self.local.root,
                self.remote.uri,
            )

    def space_verdict(self, checkpoint_bytes: int, present: bool = True) -> tuple[str, str] | None:
        """Whether the local tier has room for its retention's checkpoints of ``checkpoint_bytes`` each plus the one
        being written (:func:`resumekit.storage.memtier.tier_space_verdict`): ``(level, one line)`` or None.

        Args:
            present: one such checkpoint is in the tier already (counted in its free space).
        """
        r = self.retention
        active = r is not None and bool(getattr(r, "active", False))
        keep = (getattr(r, "keep_last", None) or 0) + (getattr(r, "keep_best", None) or 0) if active else 0
        return tier_space_verdict(
            self.local.root,
            free=self.local.free_bytes(),
            checkpoint_bytes=checkpoint_bytes,
            keep=keep or None,
            memory=self.in_memory,
            available=mem_available() if self.in_memory else None,
            present_bytes=checkpoint_bytes if present else 0,
            unbounded=not active or bool(getattr(r, "keep_every", None)),
        )

    # -- Storage: the local tier ----------------------------------------------------------------------------------

    def join(self, rel: str) -> str:
        return self.local.join(rel)

    def local_path(self, rel: str = "") -> str | None:
        return self.local.local_path(rel)

    def listdir(self, rel: str = "") -> list[Entry]:
        return self.local.listdir(rel)

    def exists(self, rel: str) -> bool:
        return self.local.exists(rel)

    def size(self, rel: str) -> int:
        return self.local.size(rel)

    def mtime(self, rel: str) -> float | None:
        return self.local.mtime(rel)

    def open_read(self, rel: str) -> BinaryIO:
        return self.local.open_read(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self.local.read_bytes(rel)

    def free_bytes(self) -> int | None:
        return self.local.free_bytes()

    def begin(self, name: str) -> Transaction:
        return _TieredTransaction(self, self.local.begin(name))

    def remove_tree(self, rel: str) -> None:
        """Delete a local step; deferred while the step still has to reach the remote (its upload source)."""
        if self._up.defer_delete(rel):
            return
        self.local.remove_tree(rel)

    def rename(self, src: str, dst: str) -> None:
        self.local.rename(src, dst)

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        self.local.write_bytes_atomic(rel, data)

    # -- the remote tier -------------------------------------------------------------------------------------------

    def enqueue_upload(self, name: str) -> None:
        """Queue a locally committed step for upload (starts the uploader thread when needed)."""
        self._up.enqueue(name)

    @property
    def uploading(self) -> list[str]:
        """Steps queued or in flight (not yet on the remote), oldest first."""
        return self._up.outstanding()

    def save_allowed(self, step: int) -> bool:
        """Whether a policy save of ``step`` may go ahead: False while the upload backlog is full (too many steps
        wait for the remote, or local space would not hold another one). The manager then skips the save (a
        ``save_deferred`` event says why) and training goes on; explicit and preemption saves are never held."""
        return self._up.save_allowed(step)

    def lag(self) -> dict:
        """The remote's lag now: ``lag_steps``, ``lag_s``, ``backlog`` (steps waiting), ``remote_newest``."""
        return self._up.lag_fields()

    def upload_step(self, name: str) -> Manifest:
        """Copy a committed local step to the remote (verified while it streams, manifest last); the uploader's
        one transfer."""
        return copy_step(self.local, self.remote, name, desc=f"upload {name}")

    def download(self, name: str) -> Manifest:
        """Copy a remote step into the local tier (parallel ranged reads, verified, tmp dir + rename).

        Raises:
            CorruptCheckpointError: the remote copy is incomplete or damaged; the local tier is unchanged.
        """
        t0 = time.perf_counter()
        man = copy_step(self.remote, self.local, name, desc=f"download {name}")
        secs = time.perf_counter() - t0
        self.events.emit(
            "download",
            step=man.step,
            path=self.remote.join(name),
            to=self.local.join(name),
            bytes=man.total_bytes,
            seconds=secs,
            mb_s=_mb_s(man.total_bytes, secs),
        )
        log.info(
            "downloaded %s to %s (%.1f MB in %.2fs)",
            self.remote.join(name),
            self.local.join(name),
            man.total_bytes / 1e6,
            secs,
        )
        return man

    def resync(self, exclude: Iterable[str] = ()) -> list[str]:
        """Queue every valid local step newer than the remote's newest valid one (after a crash mid-upload).

        Args:
            exclude: names not to queue (e.g. local steps a restore found damaged).

        Returns:
            The names queued.
        """
        exclude = set(exclude)
        remote = newest_valid(self.remote)
        local_valid = {
            step: name
            for step, name in step_dirs(self.local)
            if name not in exclude and valid_manifest(self.local, name) is not None
        }
        names = [local_valid[s] for s in steps_to_resync(local_valid, remote[0] if remote else None)]
        self._up.set_remote_newest(remote[0] if remote else None)
        for n in names:
            self.enqueue_upload(n)
        if names:
            self.events.emit("upload_resync", steps=[parse_step_dirname(n) for n in names], **self.lag())
            log.info(
                "re-uploading %d local checkpoint(s) newer than the remote's newest: %s", len(names), ", ".join(names)
            )
        return names

    def wait_uploads(self) -> None:
        """Block until every queued step is on the remote; tries at once (not after the retry delay) and raises
        :class:`~resumekit.errors.CheckpointWriteError` if that try fails, so it ends within one request's retry
        budget against an unreachable store. The local checkpoints are kept either way."""
        self._up.wait()

    def raise_pending(self) -> None:
        """Nothing to raise at a save: upload failures never stop training (they are retried in the background,
        logged, and raised by :meth:`wait_uploads` and :meth:`close`). Kept for the manager's calls."""

    def close(self) -> None:
        """Finish the uploads, stop the uploader thread and raise its error if any."""
        try:
            self.wait_uploads()
        finally:
            self._up.stop()


def _mb_s(n: int, secs: float) -> float:
    return round(n / 1e6 / secs, 3) if secs > 0 else 0.0


__all__ = [
    "TieredStorage",
    "UploadOptions",
    "upload_status",
    "Retention",
    "copy_step",
    "plan_uploads",
    "steps_to_resync",
    "newest_valid",
    "step_dirs",
    "valid_manifest",
    "progress_bar",
    "read_manifest_bytes",
    "PROGRESS_MIN_BYTES",
]
