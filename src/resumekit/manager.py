"""CheckpointManager: the four lines a training loop needs.

Example::

    mgr = CheckpointManager("ckpts", every_steps=100, keep_last=3, async_save=True)
    state = {"model": model, "optim": optim, "sched": sched, "loader": loader}
    start = mgr.restore(state)             # 0 on a fresh run
    for step in range(start, total_steps):
        train_one_step()
        mgr.maybe_save(step + 1, state, metrics={"loss": loss.item()})
    mgr.close()
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from .checkpointers.base import Checkpointer, Committed, Opened, Snapshot, first_valid, first_valid_at
from .checkpointers.local import LocalCheckpointer
from .errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError, LeaseHeldError
from .events import (
    ENV_RESUME_FROM,
    ENV_RESUME_MODE,
    EventLog,
    Heartbeat,
    install_stack_dumps,
    uninstall_stack_dumps,
)
from .format import metadata_jsonable, step_dirname
from .gc import RetentionWorker
from .layouts.base import CheckpointInfo, order_by_step
from .layouts.native import NativeLayout
from .options import CheckpointOptions, SaveCost, _as_step
from .snapshot import BackgroundPersister
from .storage import Storage, open_storage
from .storage import deadline as transfer_deadline
from .storage.lease import WriterLease, acquire_leases
from .storage.tiered import TieredStorage

log = logging.getLogger("resumekit")
_EVENT_FIELDS = frozenset({"time", "event", "source", "pid", "host", "step"})


class _PreemptionFlag:
    """SIGTERM (preemption) only sets a flag; the manager saves at the next step boundary, where the model is
    consistent (saving from inside a signal handler could see a half-updated model)."""

    def __init__(self, install: bool):
        self._flag = threading.Event()
        self._old: Any = None
        if install and threading.current_thread() is threading.main_thread():
            try:
                self._old = signal.signal(signal.SIGTERM, self._on_signal)
            except ValueError:
                self._old = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._flag.set()
        # The grace period starts now (RESUMEKIT_GRACE, from `resumekit run --grace`): remote transfers stop at its
        # end, so a save stuck on an unresponsive store fails in time for the process to exit on its own.
        transfer_deadline.start_grace()
        self._grace_started = True

    def set(self) -> None:
        self._flag.set()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def uninstall(self) -> None:
        if getattr(self, "_grace_started", False):
            # A process that outlives its preemption (a test, an ignored signal) must not keep failing transfers.
            transfer_deadline.set_deadline(None)
        if self._old is not None and threading.current_thread() is threading.main_thread():
            try:
                signal.signal(signal.SIGTERM, self._old)
            except (ValueError, TypeError):
                pass


class CheckpointManager:
    """Saves the whole training state when due, atomically, and restores the newest valid checkpoint.

    Args:
        directory: checkpoint root: a local/mounted path or a URI (``s3://bucket/prefix``).
        options: a :class:`CheckpointOptions`; or pass its fields as keyword arguments.
    """

    def __init__(self, directory: str, options: CheckpointOptions | None = None, **kwargs: Any):
        if options is not None and kwargs:
            raise ConfigError("pass either options= or keyword options, not both")
        self.options = options or CheckpointOptions(**kwargs)
        self.tier: TieredStorage | None = None
        # node-tier: with distributed checkpoints local_tier is the node's tier of the sharded checkpointer (see
        # _make_checkpointer), not a TieredStorage: the durable commit stays in the shared root.
        if self.options.local_tier and not self._wants_distributed():
            self.tier = TieredStorage(directory, self.options.local_tier, retention=self.options.retention)
        self.storage: Storage = self.tier if self.tier is not None else open_storage(directory)
        self.layout = NativeLayout()
        self.events = EventLog.for_dir(self.storage.local_path() if self.storage.is_local else None, "library")
        if self.tier is not None:
            self.tier.events = self.events  # the local tier's events.jsonl: remote roots keep no log
        self.heartbeat = Heartbeat.from_env(self.options.heartbeat_interval)
        self.cost = SaveCost()
        self.restored_from: CheckpointInfo | None = None
        self.skipped: list[CheckpointInfo] = []
        self.last_saved_step: int | None = None
        self.preempted = False
        self._last_save_time = time.monotonic()
        self._persister = BackgroundPersister()
        self._retention: RetentionWorker | None = None  # started by the first save that has something to delete
        self._closed = False
        self._last_metrics = float("-inf")
        self.lease: WriterLease | None = None
        self._leases: list[WriterLease] = []
        self.checkpointer: Checkpointer = self._make_checkpointer()
        # The writer lease before anything else: a second writer must fail here, before it installs handlers or
        # touches the directory (readers, read_only=True, take none).
        self._acquire_leases()
        # A read-only manager never saves, so SIGTERM keeps its usual meaning for it.
        self._sigterm = _PreemptionFlag(install=self.options.handle_sigterm and not self.options.read_only)
        # One writer of the event log (rank 0) and one heartbeat per node (local rank 0): a hung rank stalls
        # rank 0 at its next collective, so the node's heartbeat still goes stale.
        if not self.checkpointer.leads_job:
            self.events = EventLog(None, self.events.source)
        if not self.checkpointer.leads_node:
            self.heartbeat = Heartbeat(None)
        # Under `resumekit run`: every thread's stack on dump_signal before a hang kill, announced in the heartbeat.
        self._dump_registered = install_stack_dumps(self.heartbeat, self.options.dump_signum)
        # The job is up: under `resumekit run` this marks the end of "spawn + imports" in the restart-latency
        # breakdown (the launch is the supervisor's; everything until here is the interpreter, imports, set-up).
        # A read-only reader (an evaluator beside a live run) is not the job: it must not move the job's figures.
        if not self.options.read_only:
            self.events.emit("job_init")
        self._first_step_pending = not self.options.read_only
        # A strong reference on purpose: a manager dropped without close() still drains its background save at
        # exit, and a failure there still sets the exit status (its staging buffers live until then).
        self._atexit_hook = self._atexit
        atexit.register(self._atexit_hook)

    def _acquire_leases(self) -> None:
        """Take the root's writer lease (both tiers' with a ``local_tier``); on a collective checkpointer rank 0
        takes it and every rank learns whether it could, so no rank goes on alone."""
        cp = self.checkpointer
        error: LeaseHeldError | None = None
        if not self.options.read_only and cp.leads_job:
            # The remote tier is optional to training (uploads retry): an unreachable store does not stop the job.
            required: list[Storage] = [self.tier.local] if self.tier is not None else [self.storage]
            optional: list[Storage] = [self.tier.remote] if self.tier is not None else []
            try:
                self._leases = acquire_leases(required, optional, takeover=bool(self.options.takeover))
            except LeaseHeldError as e:
                error = e
        if cp.collective:
            failed, _ = cp.agree(error is not None, False)
            if failed and error is None:
                error = LeaseHeldError(self.storage.uri, {}, f"{self.storage.uri} is in use by another writer (rank 0)")
        if error is not None:
            for lease in self._leases:
                lease.release()
            self.checkpointer.release()
            raise error
        self.lease = self._leases[0] if self._leases else None
        for lease in self._leases:
            # A newer manager of this process on the same root takes over: this one's save in flight ends first.
            lease.on_takeover = self._drain_quietly

    def _drain_quietly(self) -> None:
        self._persister.wait(raise_error=False)

    def _wants_distributed(self) -> bool:
        from .distributed.context import wants_distributed

        return wants_distributed(self.options.distributed)

    def _make_checkpointer(self) -> Checkpointer:
        if not self._wants_distributed():
            return LocalCheckpointer(self.storage)
        from .checkpointers.dcp import DcpCheckpointer

        node_tier = None
        if self.options.local_tier:
            from .distributed.nodetier import NodeTier, tier_keep

            # The tier keeps at least the two newest steps: the newest may be one another node lacks.
            node_tier = NodeTier(self.options.local_tier, keep=tier_keep(self.options.keep_last))
        # keep_last also sizes a tier the checkpointer takes from RESUMEKIT_LOCAL_TIER (resumekit run --local-tier)
        return DcpCheckpointer(self.storage, node_tier=node_tier, keep_last=self.options.keep_last)

    # ------------------------------------------------------------------------------------------------ restore
    def restore(
        self,
        state: MutableMapping[str, Any],
        *,
        resume: str | None = None,
        only: Sequence[str] | None = None,
        strict: bool | None = None,
    ) -> int:
        """Load the newest valid checkpoint into ``state``; returns the step to continue from (0 if none).

        Corrupt or incomplete checkpoints are skipped with a logged reason and the previous one is used. The whole
        checkpoint is decoded and validated (entries, shapes, dtypes, RNG states, devices, plain values) before the
        first live object is touched, so one that fails validation leaves ``state`` unchanged and the next older
        valid one is tried.

        Args:
            state: name -> stateful object or plain value; plain values are replaced in the mapping.
            resume: overrides ``options.resume`` (``"auto"``, ``"never"`` or a path).
            only: load just these entries (and no RNG state), e.g. ``["model"]``.
            strict: overrides ``options.strict``.

        Raises:
            CorruptCheckpointError: an explicitly requested checkpoint is invalid.
            StateMismatchError: the checkpoint does not fit the objects (keys or shapes).
        """
        t0 = time.perf_counter()
        strict = self.options.strict if strict is None else strict
        mode = resume or self.options.resume
        if mode == "auto" and os.environ.get(ENV_RESUME_MODE) == "never":
            mode = "never"  # `resumekit run --resume never`
        cp = self.checkpointer
        if self.lease is not None:
            cp.clean_stale_tmp()  # only the lease holder removes anything; readers never do
        if mode == "never":
            self.events.emit(
                "restore",
                step=0,
                path=None,
                reason="resume=never",
                seconds=time.perf_counter() - t0,
                **cp.event_fields(),
            )
            return 0
        rng = only is None and self.options.save_rng

        def load(opened: Opened) -> None:
            # Loading is part of choosing: a checkpoint that fails validation (before anything changed) is skipped
            # like one that failed verification, and the next older one is tried.
            cp.load(opened, state, only=only, strict=strict, rng=rng)

        chosen = self._choose(mode, load)
        if self.tier is not None and self.lease is not None:
            # A previous run may have died mid-upload: its local steps newer than the remote's newest go up again.
            self.tier.resync(exclude={s.name for s in self.skipped})
        if chosen is None:
            if self.options.init_from:
                return self._init_from(state, t0)
            self.events.emit(
                "restore",
                step=0,
                path=None,
                skipped=[s.as_dict() for s in self.skipped],
                seconds=time.perf_counter() - t0,
                **cp.event_fields(),
            )
            return 0
        info = chosen.info
        self.restored_from = info
        self.last_saved_step = info.step
        self._last_save_time = time.monotonic()
        secs = time.perf_counter() - t0
        self.events.emit(
            "restore",
            step=info.step,
            path=info.path,
            seconds=secs,
            **cp.event_fields(),
            skipped=[{"path": s.path, "reason": s.reason} for s in self.skipped],
        )
        log.info("resumed from %s (step %d) in %.2fs", info.path, info.step, secs)
        return info.step

    def _choose(self, mode: str, load: Callable[[Opened], None]) -> Opened | None:
        """Find and load the checkpoint for ``mode``: a user-named path, the supervisor's hand-off, or the newest."""
        cp = self.checkpointer
        if mode != "auto":
            return first_valid_at(cp, mode, self._skip, load)
        env_path = os.environ.get(ENV_RESUME_FROM, "")
        if env_path and cp.honours_resume_env():
            try:
                return first_valid_at(cp, env_path, self._skip, load)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e:
                log.warning(
                    "%s=%s is not usable (%s); searching %s instead", ENV_RESUME_FROM, env_path, e, self.storage.uri
                )
        return first_valid(cp, cp.candidates(), self._skip, load)

    def _skip(self, info: CheckpointInfo, reason: str) -> None:
        info.valid, info.reason = False, reason
        self.skipped.append(info)
        log.warning("skipping invalid checkpoint %s: %s", info.path, reason)
        self.events.emit("skip_invalid", step=info.step, path=info.path, reason=reason)

    def _init_from(self, state: MutableMapping[str, Any], t0: float) -> int:
        assert self.options.init_from is not None
        keys = list(self.options.init_keys) if self.options.init_keys is not None else None
        got: list[str] = []

        def load(opened: Opened) -> None:
            got[:] = self.checkpointer.load(opened, state, only=keys, strict=self.options.strict, rng=False)

        chosen = first_valid_at(self.checkpointer, self.options.init_from, self._skip, load)
        loaded = got
        self.events.emit("init_from", path=chosen.info.path, step=0, keys=loaded, seconds=time.perf_counter() - t0)
        log.info("initialised %s from %s; starting at step 0", loaded, chosen.info.path)
        return 0

    # --------------------------------------------------------------------------------------------------- save
    def maybe_save(
        self, step: int, state: Mapping[str, Any], *, metrics: Mapping[str, Any] | None = None, force: bool = False
    ) -> bool:
        """Call once per step with the number of steps completed; saves when the policy (or a SIGTERM) says so.

        Also beats the heartbeat and surfaces errors from a background save. After a preemption save the process
        exits with status 0 when ``exit_on_preemption`` is set.
        """
        step = _as_step(step)
        self.heartbeat.beat(step)
        if self._first_step_pending:
            # The first training step of this process: the end of "first step" in the restart-latency breakdown
            # (metrics events are rate-limited and optional, so they cannot mark it). One event per process.
            self._first_step_pending = False
            self.events.emit("first_step", step=step)
        cp = self.checkpointer
        if not cp.collective:
            # Collective: a background error surfaces at the next save/wait/close, which join the persist thread
            # first, so every rank raises it at the same call (raising here could stop one rank alone).
            self._persister.raise_pending()
        if self.tier is not None:
            self.tier.raise_pending()  # an upload that failed since the last call
        if metrics and self.options.metrics_every and step % self.options.metrics_every == 0:
            now = time.monotonic()
            if now - self._last_metrics >= self.options.metrics_interval:
                self._last_metrics = now
                fields = {
                    (f"metric_{k}" if k in _EVENT_FIELDS else k): v for k, v in metadata_jsonable(metrics).items()
                }
                self.events.emit("metrics", step=step, **fields)
        preempt = self._sigterm.is_set()
        due = force or self.options.save_policy.due(step, time.monotonic(), self._last_save_time, self.last_saved_step)
        if cp.needs_agreement(self.options.handle_sigterm, self.options.every_seconds is not None):
            # A signal or a clock seen by one rank must make every rank save at this same step.
            preempt, due = cp.agree(preempt, due)
        if preempt:
            return self._preemption_save(step, state, metrics)
        if due and not force and self.tier is not None and not self.tier.save_allowed(step):
            return False  # too many steps wait for the store: this save waits (a save_deferred event says why)
        if due:
            self.save(step, state, metrics=metrics)
        return due

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        block: bool | None = None,
    ) -> str | None:
        """Save now. Returns the checkpoint path (sync) or the path it will have (async); None if already saved.

        Args:
            step: steps completed; the checkpoint is named after it.
            metrics: JSON numbers stored in the manifest (used by ``keep_best``).
            block: wait for the write to be durable (default: not when ``async_save``).

        Raises:
            CheckpointWriteError: the save (or the previous background one) failed; the previous checkpoint is
                untouched.
            UnsupportedStateError: an entry cannot be stored safely; the message names its key.
        """
        if self._closed:
            raise RuntimeError("CheckpointManager is closed")
        if self.options.read_only:
            raise ConfigError("this CheckpointManager is read_only=True: it restores but never saves")
        step = _as_step(step)
        for lease in self._leases:
            lease.check()  # a writer whose lease was taken over must not write beside the new holder
        with self.heartbeat.ticking("save", self.options.heartbeat_stall):
            return self._save(step, state, metrics, block)

    def _save(
        self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None, block: bool | None
    ) -> str | None:
        t0 = time.perf_counter()
        cp = self.checkpointer
        if not cp.collective:
            self._persister.raise_pending()
        if self._retention is not None:
            self._retention.raise_pending()  # a retention pass that failed (not a failed deletion: that is logged)
        if self.tier is not None:
            self.tier.raise_pending()  # an upload that failed since the last call
        # A persist of this very step may still be in flight: let it finish before looking, or the step would be
        # written twice and the second commit would move the first aside. Joining before raising its error also
        # makes every rank of a collective checkpointer raise it at this same call.
        waited = self._persister.wait(raise_error=True)
        use_async = self.options.async_save if block is None else not block
        # This run already holds the step (it restored or saved it): saving it again would only risk it. A
        # directory of the same step that this run did not produce (an invalid one, or a left-over of a run started
        # with resume="never") is replaced by the new save: this run's state is the one to keep.
        mine = step == self.last_saved_step or (self.restored_from is not None and self.restored_from.step == step)
        snap = cp.snapshot(
            step,
            state,
            metadata=metadata_jsonable(metrics),
            stage=use_async,
            rng=self.options.save_rng,
            skip_if_committed=mine,
        )
        name = step_dirname(step)
        if snap is None:
            log.info("step %d is already committed at %s; not saving it again", step, self.storage.join(name))
            self.last_saved_step = step
            return None
        if use_async:
            blocking = time.perf_counter() - t0
            self._persister.submit(lambda: self._persist(snap, blocking, waited, t0, background=True))
        else:
            self._persist(snap, None, waited, t0, background=False)
        self.last_saved_step = step
        self._last_save_time = time.monotonic()
        return self.storage.join(name)

    def _persist(
        self, snap: Snapshot, blocking: float | None, waited: float, t0: float, *, background: bool
    ) -> Committed:
        res = self.checkpointer.persist(snap, background=background)
        if blocking is None:  # synchronous: the whole write blocked training
            blocking = time.perf_counter() - t0
        c = self.cost
        c.saves += 1
        c.blocking_s_total += blocking
        c.persist_s_total += res.seconds
        c.last_blocking_s, c.last_persist_s = blocking, res.seconds
        c.bytes_last = res.nbytes
        self.events.emit(
            "save",
            step=snap.step,
            path=res.path,
            bytes=res.nbytes,
            blocking_s=blocking,
            persist_s=res.seconds,
            waited_s=waited,
            metrics=snap.metadata,
            **({"io": res.io} if res.io else {}),
            **self.checkpointer.event_fields(),
        )
        if self.checkpointer.leads_job and self.options.retention.active:
            # Off the save's path: the next save is ready as soon as this one is committed, whatever deleting the
            # old steps costs (see gc.RetentionWorker).
            if self._retention is None:
                self._retention = RetentionWorker(self.storage, self.options.retention, self.events)
            self._retention.request({snap.step})
        return res

    def _join_retention(self, raise_error: bool = True) -> None:
        if self._retention is not None:
            self._retention.wait()
            if raise_error:
                self._retention.raise_pending()

    # ------------------------------------------------------------------------------------------- preemption
    def request_preemption(self) -> None:
        """Ask for a save at the next step boundary, as SIGTERM does (e.g. from a rank-agreement hook)."""
        self._sigterm.set()

    def _preemption_save(self, step: int, state: Mapping[str, Any], metrics: Mapping[str, Any] | None) -> bool:
        self.preempted = True
        self.save(step, state, metrics=metrics, block=True)
        self.wait()
        self.events.emit("preempted", step=step)
        log.warning("preempted: saved step %d", step)
        if self.options.exit_on_preemption:
            self.close()
            sys.exit(0)
        return True

    # ------------------------------------------------------------------------------------------------- drain
    @property
    def busy(self) -> bool:
        """True while background work is in flight: a persist, a retention pass or, with a ``local_tier``, an
        upload. :meth:`wait` returns once it is False; polling it never blocks."""
        # In the order the work is handed on: the persist thread requests retention and queues the upload before it
        # ends, so no moment reads all three idle while one is still starting.
        if self._persister.busy:
            return True
        if self._retention is not None and self._retention.busy:
            return True
        return self.tier is not None and self.tier.lag()["backlog"] > 0

    def wait(self) -> None:
        """Block until the background save (if any) is durable, retention has run and, with a ``local_tier``,
        every upload is done; raises the error of any of them if it failed."""
        with self.heartbeat.ticking("wait", self.options.heartbeat_stall):
            self._persister.wait(raise_error=True)
            self._join_retention()
            if self.tier is not None:
                self.tier.wait_uploads()

    def close(self) -> None:
        """Finish pending work and release buffers; raises a background save's error."""
        if self._closed:
            return
        self._closed = True
        try:
            with self.heartbeat.ticking("close", self.options.heartbeat_stall):
                try:
                    self._persister.wait(raise_error=True)
                finally:
                    # Retention ends before the lease is released: nothing of this run deletes once another writer
                    # may start.
                    self._join_retention(raise_error=False)
                    if self.tier is not None:
                        self.tier.close()  # uploads finish before the process may exit; their errors surface here
                self._join_retention()  # a retention pass's error, if one failed
        finally:
            self.checkpointer.release()
            self._sigterm.uninstall()
            atexit.unregister(self._atexit_hook)
            for lease in self._leases:
                lease.release()  # after the last write: the next writer may start now
            self.events.close()
            uninstall_stack_dumps(self._dump_registered)  # puts the chained handler back

    def _atexit(self) -> None:
        # A background save failing after the loop ended must not vanish: the exit status says so.
        if self._closed:
            return
        try:
            self.close()
        except BaseException as e:  # noqa: BLE001
            sys.stderr.write(f"resumekit: background checkpoint save failed: {e}\n")
            sys.stderr.flush()
            os._exit(1)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except BaseException:  # noqa: BLE001 - the body's exception is the one to report
                pass

    # -------------------------------------------------------------------------------------------- inspection
    def checkpoints(self, full: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint with its validity (sizes only unless ``full``)."""
        self._join_retention(raise_error=False)  # what retention is deleting now is not shown as a checkpoint
        return [self.layout.validate(self.storage, i, full=full) for i in order_by_step(self.layout.list(self.storage))]

    def latest(self, full: bool = True) -> CheckpointInfo | None:
        self._join_retention(raise_error=False)
        best, _ = self.layout.latest(self.storage, full=full)
        return best
