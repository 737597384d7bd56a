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
* Upload errors are kept and raised at the next ``save``/``wait``/``close`` (through :meth:`raise_pending`), never
  dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, BinaryIO, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple

from ..errors import CheckpointWriteError, ConfigError, CorruptCheckpointError
from ..events import EventLog
from ..format import MANIFEST, Manifest, parse_step_dirname, step_dirname
from ..verify import check_checkpoint, read_manifest
from .base import Entry, Storage, Transaction
from .local import LocalStorage

# copy_step is looked up in this module by the uploader and download (tests slow it down here); the supervisor
# and the benchmarks import it from here too.
from .transfer import PROGRESS_MIN_BYTES, copy_step, progress_bar, read_manifest_bytes

log = logging.getLogger("resumekit")


class Retention(Protocol):
    """What the uploader needs of a retention policy (:class:`resumekit.policy.RetentionPolicy` is one).

    Declared here so that storage imports nothing above it; the manager hands its policy in.
    """

    @property
    def active(self) -> bool:
        """False when no rule is set: every step is kept and nothing is planned."""

    def to_delete(
        self,
        valid_steps: Sequence[int],
        metrics: Optional[Mapping[int, Mapping[str, Any]]] = None,
        protected: Iterable[int] = (),
    ) -> List[int]:
        """The valid steps to delete, oldest first; never the newest nor a ``protected`` one."""


# ------------------------------------------------------------------------------------------------------------------
# Pure decisions
# ------------------------------------------------------------------------------------------------------------------


def plan_uploads(
    pending: Sequence[int],
    remote_valid: Iterable[int],
    policy: Optional[Retention],
    metrics: Optional[Mapping[int, Mapping[str, Any]]] = None,
) -> Tuple[List[int], List[int]]:
    """Split the queued steps into (to upload, to skip), both oldest first.

    A queued step that the remote's retention would delete as soon as the newer queued steps land is skipped:
    uploading it would only delay the newer ones. The newest queued step is always uploaded, and without an
    active retention policy every queued step is.
    """
    pending = sorted(set(pending))
    if not pending or policy is None or not getattr(policy, "active", False):
        return pending, []
    doomed = set(policy.to_delete(sorted(set(remote_valid) | set(pending)), dict(metrics or {})))
    doomed.discard(pending[-1])
    return [s for s in pending if s not in doomed], [s for s in pending if s in doomed]


def steps_to_resync(local_valid: Iterable[int], remote_newest: Optional[int]) -> List[int]:
    """Local steps the remote is missing after a crash: every valid local step newer than the remote newest."""
    floor = -1 if remote_newest is None else remote_newest
    return sorted(s for s in set(local_valid) if s > floor)


# ------------------------------------------------------------------------------------------------------------------
# The native steps of one tier
# ------------------------------------------------------------------------------------------------------------------


def step_dirs(storage: Storage) -> List[Tuple[int, str]]:
    """(step, name) of every ``step_N`` directory at the root of ``storage``, in listing order."""
    return [(s, e.name) for e in storage.listdir("") if e.is_dir and (s := parse_step_dirname(e.name)) is not None]


def valid_manifest(storage: Storage, name: str, full: bool = False) -> Optional[Manifest]:
    """The manifest of checkpoint ``name`` when it verifies (sizes only unless ``full``), else None.

    An unreadable checkpoint counts as invalid, as in discovery: the tiers only need to know which steps count.
    """
    try:
        return check_checkpoint(storage, name, full=full)
    except (CorruptCheckpointError, OSError):
        return None


def newest_valid(storage: Storage, full: bool = False) -> Optional[Tuple[int, str]]:
    """(step, name) of the newest valid native checkpoint (sizes only unless ``full``), or None."""
    # Newest first, stopping at the first valid one: older steps are never read.
    for step, name in sorted(step_dirs(storage), reverse=True):
        if valid_manifest(storage, name, full=full) is not None:
            return step, name
    return None


# ------------------------------------------------------------------------------------------------------------------
# The tiered storage
# ------------------------------------------------------------------------------------------------------------------


