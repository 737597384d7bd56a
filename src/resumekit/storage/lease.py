"""The writer lease of a checkpoint root: one writer per run directory.

Two jobs writing one directory (a resubmitted job while the old one still runs is the usual way) would remove each
other's in-progress saves and replace each other's steps. The writer (a :class:`~resumekit.manager.CheckpointManager`,
``resumekit gc``) therefore holds a lease for as long as it may write; readers (``ls``, ``latest``, ``verify``,
``read_checkpoint``, an evaluator) need none and never delete anything.

* **Local and mounted directories**: ``fcntl.flock`` on ``<root>/.resumekit-lease``, which records the holder (pid,
  host, process start time, since when, what). The kernel drops the lock when the holder dies, even by SIGKILL; on
  NFS the client maps it onto NFS locks. A lock still held in the name of a process that is gone from this host (an
  orphaned child inherited the descriptor) is taken over; so is a lease file left where ``flock`` is not supported.
* **Object stores**: the object ``<prefix>/.resumekit-lease``, created with a conditional PUT (``If-None-Match: *``)
  and renewed (``If-Match`` its ETag) every third of its lifetime by a background thread. A lease not renewed for
  ``RESUMEKIT_LEASE_TTL`` seconds (default 120) has expired and may be taken; so may one whose holder is gone from
  this host, or one held on another host by the same job (``RESUMEKIT_JOB_ID`` or torchrun's ``--rdzv-id``) that
  then misses a renewal while this process watches it: a multi-node job's restarted rank 0 may run on another host
  than the one it replaces. Stores without conditional writes get the same protocol best effort (read, write, read
  back).

A second writer fails at construction with :class:`~resumekit.errors.LeaseHeldError`, one line naming the holder.
``takeover=True`` (``--force`` on the command line) takes a lease whose holder is known to be dead on another host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import LeaseHeldError, StorageError
from ..format import LEASE_FILE
from .base import Storage

log = logging.getLogger("resumekit")

ENV_LEASE_TTL = "RESUMEKIT_LEASE_TTL"
ENV_TAKEOVER = "RESUMEKIT_TAKEOVER"
ENV_JOB_ID = "RESUMEKIT_JOB_ID"
DEFAULT_TTL = 120.0
_MAX_RECORD = 4096


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """A process's state letter and start time in clock ticks since boot (Linux); None when unknown."""
    return _proc_stat_path(f"/proc/{pid}/stat")


def _proc_stat_path(path: str) -> tuple[str, int] | None:
    try:
        with open(path, "rb") as f:
            fields = f.read(4096).rsplit(b")", 1)[1].split()
        return fields[0].decode("ascii", "replace"), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _proc_start(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), which tells a reused pid from the original."""
    st = _proc_stat(pid)
    return None if st is None else st[1]


def job_identity(environ: Mapping[str, str] | None = None) -> str | None:
    """The job this process belongs to across its restarts, when the launcher names it: ``RESUMEKIT_JOB_ID``, else
    torchrun's ``--rdzv-id`` (``TORCHELASTIC_RUN_ID``; its default ``none`` names nothing). Every start of one
    multi-node job carries the same value on every node; giving each job its own is the user's part (two jobs
    sharing one could watch each other's lease, see :func:`missed_renewal`, but a live holder renews)."""
    env = os.environ if environ is None else environ
    for key in (ENV_JOB_ID, "TORCHELASTIC_RUN_ID"):
        value = env.get(key, "").strip()
        if value and value.lower() != "none":
            return value[:200]
    return None


def holder_record(purpose: str, ttl: float | None = None) -> dict[str, Any]:
    """What a lease says about its holder: this process, this host, now."""
    now = time.time()
    rec: dict[str, Any] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "proc_start": _proc_start(os.getpid()),
        "since": round(now, 3),
        "purpose": purpose,
        "token": uuid.uuid4().hex,
    }
    if ttl is not None:
        rec["expires"] = round(now + ttl, 3)
        rec["ttl"] = ttl  # how often it is renewed (ttl / 3): what a later start of the same job watches for
    job = job_identity()
    if job is not None:
        rec["job"] = job
    return rec


