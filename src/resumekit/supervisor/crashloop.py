"""Crash-loop handling: count failures in a row without progress and, at the limit, quarantine the checkpoint the
job keeps failing from (renamed, never deleted), so the next start resumes from the one before it.

The rule itself is pure (:func:`~resumekit.supervisor.decisions.is_crash_loop`); this module does the I/O around it.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Tuple

from ..format import QUARANTINE_PREFIX
from ..units import one_line
from .context import RunContext, StartPlan
from .decisions import is_crash_loop, made_progress, next_streak
from .summary import AttemptRecord


class GiveUp(Exception):
    """Nothing is left to try (crash loop with no checkpoint to quarantine)."""


def quarantine(storage: Any, info: Any, now: Optional[float] = None) -> str:
    """Move a checkpoint aside so no discovery finds it again; it is renamed, never deleted.

    ``step_000000100`` becomes ``quarantined-step_000000100-20250101T120000``. The time goes last so suffix-based
    discovery (``*.ckpt``, ``ckpt_N.pth``) no longer matches, and the prefix so ``^step_\\d+$``-style patterns
    do not either. Works for directories and single-file checkpoints, through ``storage.rename``.

    Args:
        storage: the storage the checkpoint lives in.
        info: the checkpoint (its ``name`` relative to the storage root).
        now: the time stamped into the new name (default: now).

    Returns:
        The new name relative to the storage root.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(now if now is not None else time.time()))
    head, _, base = info.name.rstrip("/").rpartition("/")
    new_base = f"{QUARANTINE_PREFIX}{base}-{stamp}"
    new = f"{head}/{new_base}" if head else new_base
    n = 1
    while storage.exists(new):  # a second quarantine of the same name within one second
        n += 1
        new = f"{head}/{new_base}-{n}" if head else f"{new_base}-{n}"
    storage.rename(info.name, new)
    return new


class CrashLoopGuard:
    """Follows the failure streak across attempts and quarantines the checkpoint of a crash loop.

    Args:
        ctx: the run's options (``crash_loop``, ``layout``, ``local_tier``), event log and progress output.
        rediscover: ``storage -> (layout, newest valid checkpoint)``, to name what the next start resumes from.
    """

    def __init__(self, ctx: RunContext, rediscover: Callable[[Any], Tuple[Any, Any]]):
        self.opts, self.log, self.say = ctx.options, ctx.log, ctx.say
        self.rediscover = rediscover
        #: failures in a row without progress
        self.streak = 0
        #: checkpoints quarantined so far
        self.quarantined = 0
        self._counted_attempt = 0

    def after_attempt(self, storage: Any, layout: Any, best: Any, prev: AttemptRecord, last_plan: StartPlan) -> Any:
        """Update the failure streak from the last attempt; quarantine its checkpoint when it crash-loops.

        Args:
            storage: the checkpoint root (None without ``--dir``).
            layout: its layout.
            best: the newest valid checkpoint found now.
            prev: the attempt that just ended.
            last_plan: what that attempt was started with.

        Returns:
            The newest valid checkpoint to resume from next (``best``, or its predecessor after a quarantine).

        Raises:
            GiveUp: a crash loop with nothing left to quarantine, or a quarantine that failed.
        """
        if self._counted_attempt == prev.index:  # a retried pre-check: this attempt was already counted
            return best
        self._counted_attempt = prev.index
        progressed = made_progress(last_plan.newest_step, best.step if best else None, prev.resume_step, prev.last_step)
        self.streak = next_streak(self.streak, prev.failure, progressed)
        if not is_crash_loop(self.streak, self.opts.crash_loop):
            return best
        k = self.streak
        own_root = last_plan.resume_root is None
        if not own_root:
            try:
                from ..layouts import resolve_layout
                from ..storage import open_storage

                storage = open_storage(last_plan.resume_root, create=False)
                layout = resolve_layout(storage, self.opts.layout)
            except Exception as e:  # noqa: BLE001 - reported as the reason we give up
                raise GiveUp(
                    f"crash loop: cannot open {last_plan.resume_root} to quarantine "
                    f"{last_plan.resume_path} ({one_line(e)}); move it aside by hand"
                ) from None
        if last_plan.resume_name is None or storage is None:
            origin = f"from {last_plan.resume_path}" if last_plan.resume_path else "from scratch"
            raise GiveUp(
                f"crash loop: the job failed {k} times in a row starting {origin} without progress, "
                "and there is no checkpoint left to quarantine; giving up"
            )
        if own_root and self.opts.local_tier:
            # The job resumed from the local tier's copy: it goes aside too, or the next pre-download picks it again.
            self._quarantine_local(last_plan.resume_name, k)
        info = next((i for i in layout.list(storage) if i.name == last_plan.resume_name), None)
        if info is None:  # it vanished (gc, a person); nothing to quarantine, just go on with what is there
            self.streak = 0
            return best
        try:
            new = quarantine(storage, info)
        except OSError as e:
            raise GiveUp(
                f"crash loop: cannot quarantine {info.path} ({one_line(e)}); move it aside by hand and start again"
            ) from None
        self.quarantined += 1
        self.streak = 0
        _, best2 = self.rediscover(storage)
        self.log.emit(
            "quarantine",
            step=info.step,
            path=info.path,
            to=storage.join(new),
            failures=k,
            layout=layout.name,
            reason=f"{k} failures in a row without progress",
            next_step=best2.step if best2 else None,
            next_path=best2.path if best2 else None,
        )
        nxt = f"resuming from {best2.path}" if best2 else "no valid checkpoint left: starting from scratch"
        self.say(
            f"crash loop: the job failed {k} times in a row after resuming from {info.path}; quarantined "
            f"it as {storage.join(new)}; {nxt}"
        )
        # A checkpoint found through --config lives outside --dir: the YAML's next search finds its predecessor.
        return best2 if own_root else best

    def _quarantine_local(self, name: str, failures: int) -> None:
        from ..layouts.base import CheckpointInfo
        from ..storage.local import LocalStorage

        local = LocalStorage(self.opts.local_tier)  # type: ignore[arg-type]
        if not local.exists(name):
            return
        try:
            new = quarantine(local, CheckpointInfo(step=-1, name=name, path=local.join(name), layout="native"))
        except OSError as e:
            raise GiveUp(
                f"crash loop: cannot quarantine {local.join(name)} ({one_line(e)}); move it aside by "
                "hand and start again"
            ) from None
        self.log.emit(
            "quarantine",
            path=local.join(name),
            to=local.join(new),
            failures=failures,
            tier="local",
            reason=f"{failures} failures in a row without progress",
        )


__all__ = ["CrashLoopGuard", "GiveUp", "quarantine"]
