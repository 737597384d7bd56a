"""PyTorch Lightning: ``ModelCheckpoint`` ``.ckpt`` files in its ``dirpath``.

Files are ``epoch=E-step=S.ckpt`` (the default ``{epoch}-{step}`` template, possibly with metrics and a ``-vN``
suffix), ``last.ckpt`` (overwritten at every save, or with ``save_last="link"`` a symlink to the newest file), and
whatever custom names the user chose. Each is a ``torch.save`` zip archive of a dict with ``epoch``,
``global_step``, ``state_dict``, ``optimizer_states``, ``lr_schedulers`` and ``loops``. With the DeepSpeed strategy a
``.ckpt`` is a directory holding a DeepSpeed checkpoint (``latest`` + tag directory).

Steps: from ``step=S`` in the name. A file without one (``last.ckpt``, custom names) gets the step of the file it
links to when it is a symlink; otherwise, without reading it, the step of the newest step-named checkpoint that is
not newer than it by mtime (ModelCheckpoint writes ``last.ckpt`` right after the top-k file of the same step), and
0 when there is none (a lone ``last.ckpt``). ``validate(full=True)`` loads the file with
``torch.load(weights_only=True)`` (torch imported only then), checks the keys above and reports the real
``global_step``, which then replaces the estimate. Quick validation checks the zip directory only.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

from ..storage import Storage
from .registry import register
from .base import CheckpointInfo, Layout, choose_latest, run_check
from .checks import check_torch_zip, fail, files_of, join, load_weights_only, sum_sizes

SUFFIX = ".ckpt"
REQUIRED_KEYS = ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers", "loops")
_STEP_RE = re.compile(r"(?:^|[-_])step=(\d+)")
# ModelCheckpoint writes last.ckpt just after the top-k file; allow for coarse file-system timestamps.
_MTIME_SLACK = 2.0


def parse_step(name: str) -> Optional[int]:
    """``epoch=3-step=1200.ckpt`` -> 1200; ``epoch=3-step=1200-v1.ckpt`` -> 1200; None without ``step=``."""
    m = _STEP_RE.search(name)
    return int(m.group(1)) if m else None


class LightningLayout(Layout):
    """``*.ckpt`` files written by Lightning's ModelCheckpoint."""

    name = "lightning"

    def detect(self, storage: Storage) -> bool:
        return any(e.name.endswith(SUFFIX) for e in storage.listdir(""))

    def list(self, storage: Storage) -> List[CheckpointInfo]:
        entries = [e for e in storage.listdir("") if e.name.endswith(SUFFIX) and not e.name.startswith(".")]
        named = [(parse_step(e.name), e) for e in entries]
        stepped = [(s, e) for s, e in named if s is not None]
        out = []
        for step, e in named:
            meta: dict = {}
            if step is not None:
                meta["step_from"] = "name"
            else:
                step, meta["step_from"] = self._estimate_step(storage, e, stepped)
            out.append(
                self.candidate(storage, e.name, step, size=e.size if not e.is_dir else 0, time=e.mtime, metadata=meta)
            )
        return out

    @staticmethod
    def _estimate_step(storage: Storage, entry, stepped) -> tuple:
        local = storage.local_path(entry.name)
        if local and os.path.islink(local):
            target = os.path.basename(os.readlink(local))
            step = parse_step(target)
            if step is not None:
                return step, "link"
        if entry.mtime is not None:
            older = [s for s, e in stepped if e.mtime is not None and e.mtime <= entry.mtime + _MTIME_SLACK]
            if older:
                return max(older), "mtime"
        return 0, "unknown"

    def latest(self, storage: Storage, full: bool = True) -> Tuple[Optional[CheckpointInfo], List[CheckpointInfo]]:
        """As :meth:`Layout.latest`; with ``full``, files whose step was estimated are read first, so the order
        is by their real ``global_step``."""
        cands = self.list(storage)
        done: Dict[str, CheckpointInfo] = {}
        if full:
            for i in cands:
                if i.metadata.get("step_from") in ("mtime", "unknown"):
                    done[i.name] = self.validate(storage, i, full=True)
            cands = [done.get(i.name, i) for i in cands]
        return choose_latest(cands, lambda i: done.get(i.name) or self.validate(storage, i, full=full))

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        if info.step < 0 and parse_step(info.name) is not None:  # `verify PATH` of a file list() did not see
            info = replace(info, step=parse_step(info.name))

        def check():
            if not storage.exists(info.name):
                raise fail(info.path, "the file is missing (a dangling symlink?)")
            entries = files_of(storage, info.name)
            if entries:  # a directory: the DeepSpeed strategy
                from .deepspeed import check_tag_dir

                tag = (
                    storage.read_bytes(join(info.name, "latest")).decode("utf-8", "replace").strip()
                    if "latest" in entries
                    else ""
                )
                if not tag or tag not in entries:
                    raise fail(
                        info.path,
                        "latest is missing or names no tag directory (DeepSpeed strategy checkpoint cut short)",
                    )
                files = check_tag_dir(storage, join(info.name, tag), info.path, full, shown=tag)
                return {"size": sum_sizes(files)}
            check_torch_zip(storage, info.name, info.path, full, shown=info.name)
            fields: dict = {}
            if full:
                ckpt = load_weights_only(storage, info.name, info.path)
                missing = [k for k in REQUIRED_KEYS if k not in ckpt]
                if missing:
                    raise fail(
                        info.path,
                        f"keys missing: {', '.join(missing)} (saved with save_weights_only=True? "
                        "it cannot resume training)",
                    )
                gstep = ckpt.get("global_step")
                if isinstance(gstep, int):
                    fields["step"] = gstep
                    fields["metadata"] = {**info.metadata, "step_from": "file", "epoch": ckpt.get("epoch")}
            return fields

        return run_check(info, check)


register(LightningLayout())
