"""Moving checkpoints aside, never deleting them: invalid ones out of the framework's sight before every start
(:func:`hide_out_of_sight`), and the checkpoint of a crash loop (:class:`CrashLoopGuard`).

Crash-loop handling on evidence: follow the failures in a row without progress and, when the last
``crash_loop`` of them all crashed right after the job reported loading the same checkpoint, re-verify that
checkpoint and quarantine it (renamed, never deleted), so the next start resumes from the one before it.

What counts (the rules are pure: :func:`~resumekit.supervisor.decisions.evidence_of` and
:func:`~resumekit.supervisor.decisions.crash_loop_verdict`):

* only what the job itself reported loading (its ``restore`` event) names a checkpoint; what the supervisor handed
  over may not be what a framework that picks by itself loaded;
* a death by an outside signal (SIGKILL or SIGTERM with no traceback: the OOM killer, a preemption), a hang or a
  preemption is no evidence against any checkpoint: it neither counts nor ends the streak;
* progress (a reported step past the one resumed from, or a new valid checkpoint) or a success ends the streak;
* a job that reported nothing leaves the checkpoint "unknown": the supervisor then quarantines nothing and, at the
  limit, gives up saying so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from ..layouts.base import move_aside
from ..units import one_line
from .context import RunContext, StartPlan
from .decisions import FROM_SCRATCH, UNKNOWN, crash_loop_verdict, evidence_of, made_progress
from .summary import AttemptRecord


class GiveUp(Exception):
    """Nothing is left to try (crash loop with no checkpoint to quarantine)."""


def quarantine(storage: Any, info: Any, now: float | None = None) -> str:
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
    return move_aside(storage, info.name, now if now is not None else time.time(), folder=False)


def hide_out_of_sight(storage: Any, layout: Any, best: Any, skipped: list[Any], log: Any, say: Any) -> int:
    """Before a start: move the invalid checkpoints the framework would pick by itself into ``quarantine/``
    (:meth:`~resumekit.layouts.base.Layout.hide_invalid`), leaving alone any whose files still change.

    Args:
        storage: the checkpoint root.
        layout: its layout.
        best: the newest valid checkpoint (None: none).
        skipped: the newer invalid ones found with it.
        log: the supervisor's event log.
        say: prints one progress line.

    Returns:
        How many were moved.

    Raises:
        PrecheckError: one could not be moved: starting would let the framework load it.
    """
    from .activity import still_written
    from .prechecks import PrecheckError

    local = {s.name: storage.local_path(s.name) for s in skipped}
    busy = set(still_written([p for p in local.values() if p]))
    for s in skipped:
        if local[s.name] in busy:
            log.emit("hide_skipped", layout=layout.name, path=s.path, reason="its files are still changing")
            say(f"left invalid checkpoint {s.path} in place: its files are still changing (a save running?)")
    try:
        hidden = layout.hide_invalid(storage, found=(best, [s for s in skipped if local[s.name] not in busy]))
    except OSError as e:
        raise PrecheckError(
            "checkpoint",
            f"cannot move an invalid checkpoint under {storage.uri} out of the framework's sight "
            f"({one_line(e)}); move it into {storage.join('quarantine')} by hand",
        ) from None
    for h in hidden:
        log.emit("hide_invalid", layout=layout.name, **h.as_dict())
        link = f"; {h.name} now links to {h.replaced_by}" if h.replaced_by else ""
        say(f"moved invalid checkpoint {h.path} out of the framework's sight to {h.to}: {h.reason}{link}")
    return len(hidden)


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rstrip("/").rpartition("/")
    return parent or "/", name


class CrashLoopGuard:
    """Follows the failures in a row without progress and quarantines the checkpoint they point at.

    Args:
        ctx: the run's options (``crash_loop``, ``layout``, ``local_tier``), paths, event log and progress output.
        rediscover: ``storage -> (layout, newest valid checkpoint)``, to name what the next start resumes from.
    """

    def __init__(self, ctx: RunContext, rediscover: Callable[[Any], tuple[Any, Any]]):
        self.opts, self.paths, self.log, self.say = ctx.options, ctx.paths, ctx.log, ctx.say
        self.rediscover = rediscover
        #: the evidence of each failure in a row without progress (a path, FROM_SCRATCH or UNKNOWN)
        self.evidence: list[str] = []
        #: checkpoints quarantined so far
        self.quarantined = 0
        self._counted_attempt = 0

    @property
    def streak(self) -> int:
        """Failures in a row without progress that count (outside kills, hangs and preemptions do not)."""
        return len(self.evidence)

    def after_attempt(self, storage: Any, layout: Any, best: Any, prev: AttemptRecord, last_plan: StartPlan) -> Any:
        """Weigh the last attempt's evidence; quarantine a checkpoint the job keeps crashing on.

        Args:
            storage: the checkpoint root (None without ``--dir``).
            layout: its layout.
            best: the newest valid checkpoint found now.
            prev: the attempt that just ended.
            last_plan: what that attempt was started with.

        Returns:
            The newest valid checkpoint to resume from next (``best``, or its predecessor after a quarantine).

        Raises:
            GiveUp: a crash loop with nothing to quarantine (from scratch, or the job did not say what it loaded),
                or a quarantine that failed.
        """
        if self._counted_attempt == prev.index:  # a retried pre-check: this attempt was already counted
            return best
        self._counted_attempt = prev.index
        progressed = made_progress(last_plan.newest_step, best.step if best else None, prev.resume_step, prev.last_step)
        ev = evidence_of(prev.cause, progressed, prev.restore_reported, prev.loaded, prev.had_candidates)
        if ev == "":
            self.evidence = []
        elif ev is not None:
            self.evidence.append(ev)
        verdict, target = crash_loop_verdict(self.evidence, self.opts.crash_loop)
        if verdict == "continue":
            return best
        k = self.streak
        if verdict == "give-up":
            self.log.emit("crash_loop", failures=k, evidence=list(self.evidence), action="give-up")
            if target == FROM_SCRATCH:
                raise GiveUp(
                    f"crash loop: the job failed {k} times in a row starting from scratch without progress, "
                    "and there is no checkpoint left to quarantine; giving up"
                )
            raise GiveUp(
                f"crash loop: the job failed {k} times in a row without progress and did not report which "
                "checkpoint it loaded (no 'restore' event: unknown), so nothing was quarantined; giving up. Use a "
                "resumekit integration (or log a 'restore' event) so crash loops can be traced to a checkpoint"
            )
        assert target is not None
        return self._quarantine_loaded(target, k, storage, best)

    def _quarantine_loaded(self, path: str, k: int, own: Any, best: Any) -> Any:
        """Re-verify the checkpoint the job reported loading and move it aside (and its twin in the other tier)."""
        from ..layouts import resolve_layout
        from ..storage import open_storage

        parent, name = _split(path)
        try:
            storage = open_storage(parent, create=False)
            layout = resolve_layout(storage, self.opts.layout)
            info = next((i for i in layout.list(storage) if i.name == name), None)
        except Exception as e:  # noqa: BLE001 - reported as the reason we give up
            raise GiveUp(
                f"crash loop: cannot open {parent} to quarantine {path} ({one_line(e)}); move it aside by hand"
            ) from None
        if info is None:  # it vanished (gc, a person) or is not a checkpoint we know: nothing to move
            self.evidence = []
            self.say(f"crash loop: {path}, which the job reported loading, is not a checkpoint here; nothing moved")
            return best
        checked = layout.validate(storage, info, full=True)
        verdict = (
            f"it verifies, but the job crashed {k} times in a row right after loading it, before any progress"
            if checked.valid
            else f"it fails full verification: {checked.reason}"
        )
        try:
            new = quarantine(storage, info)
        except OSError as e:
            raise GiveUp(
                f"crash loop: cannot quarantine {info.path} ({one_line(e)}); move it aside by hand and start again"
            ) from None
        self.quarantined += 1
        self.evidence = []
        twin = self._quarantine_twin(parent, name, k)
        _, best2 = self.rediscover(own) if own is not None else (None, None)
        self.log.emit(
            "quarantine",
            step=info.step,
            path=info.path,
            to=storage.join(new),
            failures=k,
            layout=layout.name,
            verified=bool(checked.valid),
            reason=f"{k} failures in a row after loading it, without progress; {verdict}",
            twin=twin,
            next_step=best2.step if best2 else None,
            next_path=best2.path if best2 else None,
        )
        nxt = f"resuming from {best2.path}" if best2 else "no valid checkpoint left: starting from scratch"
        self.say(
            f"crash loop: the job failed {k} times in a row after resuming from {info.path} ({verdict}); "
            f"quarantined it as {storage.join(new)}; {nxt}"
        )
        return best2 if own is not None else best

    def _quarantine_twin(self, parent: str, name: str, failures: int) -> str | None:
        """The same checkpoint in the other tier (local tier <-> root) goes aside too, or the next pre-download or
        discovery picks it again."""
        tier, root = self.opts.local_tier, self.paths.local_dir or self.paths.directory
        if not tier or not root:
            return None
        same = lambda a, b: os.path.realpath(a) == os.path.realpath(b) if "://" not in a + b else a == b  # noqa: E731
        other = root if same(parent, tier) else tier if same(parent, root) else None
        if other is None:
            return None
        from ..storage import open_storage

        try:
            st = open_storage(other, create=False)
            if not st.exists(name):
                return None
            new = st.join(move_aside(st, name, folder=False))
        except OSError as e:
            raise GiveUp(
                f"crash loop: cannot quarantine {other}/{name} ({one_line(e)}); move it aside by hand and start again"
            ) from None
        self.log.emit(
            "quarantine",
            path=st.join(name),
            to=new,
            failures=failures,
            tier="local" if other == tier else "remote",
            reason=f"{failures} failures in a row without progress (the copy in the other tier)",
        )
        return new


__all__ = ["CrashLoopGuard", "GiveUp", "hide_out_of_sight", "quarantine", "UNKNOWN", "FROM_SCRATCH"]
