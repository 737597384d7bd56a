"""Garbage collection of a checkpoint root: retention plus removal of stale in-progress directories."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from .events import EventLog
from .format import MANIFEST, TMP_PREFIX
from .layouts.base import choose_latest
from .layouts.native import NativeLayout
from .policy import RetentionPolicy
from .storage import Storage
from .storage.resave import recover_resaves

log = logging.getLogger("resumekit")


def apply_retention(
    storage: Storage, policy: RetentionPolicy, *, protect: set[int], events: EventLog | None = None
) -> list[int]:
    """Delete the valid checkpoints ``policy`` no longer keeps (never a step in ``protect``); returns their steps.

    Validity is the quick check (manifest and sizes): retention runs after every save and must not re-hash the
    root. A deletion that fails is logged and skipped; the next save retries it.
    """
    layout = NativeLayout()
    infos = [layout.validate(storage, i, full=False) for i in layout.list(storage)]
    valid = {i.step: i for i in infos if i.valid}
    removed = []
    for s in policy.to_delete(list(valid), {s: i.metadata for s, i in valid.items()}, protected=protect):
        try:
            storage.remove_tree(valid[s].name)
        except OSError as e:
            log.warning("retention could not remove %s: %s", valid[s].path, e)
            continue
        removed.append(s)
        if events is not None:
            events.emit("retention_delete", step=s, path=valid[s].path)
    return removed


class RetentionWorker:
    """Retention after each commit, on its own thread, so deleting old steps never delays the next save.

    A save asks (:meth:`request`) right after its commit and goes on; the deletion runs in the background. Requests
    made while one runs coalesce into one more pass (every step asked to be protected stays protected), so a slow
    delete (a large file, a network file system) never makes a save wait and never piles up threads. Safe beside
    a save in progress: that save is a ``.tmp-`` directory retention does not see, and a step committed meanwhile
    is the newest, which retention never deletes. Errors other than a failed deletion (logged and retried by the
    next pass) are kept and raised by :meth:`raise_pending`.

    Args:
        storage: the root (a :class:`~resumekit.storage.tiered.TieredStorage` defers steps still uploading).
        policy: what to keep.
        events: where ``retention_delete`` events go.
    """

    def __init__(self, storage: Storage, policy: RetentionPolicy, events: EventLog | None = None):
        self.storage = storage
        self.policy = policy
        self.events = events
        self._cv = threading.Condition()
        self._protect: set[int] = set()
        self._pending = False
        self._running = False
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        with self._cv:
            return self._running

    def request(self, protect: set[int]) -> None:
        """Run retention soon, never deleting a step in ``protect``; returns at once."""
        with self._cv:
            self._protect |= protect
            self._pending = True
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="resumekit-retention", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._pending:
                    self._running = False
                    self._cv.notify_all()
                    return
                protect, self._protect, self._pending = self._protect, set(), False
            try:
                apply_retention(self.storage, self.policy, protect=protect, events=self.events)
            except BaseException as e:  # noqa: BLE001 - kept and raised on the training thread
                with self._cv:
                    self._error = e

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no pass is running or pending (at most ``timeout`` seconds); True when idle."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._running, timeout)

    def raise_pending(self) -> None:
        """Raise (once) the error of a pass that failed."""
        with self._cv:
            err, self._error = self._error, None
        if err is not None:
            raise err


def collect_garbage(
    storage: Storage,
    policy: RetentionPolicy,
    *,
    tmp_age: float = 600.0,
    dry_run: bool = False,
    now: float | None = None,
) -> dict[str, Any]:
    """Apply ``policy`` to the valid checkpoints and remove ``.tmp-`` dirs older than ``tmp_age`` seconds (on object
    stores: step dirs without a manifest, and multipart uploads, older than that).

    Invalid checkpoints are kept (they are evidence; ``resumekit ls`` shows why they are invalid) and the newest
    valid one is never removed. A tmp dir younger than ``tmp_age`` may belong to a save in progress. The committed
    copy of an interrupted re-save (``.keep-``) is never removed: it is put in its step's place. Unless ``dry_run``,
    the caller must hold the root's writer lease (:func:`resumekit.storage.lease.acquire_lease`).
    """
    now = time.time() if now is None else now
    layout = NativeLayout()
    if not dry_run:
        # A re-save a kill interrupted: its keep copy (the newer save) takes its step's place before anything is
        # judged. Keep copies are never garbage; the caller holds the root's writer lease.
        recover_resaves(storage)
    infos = [layout.validate(storage, i, full=False) for i in layout.list(storage)]
    valid = {i.step: i for i in infos if i.valid}
    # Sizes can look right on a damaged checkpoint: the one protected is the newest that passes full checksums.
    best, _ = choose_latest(list(valid.values()), lambda i: layout.validate(storage, i, full=True))
    protected = {best.step} if best is not None else set(valid)
    doomed = policy.to_delete(list(valid), {s: i.metadata for s, i in valid.items()}, protected=protected)
    removed: list[str] = []  # paths
    kept: list[str] = []
    uploads: list[dict[str, Any]] = []  # incomplete multipart uploads (object stores), with their age
    for s in sorted(valid):
        (removed if s in doomed else kept).append(valid[s].path)
        if s in doomed and not dry_run:
            storage.remove_tree(valid[s].name)
    if not storage.is_local:
        # Object stores cannot rename, so an unfinished or abandoned save is a step_N/ without its manifest rather
        # than a .tmp- dir; its age is that of its newest object (a save in progress keeps adding objects).
        for i in infos:
            if i.valid or storage.exists(f"{i.name}/{MANIFEST}"):
                continue
            mtime = storage.mtime(i.name)
            if mtime is not None and now - mtime >= tmp_age:
                removed.append(i.path)
                if not dry_run:
                    storage.remove_tree(i.name)
        list_uploads = getattr(storage, "list_uploads", None)
        if list_uploads is not None:
            # Multipart uploads of killed saves: invisible to listings, but the store keeps (and bills) their parts.
            # Every one is reported with its age; those older than tmp_age are aborted (a younger one may belong to
            # a save in progress).
            for u in list_uploads(now=now):
                stale = u["age_s"] is not None and u["age_s"] >= tmp_age
                action = ("would abort" if dry_run else "aborted") if stale else "kept (younger than --tmp-age)"
                uploads.append({"uri": u["uri"], "upload_id": u["upload_id"], "age_s": u["age_s"], "action": action})
            if any(u["action"] != "kept (younger than --tmp-age)" for u in uploads):
                removed.extend(storage.abort_stale_uploads(tmp_age, dry_run=dry_run, now=now))  # type: ignore[attr-defined]
    for e in storage.listdir(""):
        if e.name.startswith(TMP_PREFIX):
            # A long write changes the files' mtimes, not the directory's: age is that of the newest entry.
            mtime = _newest_mtime(storage.local_path(e.name)) if storage.is_local else e.mtime
            age = now - (mtime if mtime is not None else now)
            if age >= tmp_age:
                removed.append(storage.join(e.name))
                if not dry_run:
                    storage.remove_tree(e.name)
    return {"removed": removed, "kept": kept, "uploads": uploads, "dry_run": dry_run}


def _newest_mtime(path: str | None) -> float | None:
    if path is None:
        return None
    newest = None
    for root, _dirs, files in os.walk(path):
        for name in [root] + [os.path.join(root, f) for f in files]:
            try:
                m = os.lstat(name).st_mtime
            except OSError:
                continue
            newest = m if newest is None else max(newest, m)
    if newest is None:
        try:
            newest = os.lstat(path).st_mtime
        except OSError:
            return None
    return newest