def holder_gone(rec: dict[str, Any]) -> bool:
    """Whether a lease's holder is known to be dead: it ran on this host and its process is gone (or its pid now
    belongs to a process started later, or it is a zombie whose threads have all exited). A holder on another host
    is never known to be dead here."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return False
    pid = rec["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    st = _proc_stat(pid)
    if st is None:
        return False
    state, started = st
    start = rec.get("proc_start")
    if isinstance(start, int) and started != start:
        return True  # the pid now names a later process
    # A zombie (killed, not yet reaped by its parent) answers kill(pid, 0) but never writes again, once every thread
    # has exited: a process shows as a zombie as soon as its main thread has, while the others may still run.
    return state in ("Z", "X") and _threads_exited(pid)


def _threads_exited(pid: int) -> bool:
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tids[:4096]:
        st = _proc_stat_path(f"/proc/{pid}/task/{tid}/stat")
        if st is not None and st[0] not in ("Z", "X"):
            return False
    return True


def same_job_elsewhere(rec: dict[str, Any]) -> bool:
    """Whether a lease is held by a writer of this same job (see :func:`job_identity`) on another host: a
    candidate for :func:`missed_renewal`, never proof that the holder is dead. On this host the pid tells
    (:func:`holder_gone`); only a training job's manager is eligible (``resumekit gc`` run inside the job's
    environment must not take a live trainer's lease)."""
    job = job_identity()
    return (
        job is not None
        and rec.get("job") == job
        and rec.get("host") != socket.gethostname()
        and rec.get("purpose") == "CheckpointManager"
    )


def missed_renewal(read: Callable[[str], Any], etag: str | None, rec: dict[str, Any]) -> tuple[bool, Any]:
    """Watch a lease object for one renewal period of its holder (its ``ttl`` / 3, plus slack for a slow request):
    a live holder rewrites it (new ETag), a dead one does not. Evidence from this host's own clock only, so the
    hosts' clocks need not agree. Bounded: at most ``ttl / 3 + min(10, max(1, ttl / 12))`` seconds.

    Why: a multi-node job restarts as a whole, and its new rank 0 may run on another host than the old one; only
    that host could tell the old holder dead by its pid, so without this the restart would wait for the lease to
    expire (``RESUMEKIT_LEASE_TTL``, 120 s) and, failing start after start meanwhile, exhaust its supervisor's
    patience.

    Returns:
        (True, the last ``read`` result: None if the lease was released) when no renewal came; (False, the
        renewed lease) when one did.
    """
    ttl = rec.get("ttl")
    ttl = float(ttl) if isinstance(ttl, (int, float)) and 0 < ttl <= 86400 else _ttl_from_env()
    window = ttl / 3 + min(10.0, max(1.0, ttl / 12))
    log.warning(
        "the writer lease is held by %s of this same job; watching it for up to %.0f s for a renewal",
        describe_holder(rec),
        window,
    )
    deadline = time.monotonic() + window
    got: Any = None
    while True:
        got = read(LEASE_FILE)
        if got is None:
            return True, None  # released meanwhile: free for the conditional create
        if got[1] != etag:
            return False, got  # renewed (or taken by someone else): not ours to take
        if time.monotonic() >= deadline:
            return True, got
        time.sleep(min(1.0, window / 10))


def _ttl_from_env() -> float:
    return float(os.environ.get(ENV_LEASE_TTL) or DEFAULT_TTL)


def describe_holder(rec: dict[str, Any]) -> str:
    """``pid 123 on host-a since 2024-05-01 10:00:00 (CheckpointManager)``."""
    since = rec.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    what = f" ({rec['purpose']})" if isinstance(rec.get("purpose"), str) else ""
    return f"pid {rec.get('pid', '?')} on {rec.get('host', '?')} since {when}{what}"


