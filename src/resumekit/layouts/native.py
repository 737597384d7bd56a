"""resumekit's own layout: ``step_NNNNNNNNN/`` directories committed by a manifest written last."""

from __future__ import annotations

import builtins

from ..format import parse_step_dirname
from ..storage import Storage
from ..verify import check_checkpoint, check_native_contents
from .base import CheckpointInfo, Layout, run_check, step_entries
from .registry import register


class NativeLayout(Layout):
    """``step_N`` directories, each valid once its manifest matches its files."""

    name = "native"

    def detect(self, storage: Storage) -> bool:
        return bool(step_entries(storage, parse_step_dirname))

    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        return self.list_matching(storage, parse_step_dirname)

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        def check() -> dict:
            man = check_checkpoint(storage, info.name, full=full)
            if full:
                # What a restore checks before touching anything (tensor headers, the state tree, RNG states), so
                # a checkpoint verify calls valid does not fail halfway through a restore.
                check_native_contents(storage, info.name, man)
            return {"size": man.total_bytes, "time": man.time, "metadata": dict(man.metadata)}

        return run_check(info, check)

    def invalid_in_sight(
        self, storage: Storage, best: CheckpointInfo | None, skipped: builtins.list[CheckpointInfo]
    ) -> builtins.list[tuple[CheckpointInfo, str]]:
        """Nothing: resumekit's own loader verifies every candidate and skips an invalid one itself, and a commit
        renames a complete temporary directory, so no later save writes into a broken ``step_N``."""
        return []


register(NativeLayout())
