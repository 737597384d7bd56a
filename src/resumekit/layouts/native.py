"""resumekit's own layout: ``step_NNNNNNNNN/`` directories committed by a manifest written last."""

from __future__ import annotations

from typing import List

from ..format import parse_step_dirname
from ..storage import Storage
from ..verify import check_checkpoint
from .base import CheckpointInfo, Layout, run_check, step_entries
from .registry import register


class NativeLayout(Layout):
    """``step_N`` directories, each valid once its manifest matches its files."""

    name = "native"

    def detect(self, storage: Storage) -> bool:
        return bool(step_entries(storage, parse_step_dirname))

    def list(self, storage: Storage) -> List[CheckpointInfo]:
        return self.list_matching(storage, parse_step_dirname)

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        def check() -> dict:
            man = check_checkpoint(storage, info.name, full=full)
            return {"size": man.total_bytes, "time": man.time, "metadata": dict(man.metadata)}

        return run_check(info, check)


register(NativeLayout())
