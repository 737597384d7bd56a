"""The tiered storage's background uploader: committed local steps go to the remote one at a time, oldest first,
and a store outage never stops training.

* A failed round (one step's upload, or the listing that plans it) is retried in the background after a growing
  delay (:class:`UploadOptions`); the local step stays protected from retention meanwhile. Nothing is raised at
  ``save``/``maybe_save``: the failure goes to the log, the ``upload_failed`` event and, when the remote falls too
  far behind, one ``upload_lag`` warning. ``wait()`` and ``close()`` ask for a round at once and raise if it fails,
  so they end within one request's retry budget.
* The backlog (committed local steps not yet on the remote) is bounded by :attr:`UploadOptions.max_backlog` steps
  and by local free space; when it is full, the oldest waiting step is kept and retried, and new policy saves wait
  (:meth:`Uploader.save_allowed` says no, with a ``save_deferred`` event) rather than filling the disk: a waiting
  step is never deleted before it is uploaded.
* The remote's lag (steps and seconds behind the local tier) is in every upload event; :func:`upload_status` reads
  the newest one back for ``resumekit ls`` and the supervisor.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..errors import CheckpointWriteError, ConfigError, CorruptCheckpointError
from ..format import MANIFEST, parse_step_dirname, step_dirname
from ..verify import read_manifest
from .steps import plan_uploads, step_dirs, valid_manifest
from .transfer import read_manifest_bytes

log = logging.getLogger("resumekit")

#: Events that carry the remote's lag; :func:`upload_status` reads the newest of them.
LAG_EVENTS = ("upload", "upload_failed", "upload_lag", "upload_caught_up", "save_deferred", "upload_resync")


@dataclass(kw_only=True)
class UploadOptions:
    """How the background uploader rides out a store outage. Each field can be set by the variable named below.

    Attributes:
        max_backlog: committed local steps that may wait for the remote (``RESUMEKIT_UPLOAD_BACKLOG``). When that
            many wait, new policy saves wait too (they are skipped with a ``save_deferred`` event) until uploads
            catch up: waiting steps are never deleted, so this bounds the local disk an outage can fill.
        retry_delay: seconds before the first background retry of a failed upload (``RESUMEKIT_UPLOAD_RETRY``);
            it doubles per consecutive failure.
        retry_delay_max: the longest delay between background retries (``RESUMEKIT_UPLOAD_RETRY_MAX``).
        lag_warning: seconds the remote may stay behind before one warning (``RESUMEKIT_UPLOAD_LAG_WARN``);
            another comes after it caught up and fell behind again.
        free_reserve: bytes of local free space to keep beyond the room for one more step
            (``RESUMEKIT_UPLOAD_FREE_RESERVE``): below it, with steps waiting, new saves wait.
    """

    max_backlog: int = 16
    retry_delay: float = 2.0
    retry_delay_max: float = 60.0
    lag_warning: float = 600.0
    free_reserve: int = 256 << 20

    _ENV: ClassVar[dict[str, str]] = {  # a class constant, not a dataclass field
        "max_backlog": "RESUMEKIT_UPLOAD_BACKLOG",
        "retry_delay": "RESUMEKIT_UPLOAD_RETRY",
        "retry_delay_max": "RESUMEKIT_UPLOAD_RETRY_MAX",
        "lag_warning": "RESUMEKIT_UPLOAD_LAG_WARN",
        "free_reserve": "RESUMEKIT_UPLOAD_FREE_RESERVE",
    }

    def __post_init__(self) -> None:
        if not isinstance(self.max_backlog, int) or self.max_backlog < 1:
            raise ConfigError(f"UploadOptions.max_backlog must be a positive integer, got {self.max_backlog!r}")
        for name in ("retry_delay", "retry_delay_max", "lag_warning", "free_reserve"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"UploadOptions.{name} must be a number >= 0, got {v!r}")

    @classmethod
    def from_env(cls, **overrides: Any) -> UploadOptions:
        """Defaults, then the ``RESUMEKIT_UPLOAD_*`` environment, then ``overrides``."""
        kw: dict[str, Any] = {}
        types = {f.name: type(f.default) for f in fields(cls)}
        for name, var in cls._ENV.items():
            raw = os.environ.get(var, "").strip()
            if raw:
                try:
                    kw[name] = int(float(raw)) if types[name] is int else float(raw)
                except ValueError:
                    raise ConfigError(f"{var}={raw!r} is not a number") from None
        kw.update(overrides)
        return cls(**kw)

    def retry_in(self, failures: int) -> float:
        """Delay before the next background round after ``failures`` consecutive failed ones (from 1)."""
        return min(self.retry_delay_max, self.retry_delay * 2 ** max(0, failures - 1))


def remote_lag(
    local_newest: int | None, remote_newest: int | None, oldest_waiting_since: float | None, now: float
) -> tuple[int, float]:
    """(steps, seconds) the remote is behind: training steps between the newest local and the newest remote
    checkpoint, and how long the oldest step still waiting has waited (0, 0.0 when caught up)."""
    if oldest_waiting_since is None or local_newest is None:
        return 0, 0.0
    return max(0, local_newest - (remote_newest or 0)), max(0.0, now - oldest_waiting_since)


def backlog_full(waiting: int, max_backlog: int, free_bytes: int | None, step_bytes: int, reserve: int) -> str | None:
    """Why a new save should wait for the uploads, or None when it may go ahead.

    A save waits only while steps are waiting (their space can be given back by uploading them): when
    ``max_backlog`` of them wait, or when free space would not hold one more step plus ``reserve``.
    """
    if waiting <= 0:
        return None
    if waiting >= max_backlog:
        return f"{waiting} checkpoints wait for upload (RESUMEKIT_UPLOAD_BACKLOG={max_backlog})"
    if free_bytes is not None and free_bytes < step_bytes + reserve:
        return (
            f"{free_bytes / 1e6:.0f} MB free locally, a checkpoint takes {step_bytes / 1e6:.0f} MB, and "
            f"{waiting} wait for upload"
        )
    return None


def upload_status(local_dir: str, now: float | None = None, tail_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """The remote's lag as the newest lag-carrying event of ``local_dir/events.jsonl`` left it, or None.

    ``lag_s`` is brought up to ``now`` when steps were still waiting. Only the file's last ``tail_bytes`` are
    read: listing stays fast on a long run's log.
    """
    path = os.path.join(local_dir, "events.jsonl")
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") in LAG_EVENTS and "lag_steps" in rec:
            now = time.time() if now is None else now
            waiting = int(rec.get("backlog") or 0)
            lag_s = float(rec.get("lag_s") or 0.0) + (max(0.0, now - float(rec["time"])) if waiting else 0.0)
            return {
                "remote": rec.get("remote"),
                "lag_steps": int(rec.get("lag_steps") or 0),
                "lag_s": round(lag_s, 1),
                "backlog": waiting,
                "remote_newest": rec.get("remote_newest"),
                "last_event": rec.get("event"),
                "time": rec.get("time"),
            }
    return None


def describe_lag(status: dict[str, Any]) -> str:
    """One line for people about an :func:`upload_status` (``resumekit ls`` of a local tier, the run summary)."""
    if status["backlog"]:
        behind = (
            f"{status['lag_steps']} steps / {status['lag_s']:.0f} s behind, {status['backlog']} checkpoint(s) "
            "waiting for upload"
        )
    else:
        behind = "up to date"
    return f"remote {status['remote']}: {behind} (newest there: step {status['remote_newest']})"


def upload_error(tier: Any, name: str, e: BaseException) -> BaseException:
    """The error a failed round of ``tier``'s uploader keeps for ``wait()``/``close()``: one line naming both ends."""
    if isinstance(e, CheckpointWriteError):
        return e
    err = CheckpointWriteError(
        f"uploading {tier.local.join(name)} to {tier.remote.join(name)} failed: {e}. The local checkpoint is "
        "kept; the upload is retried in the background and at the next start"
    )
    err.__cause__ = e
    return err


