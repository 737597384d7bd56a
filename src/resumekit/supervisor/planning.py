"""Planning one start of the job (:class:`StartPlanner`): pre-checks, the newest valid checkpoint (pre-downloaded
into the local tier when there is one), crash-loop handling, moving invalid checkpoints out of the framework's
sight, tracker repair, the choice of checkpoint, the ``--config`` rewrite (and putting it back at the end), and the
environment that hands it all to the job.

Many frameworks pick their checkpoint by themselves: the HF Trainer and LLaMA-Factory take the highest
``checkpoint-N`` (``resume_from_checkpoint: null`` or ``true``), Lightning its ``last.ckpt``, DeepSpeed, Megatron
and VeRL what their tracker names. Before every start the invalid ones they would pick go into ``quarantine/``
(never deleted; :meth:`~resumekit.layouts.base.Layout.hide_invalid`) and trackers are repaired, so the framework's
own choice is the newest valid checkpoint, or nothing (a fresh start), whatever the job does with
``RESUMEKIT_RESUME_FROM``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..events import (
    ENV_DIR,
    ENV_EVENTS,
    ENV_HEARTBEAT,
    ENV_LOCAL_TIER,
    ENV_RESTART_COUNT,
    ENV_RESUME_FROM,
    ENV_RESUME_MODE,
)
from ..format import MANIFEST, NODE_FILE
from ..storage.deadline import ENV_GRACE
from ..storage.verified import ENV_VERIFIED
from ..units import format_bytes, one_line
from ..verify import record_hashed
from .configfile import ConfigRewriter
from .context import RunContext, StartPlan
from .crashloop import CrashLoopGuard, hide_out_of_sight
from .prechecks import (
    PrecheckError,
    check_directory,
    check_free_space,
    check_hardware,
    check_remote,
    check_resume,
)
from .summary import AttemptRecord


def checkpoint_size(storage: Any, info: Any) -> int:
    """Bytes of a checkpoint: its listed size, else what is on local disk; 0 when unknown.

    Args:
        storage: the storage it lives in.
        info: the checkpoint (None: no checkpoint).

    Returns:
        Its size in bytes.
    """
    if info is None:
        return 0
    if info.size:
        return int(info.size)
    path = storage.local_path(info.name)
    if not path:
        return 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class StartPlanner:
    """Prepares every start: :meth:`plan` runs before it, :meth:`job_env` builds the job's environment.

    Args:
        ctx: the run's options, paths, event log and progress output.
    """

    def __init__(self, ctx: RunContext):
        self.opts, self.paths, self.log, self.say = ctx.options, ctx.paths, ctx.log, ctx.say
        self.crash_loop = CrashLoopGuard(ctx, rediscover=self.discover)
        self._initial_names: set | None = None  # checkpoints there before the first start
        self._skips_logged: set = set()
        self._skipped: list = []  # the newer invalid checkpoints of the last discover()
        #: invalid checkpoints moved out of the framework's sight so far
        self.hidden = 0
        self._tier_warned: set[str] = set()
        self.config = ConfigRewriter(ctx, self._skip_once)

    def plan(self, prev: AttemptRecord | None, last_plan: StartPlan) -> StartPlan:
        """Pre-checks, crash-loop handling and the choice of checkpoint for the next start.

        Args:
            prev: the attempt before (None before the first start).
            last_plan: what ``prev`` was started with.

        Returns:
            The plan for the next start (``precheck_s`` is filled in by the caller).

        Raises:
            PrecheckError: a pre-check failed.
            GiveUp: a crash loop with nothing left to quarantine.
        """
        plan = StartPlan()
        directory = self.paths.directory
        storage = None
        if directory:
            if self.paths.remote:
                check_remote(directory, self.opts.remote_timeout)
            else:
                # A Lightning version_N the job has not made yet is left for it to make (see check_directory).
                local_dir: str = self.paths.local_dir  # type: ignore[assignment]
                check_directory(local_dir, create=not self.paths.lightning_logger_dir)
            if self.opts.local_tier:
                check_directory(self.opts.local_tier)
            storage = self._open_storage()
        if self.opts.gpus:
            report = check_hardware(self.opts.gpus, self.opts.hardware_timeout)
            self.log.emit("hardware_check", **report)

        best = layout = None
        if storage is not None:
            # Every file hashed on the way is recorded (fstat identity + digest), so the job can be told which bytes
            # it need not hash again (see _verified_token).
            with record_hashed() as hashed:
                layout, best, tier_best = self._find_best(storage, prev, last_plan, plan)
            if best is not None and layout is not None and layout.name == "native" and self.opts.resume != "never":
                plan.verified = self._verified_token(storage, best, tier_best, hashed)
            free = storage.free_bytes()
            if free is not None:
                check_free_space(storage.uri, free, checkpoint_size(storage, best), self.opts.min_free)
            if self.opts.local_tier:
                self._check_tier_space(best)
            if layout.tracker_name:
                self._repair(storage, layout)
        elif prev is not None:
            self.crash_loop.after_attempt(None, None, None, prev, last_plan)

        self._choose_resume(plan, layout, best)
        if self.opts.config:
            self.hidden += self.config.resolve(plan)
        plan.candidates = bool(plan.resume_path) or best is not None
        return plan

    def _find_best(self, storage: Any, prev: AttemptRecord | None, last_plan: StartPlan, plan: StartPlan) -> Any:
        """Layout and newest valid checkpoint after the crash-loop rule, pre-downloaded into the local tier when
        there is one; returns ``(layout, best, whether best is in the local tier)``."""
        layout, best = self.discover(storage)
        plan.newest_step = best.step if best else None
        if self._initial_names is None:
            self._initial_names = {i.name for i in layout.list(storage)}
        if prev is not None:
            best = self.crash_loop.after_attempt(storage, layout, best, prev, last_plan)
            plan.newest_step = best.step if best else None
        self._hide_invalid(storage, layout, best)
        if self.opts.local_tier and layout.name == "native":
            return layout, self._predownload(storage, best), True
        return layout, best, False

    def _verified_token(self, storage: Any, best: Any, in_tier: bool, hashed: Any) -> str | None:
        """The ``RESUMEKIT_VERIFIED`` token for ``best`` when this start hashed every one of its files (a local
        native checkpoint verified in full), so the job's restore skips hashing them again; None otherwise (the job
        then hashes while reading, as always)."""
        from ..storage.local import LocalStorage
        from ..storage.verified import issue_token

        st = LocalStorage(self.opts.local_tier) if in_tier else storage  # type: ignore[arg-type]
        return issue_token(st, best.name, hashed)

    def _check_tier_space(self, best: Any) -> None:
        """The local tier holds the newest checkpoint and the next one beside it (and, on tmpfs, that much RAM).

        Raises:
            PrecheckError: too little free space there (or below ``--min-free``).
        """
        from ..storage.local import LocalStorage
        from ..storage.memtier import in_memory, mem_available, tier_space_verdict

        tier: str = self.opts.local_tier  # type: ignore[assignment]
        free = LocalStorage(tier).free_bytes()
        memory = in_memory(tier)
        verdict = tier_space_verdict(
            tier,
            free=free,
            checkpoint_bytes=int(best.size or 0) if best else 0,
            keep=None,  # the job's retention is not known here: the newest plus the next save
            memory=memory,
            available=mem_available() if memory else None,
        )
        if verdict is not None and verdict[0] == "error":
            raise PrecheckError("free-space", verdict[1])
        if verdict is not None and verdict[1] not in self._tier_warned:
            self._tier_warned.add(verdict[1])
            self.log.emit("tier_space", level=verdict[0], tier=tier, in_memory=memory, message=verdict[1])
            self.say(f"warning: {verdict[1]}")
        check_free_space(tier, free, 0, self.opts.min_free)

    def job_env(self, plan: StartPlan, index: int) -> dict[str, str]:
        """The job's environment: the supervisor's own, ``options.env``, and the resume hand-off.

        Args:
            plan: what this start resumes from.
            index: 1 for the first start.

        Returns:
            The environment for ``Popen``.
        """
        env = dict(os.environ)
        if self.opts.env:
            env.update(self.opts.env)
        if plan.resume_path:
            env[ENV_RESUME_FROM] = plan.resume_path
        else:
            # Unset, not "": jobs pass it straight on (trainer.train(resume_from_checkpoint=...)), and "" is
            # neither None nor a path to them.
            env.pop(ENV_RESUME_FROM, None)
        env[ENV_RESTART_COUNT] = str(index - 1)
        env[ENV_DIR] = self.paths.local_dir or self.paths.directory or ""
        env[ENV_HEARTBEAT] = self.paths.heartbeat_path
        env[ENV_EVENTS] = self.paths.events_path
        env[ENV_RESUME_MODE] = "never" if self.opts.resume == "never" else "auto"
        if self.opts.force and index == 1:
            # --force: the first start may take the root's writer lease from a holder known to be dead; later
            # starts follow our own job, whose lease died with it.
            env["RESUMEKIT_TAKEOVER"] = "1"
        else:
            env.pop("RESUMEKIT_TAKEOVER", None)
        if self.opts.local_tier:
            env[ENV_LOCAL_TIER] = self.opts.local_tier
        if plan.verified and plan.resume_path:
            env[ENV_VERIFIED] = plan.verified
        else:
            env.pop(ENV_VERIFIED, None)  # never one inherited from an outer run or the shell
        # The library cuts remote transfers at the end of this grace period once SIGTERM arrives, so a save stuck on
        # an unresponsive store ends the job before --grace's SIGKILL would.
        env[ENV_GRACE] = f"{self.opts.grace:g}"
        if any(os.path.basename(str(a)) == "torchrun" or str(a) == "torch.distributed.run" for a in self.opts.command):
            # torch 2.x elastic restarts can reuse the previous attempt's rendezvous store and fail to connect
            # (pytorch#135712); a fresh store per restart avoids it.
            env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
        return env

    def discover(self, storage: Any) -> tuple[Any, Any]:
        """Layout and newest valid checkpoint (checksums verified); newer invalid ones are logged once each.

        Args:
            storage: the checkpoint root.

        Returns:
            ``(layout, newest valid checkpoint or None)``.

        Raises:
            PrecheckError: the checkpoints cannot be listed.
        """
        from ..layouts import resolve_layout

        try:
            layout = resolve_layout(storage, self.opts.layout)
            # With a local tier the newest remote checkpoint is verified while it is pre-downloaded: hashing it
            # here as well would read it from the remote twice.
            full = not (self.opts.local_tier and layout.name == "native")
            best, skipped = layout.latest(storage, full=full)
            self._skipped = list(skipped)
        except OSError as e:
            raise PrecheckError(
                "checkpoint", f"cannot list checkpoints under {storage.uri}: {one_line(e)}", retry=self.paths.remote
            ) from None
        except Exception as e:  # noqa: BLE001 - a broken layout adapter stops the run in one line, not a traceback
            raise PrecheckError(
                "checkpoint",
                f"cannot look for checkpoints under {storage.uri} (layout "
                f"{self.opts.layout}): {type(e).__name__}: {one_line(e)}",
            ) from None
        for s in skipped:
            self._skip_once(
                (s.name, s.reason), s.path, s.reason, step=s.step, path=s.path, layout=layout.name, reason=s.reason
            )
        return layout, best

    def _hide_invalid(self, storage: Any, layout: Any, best: Any) -> None:
        """Move the invalid checkpoints the framework would pick by itself out of its sight (``quarantine/``)."""
        hidden = hide_out_of_sight(storage, layout, best, self._skipped, self.log, self.say)
        self.hidden += hidden
        if hidden:
            self._skipped = []

    def _skip_once(self, key: tuple[Any, Any], shown_path: Any, shown_reason: Any, /, **fields: Any) -> None:
        # Every start looks again: an invalid checkpoint is reported the first time it is met, not every start.
        if key in self._skips_logged:
            return
        self._skips_logged.add(key)
        self.log.emit("skip_invalid", **fields)
        self.say(f"skipping invalid checkpoint {shown_path}: {shown_reason}")

    def _predownload(self, storage: Any, remote_best: Any) -> Any:
        """The newest valid checkpoint of either tier, as a local-tier path: a newer remote one is downloaded
        first (parallel ranged reads, checksums verified, tmp dir + rename), so the job never waits on the remote."""
        from ..errors import CorruptCheckpointError
        from ..layouts.base import CheckpointInfo
        from ..layouts.native import NativeLayout
        from ..storage.local import LocalStorage
        from ..storage.tiered import copy_step

        local = LocalStorage(self.opts.local_tier)  # type: ignore[arg-type]
        layout = NativeLayout()
        local_best, skipped = layout.latest(local, full=True)
        # A sharded job's node tier keeps, per step, only the files of this node's ranks (node.json says which): a
        # cache of the remote step, not a checkpoint, so not reported as invalid. One with the remote newest's very
        # manifest needs no download: the job's ranks agree on it and read it there.
        node_copies = {sk.name for sk in skipped if local.exists(f"{sk.name}/{NODE_FILE}")}
        if (
            remote_best is not None
            and remote_best.name in node_copies
            and _same_manifest(storage, local, remote_best.name)
        ):
            return CheckpointInfo(
                step=remote_best.step,
                name=remote_best.name,
                path=local.join(remote_best.name),
                layout="native",
                valid=True,
            )
        for sk in skipped:
            if sk.name in node_copies:
                continue
            self._skip_once(
                (local.join(sk.name), sk.reason),
                sk.path,
                sk.reason,
                step=sk.step,
                path=sk.path,
                layout="native",
                reason=sk.reason,
                tier="local",
            )
        if remote_best is None or (local_best is not None and local_best.step >= remote_best.step):
            return local_best
        # Room first: a download into a full tmpfs tier would take the machine's RAM, not just fail.
        self._check_tier_space(remote_best)
        # Newest first; one that fails verification on the way down is skipped like any invalid checkpoint.
        floor = local_best.step if local_best is not None else -1
        for cand in sorted(
            (i for i in layout.list(storage) if floor < i.step <= remote_best.step), key=lambda i: i.step, reverse=True
        ):
            t0 = time.monotonic()
            try:
                man = copy_step(storage, local, cand.name, desc=f"download {cand.name}")
            except CorruptCheckpointError as e:
                self._skip_once(
                    (cand.path, e.reason),
                    cand.path,
                    e.reason,
                    step=cand.step,
                    path=cand.path,
                    layout="native",
                    reason=e.reason,
                )
                continue
            except OSError as e:
                raise PrecheckError(
                    "remote", f"cannot download {cand.path} to {local.join(cand.name)}: {one_line(e)}", retry=True
                ) from None
            secs = time.monotonic() - t0
            self.log.emit(
                "download",
                step=cand.step,
                path=cand.path,
                to=local.join(cand.name),
                bytes=man.total_bytes,
                seconds=round(secs, 3),
            )
            self.say(
                f"downloaded {cand.path} to {local.join(cand.name)} ({format_bytes(man.total_bytes)} in {secs:.1f} s)"
            )
            info = CheckpointInfo(step=cand.step, name=cand.name, path=local.join(cand.name), layout="native")
            return layout.validate(local, info, full=False)
        return local_best

    def _open_storage(self) -> Any:
        from ..storage import open_storage

        directory = self.paths.directory
        try:
            return open_storage(directory, create=False)  # type: ignore[arg-type]
        except ImportError as e:
            raise PrecheckError(
                "remote", f"cannot open {directory}: {one_line(e)}; install it with pip install 'resumekit[s3]'"
            ) from None
        except OSError as e:
            raise PrecheckError(
                "directory", f"cannot open {directory}: {one_line(e)}", retry=self.paths.remote
            ) from None

    def _repair(self, storage: Any, layout: Any) -> None:
        try:
            res = layout.repair(storage)
        except Exception as e:  # noqa: BLE001 - a broken tracker repair is reported, the start goes on
            self.log.emit("repair", layout=layout.name, ok=False, error=one_line(e))
            self.say(f"could not repair the {layout.name} tracker under {storage.uri}: {one_line(e)}")
            return
        if res is None:
            return
        self.log.emit(
            "repair",
            layout=layout.name,
            ok=True,
            tracker=res.tracker,
            old=res.old,
            new=res.new,
            changed=res.changed,
            backup=res.backup,
            message=res.message,
        )
        if res.changed:
            self.say(f"repaired {res.message}")

    def _choose_resume(self, plan: StartPlan, layout: Any, best: Any) -> None:
        mode = self.opts.resume
        if mode == "never":
            return
        if mode == "auto":
            if best is not None:
                plan.resume_path, plan.resume_step = best.path, best.step
            return
        # An explicit checkpoint: used until this run writes a newer one of its own.
        if best is not None and self._initial_names is not None and best.name not in self._initial_names:
            plan.resume_path, plan.resume_step = best.path, best.step
            return
        info = check_resume(mode, self.opts.layout)
        plan.resume_path, plan.resume_step = info.path, info.step

    def restore_config(self) -> None:
        """Put ``--config`` back as the user wrote it (see :meth:`ConfigRewriter.restore`)."""
        self.config.restore()


def _same_manifest(a: Any, b: Any, name: str) -> bool:
    """Both roots hold ``name`` with byte-identical manifests."""
    try:
        return bool(a.read_bytes(f"{name}/{MANIFEST}") == b.read_bytes(f"{name}/{MANIFEST}"))
    except OSError:
        return False


__all__ = ["StartPlanner", "checkpoint_size"]