class _TieredTransaction(Transaction):
    def __init__(self, tier: "TieredStorage", inner: Transaction):
        self.tier = tier
        self.inner = inner
        self.name = inner.name

    def open_write(self, rel: str) -> BinaryIO:
        return self.inner.open_write(rel)

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
        retention: Optional[Retention] = None,
        events: Optional[EventLog] = None,
        create: bool = True,
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
        self._up = _Uploader(self)

    # -- Storage: the local tier ----------------------------------------------------------------------------------

    def join(self, rel: str) -> str:
        return self.local.join(rel)

    def local_path(self, rel: str = "") -> Optional[str]:
        return self.local.local_path(rel)

    def listdir(self, rel: str = "") -> List[Entry]:
        return self.local.listdir(rel)

    def exists(self, rel: str) -> bool:
        return self.local.exists(rel)

    def size(self, rel: str) -> int:
        return self.local.size(rel)

    def mtime(self, rel: str) -> Optional[float]:
        return self.local.mtime(rel)

    def open_read(self, rel: str) -> BinaryIO:
        return self.local.open_read(rel)

    def read_bytes(self, rel: str) -> bytes:
        return self.local.read_bytes(rel)

    def free_bytes(self) -> Optional[int]:
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
    def uploading(self) -> List[str]:
        """Steps queued or in flight, oldest first."""
        return self._up.outstanding()

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

    def resync(self, exclude: Iterable[str] = ()) -> List[str]:
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
        for n in names:
            self.enqueue_upload(n)
        if names:
            self.events.emit(
                "upload_resync",
                steps=[parse_step_dirname(n) for n in names],
                remote_newest=remote[0] if remote else None,
            )
            log.info(
                "re-uploading %d local checkpoint(s) newer than the remote's newest: %s", len(names), ", ".join(names)
            )
        return names

    def wait_uploads(self) -> None:
        """Block until every queued upload finished; raises the first upload error (once)."""
        self._up.wait()
        self.raise_pending()

    def raise_pending(self) -> None:
        """Raise a background upload's error, if one happened since the last call."""
        self._up.raise_pending()

    def close(self) -> None:
        """Finish the uploads, stop the uploader thread and raise its error if any."""
        try:
            self.wait_uploads()
        finally:
            self._up.stop()


def _mb_s(n: int, secs: float) -> float:
    return round(n / 1e6 / secs, 3) if secs > 0 else 0.0