class RemoteView:
    """What the uploader knows of the remote tier: its valid steps (listed once, forgotten after a failure), which
    queued steps to upload or skip, whether a step is already there, and the remote's retention.

    Args:
        tier: the tiered storage (its ``local``, ``remote``, ``retention`` and ``events``).
    """

    def __init__(self, tier: Any):
        self.tier = tier
        self._valid: dict[int, dict[str, Any]] | None = None  # step -> metadata, this process's view

    def forget(self) -> None:
        """The remote's state is unknown (after a failure): list it again next time."""
        self._valid = None

    def record(self, step: int, metadata: dict[str, Any]) -> None:
        """A step this process just put on the remote."""
        if self._valid is not None:
            self._valid[step] = dict(metadata)

    def plan(self, pending: list[str]) -> tuple[str | None, list[str]]:
        """The step to upload next (None: none) and the queued ones to skip as superseded (each gets an
        ``upload_skipped`` event)."""
        tier = self.tier
        by_step = {s: n for n in pending if (s := parse_step_dirname(n)) is not None}
        policy = tier.retention
        if policy is not None and getattr(policy, "active", False):
            remote = self.valid()
            metrics = dict(remote)
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

    def valid(self) -> dict[int, dict[str, Any]]:
        """The remote's valid steps with their metadata (listed once, then kept up to date by this process)."""
        if self._valid is None:
            remote = self.tier.remote
            state: dict[int, dict[str, Any]] = {}
            for step, name in step_dirs(remote):
                man = valid_manifest(remote, name)
                if man is not None:
                    state[step] = dict(man.metadata)
            self._valid = state
        return self._valid

    def already_there(self, name: str, raw: bytes) -> bool:
        """Whether the remote has this step with these manifest bytes and every file at its size."""
        try:
            return self.tier.remote.read_bytes(f"{name}/{MANIFEST}") == raw and (
                valid_manifest(self.tier.remote, name) is not None
            )
        except FileNotFoundError:
            return False

    def retention(self, protect: set) -> None:
        """Apply the tier's retention policy to the remote's valid steps (never one in ``protect``)."""
        tier = self.tier
        policy = tier.retention
        if policy is None or not getattr(policy, "active", False):
            return
        remote = self.valid()
        for s in policy.to_delete(sorted(remote), remote, protected=protect):
            name = step_dirname(s)
            try:
                tier.remote.remove_tree(name)
            except OSError as e:
                log.warning("retention could not remove %s: %s", tier.remote.join(name), e)
                continue
            remote.pop(s, None)
            tier.events.emit("retention_delete", step=s, path=tier.remote.join(name), tier="remote")


