"""Layouts whose framework keeps a tracker: a small file naming the checkpoint to resume from.

Megatron and VeRL write ``latest_checkpointed_iteration.txt``, DeepSpeed writes ``latest``. None of them writes it
atomically, DeepSpeed writes it before the other ranks have finished, and VeRL's async save never writes it, so the
tracker is a hint, not a commit record: resumekit picks the newest *valid* checkpoint itself and treats a tracker
that disagrees as a finding that ``repair`` fixes (keeping a ``.bak`` of the old content).
"""

from __future__ import annotations

from dataclasses import replace

from ..storage import Storage
from .base import CheckpointInfo, Layout, RepairResult


class TrackedLayout(Layout):
    """A :class:`Layout` with a tracker file; subclasses say how its content maps to a checkpoint name."""

    def target_of(self, content: str) -> str | None:
        """The checkpoint name (relative to the root) a tracker content designates, None when unparseable."""
        raise NotImplementedError

    def mark_tracked(self, storage: Storage, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """Flag the candidate the tracker points at (``metadata["tracked"]``), so ``ls`` can show it."""
        content = self.read_tracker(storage)
        target = self.target_of(content) if content else None
        if target is None:
            return infos
        return [replace(i, metadata={**i.metadata, "tracked": True}) if i.name == target else i for i in infos]

    def tracker_finding(self, storage: Storage, old: str | None, best_name: str | None, full: bool = True) -> str:
        """One sentence on the tracker's state relative to the newest valid checkpoint ``best_name``."""
        t = self.tracker_name
        if old is None:
            return f"{t} is missing"
        if old == "":
            return f"{t} is empty"
        target = self.target_of(old)
        if target is None:
            return f"{t} holds {old!r}, which names no checkpoint"
        if target == best_name:
            return f"{t} points at the newest valid checkpoint {target}"
        if not storage.exists(target):
            return f"{t} points at {target}, which does not exist"
        info = next((i for i in self.list(storage) if i.name == target), None)
        if info is None:
            return f"{t} points at {target}, which is not a checkpoint of this layout"
        checked = self.validate(storage, info, full=full)
        if not checked.valid:
            return f"{t} points at {target}, which is invalid: {checked.reason}"
        return f"{t} points at {target}, older than the newest valid checkpoint {best_name}"

    def repair(self, storage: Storage, full: bool = True, dry_run: bool = False) -> RepairResult | None:
        """Point the tracker at the newest valid checkpoint (see :meth:`Layout.repair`), explaining what was wrong."""
        res = super().repair(storage, full=full, dry_run=dry_run)
        if res is None:
            return None
        best_name = self.target_of(res.new) if res.new else None
        finding = self.tracker_finding(storage, res.old, best_name, full=full)
        if res.new is None:
            res.message = f"{finding}; no valid checkpoint, tracker left as it is"
        elif not res.changed:
            res.message = f"{finding}; nothing to do"
        else:
            verb = "would set" if dry_run else "set"
            kept = f" (old content kept in {res.backup})" if res.backup else ""
            res.message = f"{finding}; {verb} it to {res.new!r}{kept}"
        return res

    def invalid_in_sight(
        self, storage: Storage, best: CheckpointInfo | None, skipped: list[CheckpointInfo]
    ) -> list[tuple[CheckpointInfo, str]]:
        """The newer invalid checkpoints and, when no valid checkpoint exists, the tracker itself.

        With a valid checkpoint :meth:`repair` points the tracker at it. Without one the tracker can only name an
        invalid or missing checkpoint, which the framework would load (DeepSpeed's ``load_checkpoint``, Megatron's
        ``--load``, VeRL's ``resume_mode: auto``); without a tracker each of them starts from scratch.
        """
        out = super().invalid_in_sight(storage, best, skipped)
        if best is None and self.tracker_name and storage.exists(self.tracker_name):
            old = self.read_tracker(storage)
            finding = self.tracker_finding(storage, old, None, full=False)
            tracker = CheckpointInfo(
                step=-1, name=self.tracker_name, path=storage.join(self.tracker_name), layout=self.name
            )
            out.append((tracker, f"{finding}, and no valid checkpoint exists"))
        return out