class _Uploader:
    """One background thread uploading queued steps one at a time, oldest first (parts of a file in parallel)."""

    def __init__(self, tier: TieredStorage):
        self.tier = tier
        self._cv = threading.Condition()
        self._queue: List[str] = []
        self._in_flight: Optional[str] = None
        self._failed: List[str] = []
        self._deferred: set = set()
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._remote_valid: Optional[Dict[int, Dict[str, Any]]] = None  # step -> metadata, this process's view

    # -- called from the training side -----------------------------------------------------------------------------

    def enqueue(self, name: str) -> None:
        with self._cv:
            # Steps whose upload failed get another try with every new one (they are still protected locally).
            for n in self._failed + [name]:
                if n not in self._queue and n != self._in_flight:
                    self._queue.append(n)
            self._failed = []
            self._stopping = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="resumekit-upload", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def outstanding(self) -> List[str]:
        with self._cv:
            return ([self._in_flight] if self._in_flight else []) + list(self._queue)

    def _protected(self, name: str) -> bool:
        return name == self._in_flight or name in self._queue or name in self._failed

    def defer_delete(self, name: str) -> bool:
        with self._cv:
            if self._protected(name):
                self._deferred.add(name)
                return True
            return False

    def wait(self) -> None:
        with self._cv:
            while self._queue or self._in_flight:
                self._cv.wait()

    def raise_pending(self) -> None:
        with self._cv:
            err, self._error = self._error, None
        if err is not None:
            raise err

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    # -- the thread ------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if not self._queue:
                    return
                pending = list(self._queue)
            try:
                name, skip = self._next(pending)
            except BaseException as e:  # noqa: BLE001 - e.g. the remote is unreachable: fail this round
                self._fail(pending, e)
                continue
            for n in skip:
                self._resolve(n, uploaded=False)
            if name is None:
                continue
            with self._cv:
                if name in self._queue:
                    self._queue.remove(name)
                self._in_flight = name
            try:
                self._upload(name)
            except BaseException as e:  # noqa: BLE001 - kept for raise_pending, never dropped
                self._fail([name], e)
            else:
                self._resolve(name, uploaded=True)

    def _next(self, pending: List[str]) -> Tuple[Optional[str], List[str]]:
        tier = self.tier
        by_step = {parse_step_dirname(n): n for n in pending}
        by_step.pop(None, None)
        policy = tier.retention
        if policy is not None and getattr(policy, "active", False):
            remote = self._remote_state()
            metrics = {s: m for s, m in remote.items()}
            for s, n in by_step.items():
                try:
                    metrics[s] = read_manifest(tier.local, n).metadata
                except (OSError, CorruptCheckpointError):
                    metrics[s] = {}
            up, skip = plan_uploads(list(by_step), remote, policy, metrics)
        else:
            up, skip = sorted(by_step), []
        skipped = [by_step[s] for s in skip]
        for n in skipped:
            tier.events.emit(
                "upload_skipped",
                step=parse_step_dirname(n),
                path=tier.local.join(n),
                reason="superseded: remote retention would delete it once newer steps land",
            )
        return (by_step[up[0]] if up else None), skipped

    def _remote_state(self) -> Dict[int, Dict[str, Any]]:
        if self._remote_valid is None:
            remote = self.tier.remote
            state: Dict[int, Dict[str, Any]] = {}
            for step, name in step_dirs(remote):
                man = valid_manifest(remote, name)
                if man is not None:
                    state[step] = dict(man.metadata)
            self._remote_valid = state
        return self._remote_valid

    def _upload(self, name: str) -> None:
        tier = self.tier
        step = parse_step_dirname(name)
        raw, man = read_manifest_bytes(tier.local, name)
        if self._already_there(name, raw):
            tier.events.emit("upload_skipped", step=step, path=tier.remote.join(name), reason="already uploaded")
        else:
            t0 = time.perf_counter()
            try:
                man = copy_step(tier.local, tier.remote, name, desc=f"upload {name}")
            except BaseException as e:
                raise CheckpointWriteError(
                    f"uploading {tier.local.join(name)} to {tier.remote.join(name)} failed: {e}. The local "
                    "checkpoint is kept; the upload is retried with the next save and at the next start"
                ) from e
            secs = time.perf_counter() - t0
            tier.events.emit(
                "upload",
                step=step,
                path=tier.remote.join(name),
                bytes=man.total_bytes,
                seconds=secs,
                mb_s=_mb_s(man.total_bytes, secs),
            )
            log.info("uploaded %s (%.1f MB in %.2fs)", tier.remote.join(name), man.total_bytes / 1e6, secs)
        if self._remote_valid is not None and step is not None:
            self._remote_valid[step] = dict(man.metadata)
        self._remote_retention(protect={step} if step is not None else set())

    def _already_there(self, name: str, raw: bytes) -> bool:
        try:
            return self.tier.remote.read_bytes(f"{name}/{MANIFEST}") == raw and self._remote_sizes_ok(name)
        except FileNotFoundError:
            return False

    def _remote_sizes_ok(self, name: str) -> bool:
        return valid_manifest(self.tier.remote, name) is not None

    def _remote_retention(self, protect: set) -> None:
        tier = self.tier
        policy = tier.retention
        if policy is None or not getattr(policy, "active", False):
            return
        remote = self._remote_state()
        for s in policy.to_delete(sorted(remote), remote, protected=protect):
            name = step_dirname(s)
            try:
                tier.remote.remove_tree(name)
            except OSError as e:
                log.warning("retention could not remove %s: %s", tier.remote.join(name), e)
                continue
            remote.pop(s, None)
            tier.events.emit("retention_delete", step=s, path=tier.remote.join(name), tier="remote")

    def _resolve(self, name: str, uploaded: bool) -> None:
        """The step no longer needs its local copy for the remote: run a deferred local deletion."""
        with self._cv:
            if name in self._queue:
                self._queue.remove(name)
            if self._in_flight == name:
                self._in_flight = None
            delete = name in self._deferred and not self._protected(name)
            if delete:
                self._deferred.discard(name)
        if delete:
            try:
                self.tier.local.remove_tree(name)
                self.tier.events.emit(
                    "retention_delete",
                    step=parse_step_dirname(name),
                    path=self.tier.local.join(name),
                    tier="local",
                    deferred=True,
                )
            except OSError as e:
                log.warning("retention could not remove %s: %s", self.tier.local.join(name), e)
        with self._cv:
            self._cv.notify_all()

    def _fail(self, names: List[str], e: BaseException) -> None:
        log.warning("upload failed: %s", e)
        self.tier.events.emit("upload_failed", steps=[parse_step_dirname(n) for n in names], error=str(e))
        with self._cv:
            for n in names:
                if n in self._queue:
                    self._queue.remove(n)
                if self._in_flight == n:
                    self._in_flight = None
                if n not in self._failed:
                    self._failed.append(n)
            if self._error is None:
                self._error = e
            # The remote's state is unknown after a failure: read it again next time.
            self._remote_valid = None
            self._cv.notify_all()


__all__ = [
    "TieredStorage",
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