def held_error(root: str, rec: dict[str, Any], *, same_process: bool = False) -> LeaseHeldError:
    """The one-line error of a second writer."""
    if same_process:
        fix = "this process already writes it through another CheckpointManager: close() that one first"
    else:
        fix = (
            "stop that job first, or pass takeover=True (resumekit --force) if it is dead; readers (ls, latest, "
            "verify, read_checkpoint) need no lease"
        )
    return LeaseHeldError(root, rec, f"{root} is in use by another writer: {describe_holder(rec)}; {fix}")


def _parse(data: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(data[:_MAX_RECORD])
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return rec if isinstance(rec, dict) else {}


class WriterLease:
    """A held lease. :meth:`check` raises once it was lost (taken over); :meth:`release` gives it up (idempotent,
    a no-op in a forked child, which must not release its parent's lease)."""

    root: str = ""
    record: dict[str, Any]

    def __init__(self) -> None:
        self.record = {}
        self._owner = os.getpid()
        self.released = False
        self.lost_reason = ""
        #: called before a newer writer of this same process takes the lease over (the manager drains its save)
        self.on_takeover: Callable[[], None] | None = None

    def check(self) -> None:
        """Raise :class:`LeaseHeldError` when another writer took the lease over since it was acquired."""
        if self.lost_reason:
            raise LeaseHeldError(self.root, {}, f"{self.root}: this writer lost its lease: {self.lost_reason}")

    def release(self) -> None:
        if self.released or os.getpid() != self._owner:
            return
        self.released = True
        _HELD.pop(self.key, None)
        self._release()

    @property
    def key(self) -> str:
        return self.root

    def _release(self) -> None:
        raise NotImplementedError


#: leases this process holds, by root: a second writer in the same process is told so
_HELD: dict[str, WriterLease] = {}
_HELD_LOCK = threading.Lock()


class LocalLease(WriterLease):
    """``flock`` on ``<root>/.resumekit-lease`` (see the module docstring)."""

    def __init__(self, root: str, *, takeover: bool = False, purpose: str = "CheckpointManager"):
        super().__init__()
        self.root = root
        self.path = os.path.join(root, LEASE_FILE)
        self.flocked = True
        self._fd: int | None = None
        for _ in range(20):
            if self._try_acquire(takeover, purpose):
                return
        raise StorageError(f"cannot acquire the writer lease {self.path}: it keeps changing under us")

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        flags |= getattr(os, "O_NONBLOCK", 0)  # a FIFO planted under the lease's name must not hang us
        fd = os.open(self.path, flags, 0o644)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise StorageError(f"{self.path} is not a regular file; remove it (it is resumekit's writer lease)")
        return fd

    def _try_acquire(self, takeover: bool, purpose: str) -> bool:
        fd = self._open()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    rec = _parse(os.pread(fd, _MAX_RECORD, 0))
                    if takeover or holder_gone(rec):
                        # The lock outlives its holder in an orphaned child, or the user says the holder is dead:
                        # a new lease file; the old lock stays on the unlinked one, where it blocks no one.
                        log.warning("taking over the writer lease of %s from %s", self.root, describe_holder(rec))
                        _unlink_if_same(self.path, fd)
                        return False
                    raise held_error(self.root, rec, same_process=rec.get("pid") == os.getpid()) from None
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
                    raise
                # No flock on this file system: the record alone says who holds it (a dead holder's is stale).
                self.flocked = False
                rec = _parse(os.pread(fd, _MAX_RECORD, 0))
                if rec.get("token") and not (takeover or holder_gone(rec)):
                    raise held_error(self.root, rec, same_process=rec.get("pid") == os.getpid()) from None
            if not _same_file(self.path, fd):
                return False  # removed or replaced between our open and our lock: try the new one
            self.record = holder_record(purpose)
            data = json.dumps(self.record).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    @classmethod
    def adopt(cls, old: LocalLease, purpose: str) -> LocalLease:
        """A new lease for this process that takes ``old``'s lock over without releasing it in between."""
        new = cls.__new__(cls)
        WriterLease.__init__(new)
        new.root, new.path, new.flocked = old.root, old.path, old.flocked
        new._fd, old._fd = old._fd, None
        old.released = True
        new.record = holder_record(purpose)
        if new._fd is not None:
            os.ftruncate(new._fd, 0)
            os.pwrite(new._fd, json.dumps(new.record).encode(), 0)
        return new

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            # Unlink while still holding the lock: whoever opened the old file re-checks and retries on a new one.
            rec = _parse(os.pread(fd, _MAX_RECORD, 0))
            if rec.get("token") == self.record.get("token"):
                _unlink_if_same(self.path, fd)
            if self.flocked:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: forked children may hold copies of the descriptor
        except OSError as e:
            log.warning("releasing the writer lease %s: %s", self.path, e)
        finally:
            os.close(fd)


def _same_file(path: str, fd: int) -> bool:
    try:
        a, b = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _unlink_if_same(path: str, fd: int) -> None:
    if _same_file(path, fd):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class ObjectLease(WriterLease):
    """A lease object on an object store, renewed in the background (see the module docstring).

    Args:
        storage: the remote root; it must offer ``put_lease(rel, data, if_match=None)`` (create with
            ``If-None-Match: *`` when ``if_match`` is None, else replace if the ETag matches; returns the new ETag or
            None when the condition failed) and ``read_lease(rel)`` (``(bytes, etag)`` or None).
        ttl: seconds a lease lives without renewal (default ``RESUMEKIT_LEASE_TTL`` or 120).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        takeover: bool = False,
        purpose: str = "CheckpointManager",
        ttl: float | None = None,
    ):
        super().__init__()
        self.storage = storage
        self.root = storage.uri
        self.ttl = ttl if ttl is not None else _ttl_from_env()
        self.record = holder_record(purpose, self.ttl)
        put: Callable[..., str | None] = storage.put_lease  # type: ignore[attr-defined]
        read: Callable[[str], Any] = storage.read_lease  # type: ignore[attr-defined]
        # Read first: a store that ignores If-None-Match would otherwise let us overwrite a live holder's lease.
        got = read(LEASE_FILE)
        if got is not None:
            rec = _parse(got[0])
            expired = isinstance(rec.get("expires"), (int, float)) and rec["expires"] < time.time()
            free = takeover or expired or holder_gone(rec)
            if rec and not free and same_job_elsewhere(rec):
                free, again = missed_renewal(read, got[1], rec)
                if not free:
                    raise held_error(self.root, _parse(again[0]))
                got = again
            if rec and not free:
                raise held_error(self.root, rec, same_process=rec.get("pid") == os.getpid())
            log.warning("taking over the writer lease of %s from %s", self.root, describe_holder(rec))
        etag = put(LEASE_FILE, self._body(), if_match=got[1] if got is not None else None)
        back = read(LEASE_FILE)
        rec = _parse(back[0]) if back is not None else {}
        if rec.get("token") != self.record["token"]:
            # Another writer won the race (or a retried request hid our own success: then the token is ours).
            raise held_error(self.root, rec)
        self._etag = etag if etag is not None else (back[1] if back is not None else None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="resumekit-lease", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps(self.record).encode()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            self.record["expires"] = round(time.time() + self.ttl, 3)
            try:
                etag = self.storage.put_lease(LEASE_FILE, self._body(), if_match=self._etag)  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - a network outage: try again at the next renewal
                log.warning("renewing the writer lease of %s failed: %s", self.root, e)
                continue
            if etag is None:
                got = self.storage.read_lease(LEASE_FILE)  # type: ignore[attr-defined]
                rec = _parse(got[0]) if got else {}
                self.lost_reason = f"taken over by {describe_holder(rec)}" if rec else "its lease object was removed"
                log.error("%s: %s", self.root, self.lost_reason)
                return
            self._etag = etag

    def _release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost_reason:
            return
        try:
            self.storage.delete_lease(LEASE_FILE, self._etag)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - it expires by itself
            log.warning("releasing the writer lease of %s failed (it expires in %.0f s): %s", self.root, self.ttl, e)


def acquire_lease(storage: Storage, *, takeover: bool = False, purpose: str = "CheckpointManager") -> WriterLease:
    """Take the writer lease of ``storage``'s root (local: flock; object store: a lease object).

    Raises:
        LeaseHeldError: another live writer holds it (one line naming the holder).
    """
    local = storage.local_path() if storage.is_local else None
    key = local or storage.uri
    with _HELD_LOCK:
        mine = _HELD.get(key)
        lease: WriterLease
        if mine is not None and not mine.released and mine._owner == os.getpid():
            # A second writer in this process (a notebook cell run again, a test): the newer one takes over and
            # the older one is fenced off (its next save raises), after its save in flight has finished.
            log.warning("%s: a new writer in this process takes over from the one opened before", key)
            if mine.on_takeover is not None:
                mine.on_takeover()
            mine.lost_reason = "a newer writer in this process took its directory over"
            if isinstance(mine, LocalLease):
                lease = LocalLease.adopt(mine, purpose)
                _HELD[key] = lease
                return lease
            mine.release()
            mine.lost_reason = "a newer writer in this process took its directory over"
        if local is not None:
            lease = LocalLease(local, takeover=takeover, purpose=purpose)
        elif hasattr(storage, "put_lease"):
            lease = ObjectLease(storage, takeover=takeover, purpose=purpose)
        else:
            lease = NoLease(storage.uri)
        _HELD[key] = lease
        return lease


def acquire_leases(
    required: Sequence[Storage],
    optional: Sequence[Storage] = (),
    *,
    takeover: bool = False,
) -> list[WriterLease]:
    """The leases of several roots (a tiered run's local and remote tier), all or none.

    Args:
        required: roots whose lease must be taken (any failure is raised).
        optional: roots whose lease is taken when they can be reached: an unreachable store is logged and skipped
            (a held lease is still an error).

    Raises:
        LeaseHeldError: a live writer holds one of them; the leases taken so far are released.
    """
    leases: list[WriterLease] = []
    try:
        for root in list(required) + list(optional):
            try:
                leases.append(acquire_lease(root, takeover=takeover))
            except (OSError, ConnectionError) as e:
                # A read-only root (a restore-only job on a read-only mount) cannot be written anyway: no lease,
                # nothing removed, and a save fails with its own clear error.
                readonly = getattr(e, "errno", None) in (errno.EROFS, errno.EACCES, errno.EPERM)
                if any(root is r for r in required) and not readonly:
                    raise
                log.warning("could not take the writer lease of %s (%s); continuing without it", root.uri, e)
    except BaseException:
        for lease in leases:
            lease.release()
        raise
    return leases


class NoLease(WriterLease):
    """A backend without leases (none of resumekit's own)."""

    def __init__(self, root: str):
        super().__init__()
        self.root = root

    def _release(self) -> None:
        pass


def takeover_from_env() -> bool:
    """``RESUMEKIT_TAKEOVER=1`` (set by ``resumekit run --force`` for its first start)."""
    return os.environ.get(ENV_TAKEOVER, "").strip().lower() in ("1", "true", "yes")


__all__ = [
    "WriterLease",
    "LocalLease",
    "ObjectLease",
    "NoLease",
    "acquire_lease",
    "acquire_leases",
    "holder_gone",
    "job_identity",
    "same_job_elsewhere",
    "missed_renewal",
    "describe_holder",
    "takeover_from_env",
    "ENV_TAKEOVER",
    "ENV_LEASE_TTL",
    "ENV_JOB_ID",
]
