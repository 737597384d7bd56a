"""Plain ``torch.save`` files: ``ckpt_N.pth``, ``ckpt_best_N.pth``, ``model_N.pt``, ``epoch-N.pth.tar``, ...

The common hand-written loop saves ``torch.save(state, f"ckpt_{epoch}.pth")`` and resumes from
``sorted(os.listdir(d))[-1]``, a text sort that puts ``ckpt_9`` after ``ckpt_10``. Here the step is the integer at
the end of the file name (``ckpt_best_12.pth`` -> 12), files are ordered by it, and ties go by name. Files without
a trailing number (``best.pth``, ``model.pt``) are not candidates: nothing says how new they are.

Quick validation checks that the file is a complete torch zip archive; full validation also CRC-checks it and
loads it with ``torch.load(weights_only=True)`` (torch imported only then), so a file that would need full pickle
to load is reported, never executed.
"""

from __future__ import annotations

import builtins
import re
from dataclasses import replace

from ..storage import Storage
from .base import CheckpointInfo, Layout, match_step, run_check
from .checks import check_torch_zip, load_weights_only
from .registry import register

_NAME_RE = re.compile(r"^(?P<stem>[^/]*?)(?P<step>\d+)\.(?:pt|pth|pth\.tar)$")


def parse_step(name: str) -> int | None:
    """``ckpt_10.pth`` -> 10, ``ckpt_best_9.pth`` -> 9, ``model_0012.pt`` -> 12; None for other names."""
    return match_step(_NAME_RE, name)


class TorchFilesLayout(Layout):
    """Numbered ``.pt``/``.pth`` files in one directory."""

    name = "torchfiles"

    def detect(self, storage: Storage) -> bool:
        return any(not e.is_dir and _NAME_RE.match(e.name) for e in storage.listdir(""))

    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        return self.list_matching(storage, parse_step, dirs=False)

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        if info.step < 0 and (step := parse_step(info.name)) is not None:  # `verify PATH` of a file list() missed
            info = replace(info, step=step)

        def check():
            check_torch_zip(storage, info.name, info.path, full, shown=info.name)
            if full:
                load_weights_only(storage, info.name, info.path)
            return {"size": storage.size(info.name)}

        return run_check(info, check)


register(TorchFilesLayout())