class Uploader:
    """One background thread uploading queued steps one at a time, oldest first (parts of a file in parallel).

    Args:
        tier: the :class:`~resumekit.storage.tiered.TieredStorage` it serves (its ``local``, ``remote``,
            ``retention``, ``events`` and ``upload_step``); not imported here, which would make a cycle.
        options: retries, backlog and warning thresholds.
    """

    def __init__(self, tier: Any, options: UploadOptions | None = None):
        self.tier = tier
        self.options = options or UploadOptions.from_env()
        self._cv = threading.Condition()
        self._queue: list[str] = []  # committed locally, not yet on the remote, oldest first (failed ones too)
        self._in_flight: str | None = None
        self._deferred: set = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._hurry = False  # wait()/close() asked for a round now, not after the retry delay
        self._round_active = False
        self._rounds_started = 0
        self._failed_round = 0  # number of the newest failed round
        self._last_error: BaseException | None = None
        self._failures = 0  # consecutive failed rounds
        self._next_try = 0.0  # monotonic time of the next round after a failure
        self._since: dict[str, float] = {}  # name -> wall time it started waiting
        self._step_bytes = 0  # size of the newest queued step
        self._local_newest: int | None = None
        self.remote_newest: int | None = None  # newest step known to be on the remote (resync sets it)
        self._lag_warned = False
        self._deferring = False
        self.view = RemoteView(tier)

    # -- called from the training side -----------------------------------------------------------------------------

    def enqueue(self, name: str) -> None:
        step = parse_step_dirname(name)
        try:
            nbytes = read_manifest(self.tier.local, name).total_bytes
        except (OSError, CorruptCheckpointError):
            nbytes = 0
        with self._cv:
            if name not in self._queue and name != self._in_flight:
                self._queue.append(name)
                self._since.setdefault(name, time.time())
            if step is not None and (self._local_newest is None or step > self._local_newest):
                self._local_newest = step
                self._step_bytes = nbytes or self._step_bytes
            self._stopping = False
            self._ensure_thread()
            self._cv.notify_all()
        self._check_lag()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="resumekit-upload", daemon=True)
            self._thread.start()

    def outstanding(self) -> list[str]:
        with self._cv:
            return ([self._in_flight] if self._in_flight else []) + list(self._queue)

    def _protected(self, name: str) -> bool:
        return name == self._in_flight or name in self._queue

    def defer_delete(self, name: str) -> bool:
        with self._cv:
            if self._protected(name):
                self._deferred.add(name)
                return True
            return False

    def save_allowed(self, step: int) -> bool:
        """Whether a policy save of ``step`` may go ahead; False (with a ``save_deferred`` event) while the backlog
        is full. Training goes on either way."""
        with self._cv:
            waiting = len(self._queue) + (1 if self._in_flight else 0)
            step_bytes = self._step_bytes
        why = backlog_full(
            waiting, self.options.max_backlog, self.tier.local.free_bytes(), step_bytes, int(self.options.free_reserve)
        )
        if why is None:
            if self._deferring:
                self._deferring = False
                log.warning("upload backlog has room again: checkpoints are saved again from step %d", step)
            return True
        fields_ = self.lag_fields()
        self.tier.events.emit("save_deferred", step=step, reason=why, **fields_)
        if not self._deferring:
            self._deferring = True
            log.warning(
                "not saving step %d (and later ones) until uploads to %s catch up: %s; the oldest waiting "
                "checkpoint is kept and retried; the remote is %d steps / %.0f s behind",
                step,
                self.tier.remote.uri,
                why,
                fields_["lag_steps"],
                fields_["lag_s"],
            )
        return False

    def wait(self) -> None:
        """Block until nothing waits for upload; raise the error of a round that failed meanwhile.

        A round is started at once (not after the retry delay), so this returns or raises within one round's
        time: one request's retry budget against an unreachable store.
        """
        with self._cv:
            if not self._queue and not self._in_flight:
                return
            self._hurry = True
            self._stopping = False
            self._ensure_thread()
            self._cv.notify_all()
            # The round in flight counts (it is sent now); else the next one, which the hurry starts at once.
            target = self._rounds_started if self._round_active else self._rounds_started + 1
            while self._queue or self._in_flight:
                if self._failed_round >= target and self._last_error is not None:
                    raise self._last_error
                if not self._round_active and not self._hurry and self._rounds_started >= target:
                    self._hurry = True  # a round succeeded and more wait: go on at once
                    self._cv.notify_all()
                self._ensure_thread()
                self._cv.wait(1.0)

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)

    def set_remote_newest(self, step: int | None) -> None:
        with self._cv:
            self.remote_newest = step

    # -- the thread ------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping:
                    now = time.monotonic()
                    if self._queue and (self._hurry or now >= self._next_try):
                        break
                    self._cv.wait(None if not self._queue else max(0.01, self._next_try - now))
                if self._stopping:
                    return
                self._hurry = False
                self._round_active = True
                self._rounds_started += 1
                number = self._rounds_started
                pending = list(self._queue)
            error = self._round(pending)
            with self._cv:
                self._round_active = False
                if error is None:
                    self._failures, self._next_try = 0, 0.0
                else:
                    self._failures += 1
                    self._next_try = time.monotonic() + self.options.retry_in(self._failures)
                    self._failed_round, self._last_error = number, error
                    self.view.forget()  # the remote's state is unknown after a failure
                self._cv.notify_all()
            if error is not None:
                try:
                    self._report_failure(pending, error)
                except Exception as e:  # noqa: BLE001 - reporting must never stop the uploads (wait() relies on them)
                    log.warning("could not report an upload failure: %s", e)

    def _round(self, pending: list[str]) -> BaseException | None:
        """Plan and upload one step (skipping superseded ones); the failure, if any, as the error to raise."""
        name: str | None = None
        try:
            name, skip = self.view.plan(pending)
            for n in skip:
                self._resolve(n, uploaded=False)
            if name is None:
                return None
            with self._cv:
                if name in self._queue:
                    self._queue.remove(name)
                self._in_flight = name
            self._upload(name)
        except BaseException as e:  # noqa: BLE001 - kept for wait()/close(), never dropped
            with self._cv:
                if name is not None and self._in_flight == name:
                    self._in_flight = None
                    self._queue.insert(0, name)  # still the oldest waiting: retried first, still protected
            return upload_error(self.tier, name or pending[0], e)
        self._resolve(name, uploaded=True)
        return None

    def _report_failure(self, pending: list[str], error: BaseException) -> None:
        retry_in = self.options.retry_in(self._failures)
        fields_ = self.lag_fields()
        log.warning("upload failed (retrying in %.0f s): %s", retry_in, error)
        self.tier.events.emit(
            "upload_failed",
            steps=[parse_step_dirname(n) for n in pending],
            error=str(error),
            failures=self._failures,
            retry_in_s=round(retry_in, 3),
            **fields_,
        )
        self._check_lag(fields_)

    def _check_lag(self, fields_: dict[str, Any] | None = None) -> None:
        """One warning (log and ``upload_lag`` event) when the remote falls behind by more than the threshold."""
        if self._lag_warned:
            return
        fields_ = fields_ or self.lag_fields()
        if fields_["lag_s"] > self.options.lag_warning:
            self._lag_warned = True
            log.warning(
                "the remote %s is %d steps / %.0f s behind the local tier (%d checkpoints wait for upload); "
                "training goes on and the uploads keep being retried",
                self.tier.remote.uri,
                fields_["lag_steps"],
                fields_["lag_s"],
                fields_["backlog"],
            )
            self.tier.events.emit("upload_lag", level="warning", **fields_)

    def lag_fields(self) -> dict[str, Any]:
        """The remote's lag now, as the events carry it: ``remote``, ``remote_newest``, ``lag_steps``, ``lag_s``,
        ``backlog`` (steps waiting, the one in flight included)."""
        with self._cv:
            waiting = ([self._in_flight] if self._in_flight else []) + list(self._queue)
            since = min((self._since.get(n, time.time()) for n in waiting), default=None)
            steps, secs = remote_lag(self._local_newest, self.remote_newest, since, time.time())
            return {
                "remote": self.tier.remote.uri,
                "remote_newest": self.remote_newest,
                "lag_steps": steps,
                "lag_s": round(secs, 3),
                "backlog": len(waiting),
            }

    def _upload(self, name: str) -> None:
        tier = self.tier
        step = parse_step_dirname(name)
        raw, man = read_manifest_bytes(tier.local, name)
        if self.view.already_there(name, raw):
            tier.events.emit("upload_skipped", step=step, path=tier.remote.join(name), reason="already uploaded")
        else:
            t0 = time.perf_counter()
            man = tier.upload_step(name)
            secs = time.perf_counter() - t0
            with self._cv:
                if step is not None and (self.remote_newest is None or step > self.remote_newest):
                    self.remote_newest = step
                self._in_flight = None if self._in_flight == name else self._in_flight
            tier.events.emit(
                "upload",
                step=step,
                path=tier.remote.join(name),
                bytes=man.total_bytes,
                seconds=secs,
                mb_s=round(man.total_bytes / 1e6 / secs, 3) if secs > 0 else 0.0,
                **self.lag_fields(),
            )
            log.info("uploaded %s (%.1f MB in %.2fs)", tier.remote.join(name), man.total_bytes / 1e6, secs)
        if step is not None:
            self.view.record(step, man.metadata)
        try:
            self.view.retention(protect={step} if step is not None else set())
        except OSError as e:  # the step is uploaded; retention runs again after the next upload
            log.warning("remote retention after uploading %s failed: %s", tier.remote.join(name), e)

    def _resolve(self, name: str, uploaded: bool) -> None:
        """The step no longer needs its local copy for the remote: run a deferred local deletion."""
        with self._cv:
            if name in self._queue:
                self._queue.remove(name)
            if self._in_flight == name:
                self._in_flight = None
            self._since.pop(name, None)
            delete = name in self._deferred and not self._protected(name)
            if delete:
                self._deferred.discard(name)
            caught_up = not self._queue and not self._in_flight
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
        if caught_up and (self._lag_warned or self._failures):
            self._lag_warned = False
            self.tier.events.emit("upload_caught_up", **self.lag_fields())
            log.warning("uploads to %s caught up", self.tier.remote.uri)
        with self._cv:
            self._cv.notify_all()


__all__ = [
    "Uploader",
    "RemoteView",
    "UploadOptions",
    "remote_lag",
    "backlog_full",
    "upload_status",
    "describe_lag",
    "LAG_EVENTS",
]
