"""Lightning integration: exact resume, checksummed ``.ckpt`` files, a save on SIGTERM, and what the supervisor needs.

``ResumekitCallback`` adds to a ``lightning.pytorch.Trainer`` run:

* **exact resume**: every RNG (python, numpy, torch CPU, each CUDA device; per rank) goes into the checkpoint and
  comes back at ``on_train_start``, the last hook before the first batch is fetched after a resume (a
  LightningModule ``on_train_start`` that draws random numbers runs after it, unlike in the straight run).
  Lightning restores model, optimizer, LR schedulers and its loops by itself, and the position of a dataloader that
  has ``state_dict``/``load_state_dict`` (it saves ``loader.state_dict()`` in the fit loop's state and calls
  ``load_state_dict`` before the first batch), so with
  :class:`resumekit.ResumableDataLoader` as the training loader an interrupted run ends bitwise equal to a straight
  one. A plain ``DataLoader`` restarts its epoch from the beginning (Lightning warns), and no RNG is restored
  without this callback;
* **checksums**: after every ``.ckpt`` is written (any save: ModelCheckpoint, ``trainer.save_checkpoint``), the file
  is fsynced and ``<name>.ckpt.resumekit.manifest.json`` (size and xxh3) is written beside it; ``resumekit
  latest/verify --layout lightning`` then check the file by checksum. Loading (``fit(ckpt_path=...)``) verifies the
  file first and unpickles it with an allow-list (the types Lightning writes, the same list the layout checks), so
  hyperparameters holding a ``pathlib.Path``, an ``argparse.Namespace`` or Lightning's ``AttributeDict`` load
  without ``weights_only=False`` and without running code from the file;
* **preemption**: on SIGTERM it saves a checkpoint at the end of the current step (where ModelCheckpoint would, with
  its file name, and ``last.ckpt`` when ``save_last`` is set), then stops and exits with status 0. Lightning itself
  only saves on SIGTERM under SLURM;
* **evidence for ``resumekit run``**: a ``restore`` event (the checkpoint Lightning loaded and its step, or step 0),
  ``metrics`` and ``save`` events, and the heartbeat at every batch (``--hang-timeout``).

How the job gets the resume path::

    trainer.fit(model, train_loader, ckpt_path=resume_path())

:func:`resume_path` is ``RESUMEKIT_RESUME_FROM`` (the newest valid ``.ckpt``, verified by ``resumekit run``), None
when the supervisor found nothing valid (from scratch), and ``"last"`` outside the supervisor. A job that passes
``ckpt_path="last"`` itself also works under ``resumekit run``: an invalid ``last.ckpt`` is moved aside first.

lightning is imported here only. Put the callback last in ``callbacks``: its preemption save then sees what the
callbacks before it did at that step.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import threading
import types
from collections.abc import Iterable
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from ..errors import CorruptCheckpointError
from ..events import ENV_HEARTBEAT, ENV_RESTART_COUNT, ENV_RESUME_FROM, ENV_RESUME_MODE
from ..format import FileEntry, Manifest
from ..layouts.checks import sidecar_name
from ..layouts.checks.pickle_scan import canonical_global
from ..layouts.lightning import LightningLayout, safe_globals
from ..storage import open_storage
from ..storage.local import atomic_write, fsync_dir
from ..verify import hash_file
from ._report import JobReporter
from ._rng import capture_rng_plain, restore_rng_plain

log = logging.getLogger("resumekit")

__all__ = ["ResumekitCallback", "ResumekitCheckpointIO", "resume_path", "safe_load", "verify_ckpt"]


def resume_path(root: str | None = None, default: str | None = "last") -> str | None:
    """The ``ckpt_path`` to pass to ``Trainer.fit``.

    Under ``resumekit run``: ``RESUMEKIT_RESUME_FROM`` (the newest checkpoint that verified), or None when it found
    none or runs with ``--resume never`` (start from scratch: ``"last"`` could name a file it did not vouch for).
    Outside it: the newest ``.ckpt`` under ``root`` that validates (``default_root_dir``, a logger directory or a
    ModelCheckpoint ``dirpath``; None when there is none), or ``default`` without a ``root`` (``"last"``:
    Lightning's own choice, the newest ``last*.ckpt`` of this start's ModelCheckpoint directory).
    """
    path = os.environ.get(ENV_RESUME_FROM)
    if path:
        return path
    supervised = bool(os.environ.get(ENV_HEARTBEAT) or os.environ.get(ENV_RESTART_COUNT))
    if supervised or os.environ.get(ENV_RESUME_MODE) == "never":
        return None
    if root is None:
        return default
    if not os.path.isdir(root):
        return None
    best, skipped = LightningLayout().latest(open_storage(root, create=False), full=True)
    for s in skipped:
        log.warning("resumekit: skipping invalid checkpoint %s: %s", s.path, s.reason)
    return best.path if best is not None else None


# ------------------------------------------------------------------------------------------ loading, saving
def verify_ckpt(path: str) -> None:
    """Fully verify one local ``.ckpt`` (sidecar checksum or zip CRCs, allow-listed types, required keys).

    Raises:
        CorruptCheckpointError: naming the file and what is wrong.
    """
    head, base = os.path.split(os.path.abspath(path))
    layout = LightningLayout()
    storage = open_storage(head, create=False)
    info = layout.candidate(storage, base, -1)
    checked = layout.validate(storage, info, full=True)
    if not checked.valid:
        raise CorruptCheckpointError(path, checked.reason)


class _AllowListUnpickler(pickle.Unpickler):
    """Resolves only the globals the Lightning layout allows: unpickling calls no other code."""

    allowed = frozenset()  # type: ignore[var-annotated]

    def find_class(self, module: str, name: str) -> Any:
        full = canonical_global(module, name)  # the name the base class imports, after fix_imports
        if full not in self.allowed:
            raise pickle.UnpicklingError(
                f"{full} is not on resumekit's allow-list for Lightning checkpoints (loading it would run its code); "
                "add it to RESUMEKIT_SAFE_GLOBALS if you trust it"
            )
        return super().find_class(module, name)


def _allow_list_pickle_module() -> types.ModuleType:
    mod = types.ModuleType("resumekit_allow_list_pickle")
    unpickler = type("Unpickler", (_AllowListUnpickler,), {"allowed": safe_globals()})
    mod.Unpickler = unpickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: unpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return mod


def safe_load(path: str, map_location: Any = None) -> dict[str, Any]:
    """``torch.load`` a local ``.ckpt`` resolving only allow-listed globals (see :mod:`resumekit.layouts.lightning`).

    ``torch.load(weights_only=True)`` refuses what Lightning itself writes (a ``pathlib.Path`` or ``Namespace``
    hyperparameter; an ``AttributeDict`` it cannot build at all), and ``weights_only=False`` would run any code
    the file names. This resolves exactly the globals that ``resumekit verify`` accepts, so a job loads what the
    supervisor vouched for and nothing else.
    """
    return torch.load(path, map_location=map_location, weights_only=False, pickle_module=_allow_list_pickle_module())


class ResumekitCheckpointIO(CheckpointIO):
    """Wraps the strategy's CheckpointIO: a sidecar manifest after each save, verification + allow-list on load.

    Args:
        inner: the CheckpointIO that reads and writes the bytes (Lightning's ``TorchCheckpointIO`` by default).
        reporter: where ``save`` events go (None: none).
        manifest: write sidecar manifests.
    """

    def __init__(self, inner: CheckpointIO, reporter: JobReporter | None = None, manifest: bool = True):
        super().__init__()
        self.inner = inner
        self.reporter = reporter
        self.manifest = manifest

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = str(path)
        local = "://" not in path
        side = sidecar_name(path)
        if local and self.manifest:
            # The old sidecar describes the file about to be replaced: gone first, a kill mid-save must not leave
            # it vouching for (or condemning) the new bytes.
            _remove(side)
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        step = int(checkpoint.get("global_step", 0) or 0)
        if local and self.manifest and os.path.isfile(path):
            _fsync(path)
            storage = open_storage(os.path.dirname(path) or ".", create=False)
            size, digest = hash_file(storage, os.path.basename(path))
            man = Manifest(
                step=step,
                files={os.path.basename(path): FileEntry(size, digest)},
                metadata={
                    "layout": "lightning",
                    "writer": "resumekit.integrations.lightning",
                    "epoch": checkpoint.get("epoch"),
                },
            )
            atomic_write(side, man.to_json())
        if self.reporter is not None:
            self.reporter.saved(step, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        path = str(path)
        if "://" in path or not os.path.isfile(path):
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        verify_ckpt(path)
        if weights_only is False or type(self.inner) is not TorchCheckpointIO:
            return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return safe_load(path, map_location)

    def remove_checkpoint(self, path: Any) -> None:
        if "://" not in str(path):
            _remove(sidecar_name(str(path)))  # first: a file without a sidecar is judged by its contents
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(os.path.dirname(path) or ".")


def install_checkpoint_io(trainer: Trainer, reporter: JobReporter | None, manifest: bool) -> bool:
    """Wrap the strategy's innermost CheckpointIO (an async wrapper keeps running around ours, so the manifest is
    written in its thread, after the bytes). Returns False where saves bypass CheckpointIO (DeepSpeed, sharded FSDP
    write directories: their own layout checks apply)."""
    strategy = trainer.strategy
    try:
        io = strategy.checkpoint_io
    except (AttributeError, NotImplementedError):
        return False
    holder: Any = strategy
    if isinstance(io, _WrappingCheckpointIO):
        holder, io = io, io.checkpoint_io
    if isinstance(io, ResumekitCheckpointIO):
        io.reporter = reporter
        return True
    wrapped = ResumekitCheckpointIO(io, reporter, manifest)
    if holder is strategy:
        strategy.checkpoint_io = wrapped
    else:
        holder._checkpoint_io = wrapped  # its setter refuses to replace a configured base IO
    return True


# -------------------------------------------------------------------------------------------------- callback
class ResumekitCallback(Callback):
    """Exact resume, checksummed checkpoints, a save on SIGTERM and the supervisor's evidence for a Lightning run.

    Args:
        manifest: write a sidecar manifest beside every ``.ckpt`` saved, and verify a ``.ckpt`` before loading it.
        rng: save every RNG in the checkpoint and restore it before the first batch after a resume.
        signals: the signals that request a save-and-stop (empty: leave signal handling to Lightning).
        exit_code: the status to exit with after a stop request's save (None: return from ``fit``).
        heartbeat_interval: seconds between heartbeat touches (``resumekit run --hang-timeout``).
        metrics_every: a ``metrics`` event every N steps (None: the Trainer's ``log_every_n_steps``; 0: never).
    """

    def __init__(
        self,
        *,
        manifest: bool = True,
        rng: bool = True,
        signals: Iterable[int] = (signal.SIGTERM,),
        exit_code: int | None = 0,
        heartbeat_interval: float = 1.0,
        metrics_every: int | None = None,
    ):
        self.manifest = manifest
        self.rng = rng
        self.signals = tuple(signals)
        self.exit_code = exit_code
        self.heartbeat_interval = heartbeat_interval
        self.metrics_every = metrics_every
        self.reporter: JobReporter | None = None
        self.stop_requested = False
        self.preempted_at: int | None = None
        self.preempted_path: str | None = None
        self._pending_rng: dict[str, Any] | None = None
        self._previous: dict[int, Any] = {}
        self._world = 1
        self._rank = 0

    # --- set-up -------------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Before Lightning restores a checkpoint, so its load goes through our verification and allow-list.
        every = self.metrics_every if self.metrics_every is not None else trainer.log_every_n_steps
        self.reporter = JobReporter(
            "lightning",
            leads_job=trainer.is_global_zero,
            leads_node=trainer.local_rank == 0,
            heartbeat_interval=self.heartbeat_interval,
            metrics_every=every,
        )
        self._world, self._rank = trainer.world_size, trainer.global_rank
        if not install_checkpoint_io(trainer, self.reporter, self.manifest) and self.manifest:
            log.info("resumekit: %s saves bypass CheckpointIO: no sidecar manifests", type(trainer.strategy).__name__)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = trainer.ckpt_path
        if self.reporter is not None:
            self.reporter.restored(trainer.global_step if path else 0, str(path) if path else None)
        if self._pending_rng is not None:
            # The last hook before the first batch is fetched when Lightning resumes mid-epoch (it then skips
            # on_train_epoch_start): the straight run drew nothing between its save and that fetch either.
            restore_rng_plain(self._pending_rng)
            self._pending_rng = None
        self.stop_requested = False
        self.preempted_at = None
        # After Lightning's own handler (installed once the checkpoint is restored), which outside SLURM only
        # raises SystemExit at the end of the epoch without saving: ours replaces it for the run.
        self._install_handlers()

    # --- state: every RNG, per rank -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.rng:
            return {}
        mine = capture_rng_plain()
        ranks: list[Any] = [mine]
        if self._world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank runs dump_checkpoint; rank 0 writes the file, so it carries each rank's state.
            ranks = [None] * self._world
            torch.distributed.all_gather_object(ranks, mine)
        return {"version": 1, "rng": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("rng") or []
        if not ranks:
            return
        if len(ranks) != self._world and self._world > 1:
            log.warning(
                "resumekit: checkpoint holds RNG states of %d ranks, this run has %d: each rank takes rank %d's "
                "mod the saved count (the resumed run is not bitwise equal to a straight one)",
                len(ranks),
                self._world,
                self._rank,
            )
        self._pending_rng = ranks[self._rank % len(ranks)]

    # --- every step ---------------------------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        rep = self.reporter
        if rep is not None:
            if rep.metrics_due(step):
                loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
                metrics = {k: v for k, v in trainer.callback_metrics.items() if isinstance(k, str)}
                if loss is not None:
                    metrics["loss"] = loss
                rep.step(step, metrics)
            else:
                rep.step(step)
        requested = self.stop_requested
        if self._world > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested and self.preempted_at is None:
            self.preempted_path = _save_for_stop(trainer)
            self.preempted_at = step
            trainer.should_stop = True
            if rep is not None:
                rep.preempted(step)
            log.warning("resumekit: stop requested: saved step %d to %s", step, self.preempted_path)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kw: Any) -> None:
        if self.reporter is not None:
            self.reporter.beat(trainer.global_step)  # a long validation is not a hang

    # --- the end --------------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore_handlers()
        if self.preempted_at is not None and self.exit_code is not None:
            # Leave before the script goes on as if training had finished (tests, exports, "done" markers).
            log.warning("resumekit: exiting with status %d after the stop request's save", self.exit_code)
            raise SystemExit(self.exit_code)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore_handlers()

    # --- signals ------------------------------------------------------------------------------------------------
    def _handler(self, signum: int, frame: Any) -> None:
        if self.stop_requested:
            # Second signal: the sender will not wait for the save; terminate as if we were never installed.
            self._restore_handlers()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.stop_requested = True
        log.warning("resumekit: signal %d: saving a checkpoint at the end of this step, then stopping", signum)

    def _install_handlers(self) -> None:
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, prev in self._previous.items():
            try:
                if signal.getsignal(sig) == self._handler:
                    signal.signal(sig, prev)
            except (TypeError, ValueError):
                pass
        self._previous.clear()


def _save_for_stop(trainer: Trainer) -> str:
    """Save this step where ModelCheckpoint would, with its name (and ``last`` when it keeps one), and mark the step
    saved so it does not save it again at the epoch end that the stop triggers."""
    cb = trainer.checkpoint_callback
    step = trainer.global_step
    if isinstance(cb, ModelCheckpoint) and cb.dirpath and hasattr(cb, "_save_checkpoint"):
        if getattr(cb, "_last_global_step_saved", None) == step and getattr(cb, "_last_checkpoint_saved", None):
            return str(cb._last_checkpoint_saved)  # it saved this very step already
        candidates = cb._monitor_candidates(trainer)
        path = cb.format_checkpoint_name(candidates)
        cb._save_checkpoint(trainer, path)
        cb._save_last_checkpoint(trainer, candidates)  # `ckpt_path="last"` must find this step
        return path
    path = os.path.join(str(trainer.default_root_dir), "checkpoints", f"preempted-step={step}.ckpt")
    trainer.save_checkpoint(path)
    return path
