"""HF Trainer integration: checksummed, durable ``checkpoint-N`` directories and a save on preemption.

``ResumekitCallback`` makes two additions to a Trainer run (LLaMA-Factory included, through its ``callbacks``):

* after every save (``on_save``, which transformers calls once ``_save_checkpoint`` has written every file,
  ``trainer_state.json`` last, and rotated old checkpoints; transformers 4.4x and 5.x write straight into
  ``checkpoint-N``, there is no temporary directory to wait for), it fsyncs the checkpoint's files and writes
  ``resumekit.manifest.json`` (sizes and xxh3 checksums, atomic write) into it. ``resumekit latest --layout hf``
  then verifies that checkpoint by checksum instead of by file headers;
* on SIGTERM (what schedulers and ``resumekit run`` send before killing) it asks the Trainer to save and stop at the
  end of the current step, then exits with status 143 (128 + SIGTERM) so a supervisor sees an interrupted job, not
  a finished one. A second SIGTERM falls back to the previous handler (by default: terminate now);
* the evidence ``resumekit run`` acts on: a ``restore`` event when training begins (the step the Trainer resumed
  at and the ``checkpoint-N`` it came from; step 0 and no path from scratch), the heartbeat at every step and
  evaluation batch (``--hang-timeout``), ``metrics`` events at the Trainer's logging steps, ``save`` events.

The Trainer resumes from ``train(resume_from_checkpoint=...)``: pass ``os.environ.get("RESUMEKIT_RESUME_FROM") or
None`` (the variable is unset when ``resumekit run`` found nothing valid; ``True`` would take the highest
``checkpoint-N`` unchecked). LLaMA-Factory reads ``resume_from_checkpoint`` from its YAML, which ``resumekit run
--config`` rewrites. The Trainer restores model, optimizer, scheduler, scaler, data position (it skips the batches
already seen) and RNGs itself: resumed runs end bitwise equal to straight ones on CPU.

transformers is imported here only; nothing else in resumekit needs it.

Example::

    from resumekit.integrations.hf import ResumekitCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ResumekitCallback()])
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable

from transformers import TrainerCallback

from ..format import FOREIGN_MANIFEST, FileEntry, Manifest, metadata_jsonable
from ..storage.local import LocalStorage, fsync_dir
from ..verify import hash_file
from ._report import JobReporter

log = logging.getLogger("resumekit")

#: the manifest's file name inside ``checkpoint-N`` (the hf layout looks for the same name)
MANIFEST_NAME = FOREIGN_MANIFEST
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


def checkpoint_files(ckpt_dir: str) -> list[str]:
    """Every file under ``ckpt_dir`` as a sorted relative POSIX path, the manifest and temp files excluded."""
    out = []
    for root, dirs, files in os.walk(ckpt_dir):
        dirs.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), ckpt_dir).replace(os.sep, "/")
            if rel == MANIFEST_NAME or (name.startswith(".") and name.endswith(".tmp")):
                continue
            out.append(rel)
    return sorted(out)


def fsync_tree(ckpt_dir: str, files: Iterable[str] | None = None) -> None:
    """fsync every file and directory of a checkpoint, so the manifest never names data still in the page cache."""
    dirs = {ckpt_dir}
    for rel in files if files is not None else checkpoint_files(ckpt_dir):
        path = os.path.join(ckpt_dir, rel)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        dirs.add(os.path.dirname(path))
    for d in sorted(dirs, key=len, reverse=True):
        fsync_dir(d)


def write_manifest(ckpt_dir: str, step: int, metadata: dict | None = None) -> Manifest:
    """Checksum every file of ``ckpt_dir`` and write ``resumekit.manifest.json`` into it atomically (last).

    Args:
        ckpt_dir: a complete checkpoint directory (``checkpoint-N``).
        step: its global step.
        metadata: JSON-able extras stored in the manifest.

    Returns:
        The manifest written.
    """
    storage = LocalStorage(ckpt_dir, create=False)
    entries: dict[str, FileEntry] = {}
    for rel in checkpoint_files(ckpt_dir):
        size, digest = hash_file(storage, rel)
        entries[rel] = FileEntry(size, digest)
    man = Manifest(step=step, files=entries, metadata=metadata_jsonable(metadata))
    storage.write_bytes_atomic(MANIFEST_NAME, man.to_json())
    return man


class ResumekitCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` adding checksummed manifests and a save on SIGTERM.

    Args:
        manifest: write ``resumekit.manifest.json`` after every save.
        signals: the signals that request a save-and-stop (empty: leave signal handling alone).
        exit_code: the status to exit with once the preemption save is done (None: return from ``train()``).
        sync_preemption: in multi-process runs, agree on the stop request across ranks at every step end (one
            tiny all-reduce), so every rank saves at the same step.
        heartbeat_interval: seconds between heartbeat touches (``resumekit run --hang-timeout``).
    """

    def __init__(
        self,
        *,
        manifest: bool = True,
        signals: Iterable[int] = (signal.SIGTERM,),
        exit_code: int | None = PREEMPTED_EXIT_CODE,
        sync_preemption: bool = True,
        heartbeat_interval: float = 1.0,
    ):
        self.manifest = manifest
        self.heartbeat_interval = heartbeat_interval
        self.reporter: JobReporter | None = None
        self.signals = tuple(signals)
        self.exit_code = exit_code
        self.sync_preemption = sync_preemption
        self.preempt_requested = False
        self.preempted_at: int | None = None
        self._previous: dict[int, object] = {}

    # --- signals ------------------------------------------------------------------------------------------------

    def _handler(self, signum, frame) -> None:
        if self.preempt_requested:
            # Second signal: the save is taking too long for the sender; behave as if we were never installed.
            self._restore_handlers()
            os.kill(os.getpid(), signum)
            return
        self.preempt_requested = True
        log.warning("signal %d received: saving a checkpoint at the end of this step, then stopping", signum)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("ResumekitCallback: not on the main thread, cannot install a SIGTERM handler")
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, prev in self._previous.items():
            try:
                signal.signal(sig, prev)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                pass
        self._previous.clear()

    # --- TrainerCallback hooks ----------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self.preempt_requested = False
        self.preempted_at = None
        self._install_handlers()
        self.reporter = JobReporter(
            "hf",
            leads_job=state.is_world_process_zero,
            leads_node=state.is_local_process_zero,
            heartbeat_interval=self.heartbeat_interval,
            metrics_every=0,  # metrics come from on_log, at the Trainer's own logging steps
        )
        # The Trainer has loaded the checkpoint by now; it keeps no record of which, so name the checkpoint-N of
        # the step it resumed at (where it came from, unless resume_from_checkpoint named another directory).
        step = state.global_step
        self.reporter.restored(step, resumed_from(args, step) if step else None)

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter is not None:
            self.reporter.step(state.global_step)
        requested = self.preempt_requested
        if self.sync_preemption and args.world_size > 1:
            requested = _any_rank(requested, args)
        if requested and self.preempted_at is None:
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.reporter is not None:
            self.reporter.beat(state.global_step)  # a long evaluation is not a hang

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.reporter is not None and logs:
            self.reporter.metrics(state.global_step, logs)

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        ckpt_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.manifest:
            self._write_manifest(args, state, ckpt_dir)
        if self.reporter is not None and os.path.isdir(ckpt_dir):
            self.reporter.saved(state.global_step, ckpt_dir)  # after the manifest: the checkpoint is complete
        return control

    def _write_manifest(self, args, state, ckpt_dir: str) -> None:
        if not os.path.isdir(ckpt_dir):
            log.warning(
                "ResumekitCallback: %s not found after a save (hyperparameter search run dir?); no manifest written",
                ckpt_dir,
            )
            return
        if state.is_local_process_zero:
            fsync_tree(ckpt_dir)
        _barrier(args)  # every rank's files are durable before rank 0 checksums them
        if state.is_world_process_zero:
            man = write_manifest(
                ckpt_dir,
                state.global_step,
                {"layout": "hf", "writer": "resumekit.integrations.hf", "epoch": state.epoch},
            )
            log.info("resumekit: %s: manifest of %d files written", ckpt_dir, len(man.files))

    def on_train_end(self, args, state, control, **kwargs):
        self._restore_handlers()
        if self.preempted_at is not None and self.exit_code is not None:
            log.warning(
                "resumekit: checkpoint saved at step %d after a stop request; exiting with status %d",
                self.preempted_at,
                self.exit_code,
            )
            raise SystemExit(self.exit_code)
        return control


def resumed_from(args, step: int) -> str | None:
    """The ``checkpoint-N`` a Trainer that resumed at ``step`` came from: ``args.resume_from_checkpoint`` when it
    names a directory of that step (LLaMA-Factory passes it), else ``output_dir/checkpoint-<step>`` if it exists."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    named = getattr(args, "resume_from_checkpoint", None)
    if isinstance(named, str) and os.path.basename(os.path.normpath(named)) == f"{PREFIX_CHECKPOINT_DIR}-{step}":
        return named
    own = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    return own if os.path.isdir(own) else None


def _barrier(args) -> None:
    if getattr(args, "world_size", 1) <= 1:
        return
    state = getattr(args, "distributed_state", None)
    if state is not None:
        state.wait_for_everyone()
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _any_rank(flag: bool, args) -> bool:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
