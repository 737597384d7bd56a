"""PyTorch Lightning: ``ModelCheckpoint`` ``.ckpt`` files in its ``dirpath``.

Files are ``epoch=E-step=S.ckpt`` (the default ``{epoch}-{step}`` template, possibly with metrics and a ``-vN``
suffix), ``last.ckpt`` (overwritten at every save, or with ``save_last="link"`` a symlink to the newest file), and
whatever custom names the user chose. Each is a ``torch.save`` zip archive of a dict with ``epoch``,
``global_step``, ``state_dict``, ``optimizer_states``, ``lr_schedulers`` and ``loops``. With the DeepSpeed strategy a
``.ckpt`` is a directory holding a DeepSpeed checkpoint (``latest`` + tag directory).

Steps: from ``step=S`` in the name. A file without one (``last.ckpt``, custom names) gets the step of the file it
links to when it is a symlink; otherwise, without reading it, the step of the newest step-named checkpoint that is
not newer than it by mtime (ModelCheckpoint writes ``last.ckpt`` right after the top-k file of the same step), and
0 when there is none (a lone ``last.ckpt``). Validation reads the real ``global_step``, which then replaces the
estimate.

Validation, quick and full alike, walks the pickle's opcodes without running them (no torch needed): every global
it names must be on :func:`safe_globals` (what ``torch.load(weights_only=True)`` accepts, plus the harmless types
Lightning itself writes: ``AttributeDict`` hyperparameters, ``argparse.Namespace``, ``pathlib`` paths, ``datetime``
values), and the top-level dict must hold the keys above, so both modes give the same verdict on what a file holds.
They differ only in how the bytes are checked: quick reads the zip directory, full CRC-checks every member. A file
with a resumekit sidecar manifest (``<name>.ckpt.resumekit.manifest.json``, written by
:class:`resumekit.integrations.lightning.ResumekitCallback`) is checked against it instead: its size (quick) or
xxh3 checksum (full). A ``last.ckpt`` symlink is checked through the file it points at, with that file's sidecar.
"""

from __future__ import annotations

import builtins
import os
import posixpath
import re
import struct
import zipfile
import zlib
from dataclasses import replace
from typing import Any

from ..storage import Storage
from .base import QUARANTINE_DIR, CheckpointInfo, HiddenCheckpoint, Layout, choose_latest, run_check
from .checks import (
    NOT_SCALAR,
    TORCH_SAFE_GLOBALS,
    check_sidecar_manifest,
    check_torch_zip,
    fail,
    files_of,
    join,
    read_small,
    read_torch_pickle,
    sum_sizes,
    summarize_pickle,
)
from .registry import register

SUFFIX = ".ckpt"
REQUIRED_KEYS = ("epoch", "global_step", "state_dict", "optimizer_states", "lr_schedulers", "loops")
_STEP_RE = re.compile(r"(?:^|[-_])step=(\d+)")
# ModelCheckpoint writes last.ckpt just after the top-k file; allow for coarse file-system timestamps.
_MTIME_SLACK = 2.0
# A logger's run directory (TensorBoardLogger / CSVLogger ``version_N``).
_VERSION_RE = re.compile(r"^version_\d+$")


def parse_step(name: str) -> int | None:
    """``epoch=3-step=1200.ckpt`` -> 1200; ``epoch=3-step=1200-v1.ckpt`` -> 1200; None without ``step=``."""
    m = _STEP_RE.search(name)
    return int(m.group(1)) if m else None


class LightningLayout(Layout):
    """``*.ckpt`` files written by Lightning's ModelCheckpoint."""

    name = "lightning"

    def detect(self, storage: Storage) -> bool:
        if any(e.name.endswith(SUFFIX) for e in storage.listdir("")):
            return True
        return any(self._list_in(storage, rel) for rel in self.checkpoint_dirs(storage)[1:])

    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        """Every ``.ckpt`` under the root, in each directory ModelCheckpoint may write to (see
        :meth:`checkpoint_dirs`); names are relative to the root."""
        return [i for rel in self.checkpoint_dirs(storage) for i in self._list_in(storage, rel)]

    def checkpoint_dirs(self, storage: Storage) -> builtins.list[str]:
        """The directories under a root that ModelCheckpoint writes to, relative to it (the root itself first).

        Given the Trainer's ``default_root_dir`` the checkpoints are not in the root: without a logger they go to
        ``checkpoints/``, with the default logger to ``lightning_logs/version_N/checkpoints/`` (any logger name:
        ``<name>/version_N/checkpoints/``), and a new ``version_N`` is made on every start, so a restart's
        checkpoints land beside the previous start's. Given a logger directory, ``version_N/checkpoints/``.
        ``quarantine/`` (checkpoints moved aside) and hidden entries are never looked into.
        """
        dirs = [""]
        for e in sorted(storage.listdir(""), key=lambda e: e.name):
            if not e.is_dir or e.name.startswith(".") or e.name == QUARANTINE_DIR:
                continue
            if e.name == "checkpoints":
                dirs.append(e.name)
            elif _VERSION_RE.match(e.name):
                if storage.exists(join(e.name, "checkpoints")):
                    dirs.append(join(e.name, "checkpoints"))
            else:
                for v in sorted(storage.listdir(e.name), key=lambda v: v.name):
                    if v.is_dir and _VERSION_RE.match(v.name) and storage.exists(join(e.name, v.name, "checkpoints")):
                        dirs.append(join(e.name, v.name, "checkpoints"))
        return dirs

    def _list_in(self, storage: Storage, rel: str) -> builtins.list[CheckpointInfo]:
        """The ``.ckpt`` entries of one ModelCheckpoint directory ``rel`` (names relative to the root); a
        ``last.ckpt`` without a step in its name gets one from files of the same directory only."""
        entries = [
            replace(e, name=join(rel, e.name))
            for e in storage.listdir(rel)
            if e.name.endswith(SUFFIX) and not e.name.startswith(".")
        ]
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

    def latest(
        self, storage: Storage, full: bool = True
    ) -> tuple[CheckpointInfo | None, builtins.list[CheckpointInfo]]:
        """As :meth:`Layout.latest`; with ``full``, files whose step was estimated are read first, so the order
        is by their real ``global_step``."""
        cands = self.list(storage)
        done: dict[str, CheckpointInfo] = {}
        if full:
            for i in cands:
                if i.metadata.get("step_from") in ("mtime", "unknown"):
                    done[i.name] = self.validate(storage, i, full=True)
            cands = [done.get(i.name, i) for i in cands]
        return choose_latest(cands, lambda i: done.get(i.name) or self.validate(storage, i, full=full))

    def invalid_in_sight(
        self, storage: Storage, best: CheckpointInfo | None, skipped: builtins.list[CheckpointInfo]
    ) -> builtins.list[tuple[CheckpointInfo, str]]:
        """The newer invalid ``.ckpt`` files, and every invalid ``last*.ckpt`` whatever its step.

        ``fit(ckpt_path="last")`` takes, among the files of ModelCheckpoint's directory whose name starts with
        ``last`` (Lightning 2.2+; older versions: contains ``last``), the most recently modified one, whatever its
        step; a truncated ``last.ckpt`` is found that way even when an older step-named file is valid.
        """
        out = super().invalid_in_sight(storage, best, skipped)
        seen = {i.name for i, _ in out}
        for cand in self.list(storage):
            base = cand.name.rsplit("/", 1)[-1]
            if "last" not in base or cand.name in seen or (best is not None and cand.name == best.name):
                continue
            checked = self.validate(storage, cand, full=False)
            if not checked.valid:
                out.append((checked, checked.reason))
        return out

    def hide_invalid(
        self,
        storage: Storage,
        full: bool = True,
        dry_run: bool = False,
        found: tuple[CheckpointInfo | None, builtins.list[CheckpointInfo]] | None = None,
        now: float | None = None,
    ) -> builtins.list[HiddenCheckpoint]:
        """As :meth:`Layout.hide_invalid`; an invalid ``last*.ckpt`` file moved aside is replaced by a link to
        the newest valid checkpoint of its directory, as ModelCheckpoint's own ``save_last="link"`` writes it, so
        ``ckpt_path="last"`` resumes from that one instead of starting from scratch.

        Lightning replaces the link at its next ``last`` save (its atomic save renames over it; ``"link"`` mode
        removes it first), so the valid file it points at is never written through it. Local roots only. A
        resumekit sidecar manifest (``<name>.resumekit.manifest.json``) moves with its file.
        """
        from .checks import sidecar_name

        best = found[0] if found is not None else None
        hidden = super().hide_invalid(storage, full=full, dry_run=dry_run, found=found, now=now)
        for h in hidden:
            if h.to_name is not None and storage.exists(sidecar_name(h.name)):
                # The integration's manifest goes with its file: it describes that file, not a later one.
                storage.rename(sidecar_name(h.name), sidecar_name(h.to_name))
            head, _, base = h.name.rpartition("/")
            local = storage.local_path(h.name)
            if dry_run or not local or "last" not in base or not base.endswith(SUFFIX):
                continue
            if best is not None and best.name.rpartition("/")[0] == head:
                target: CheckpointInfo | None = best
            else:
                target, _ = choose_latest(
                    [c for c in self._list_in(storage, head) if c.name != h.name],
                    lambda i: self.validate(storage, i, full=full),
                )
            if target is None or os.path.lexists(local):
                continue
            os.symlink(target.name.rpartition("/")[2], local)
            h.replaced_by = target.path
        return hidden

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        if info.step < 0 and (step := parse_step(info.name)) is not None:  # `verify PATH` of a file list() missed
            info = replace(info, step=step)

        def check():
            if not storage.exists(info.name):
                raise fail(info.path, "the file is missing (a dangling symlink?)")
            entries = files_of(storage, info.name)
            if entries:  # a directory: the DeepSpeed strategy
                from .deepspeed import check_tag_dir

                tag = read_small(storage, join(info.name, "latest"), info.path) if "latest" in entries else ""
                if not tag or tag not in entries:
                    raise fail(
                        info.path,
                        "latest is missing or names no tag directory (DeepSpeed strategy checkpoint cut short)",
                    )
                files = check_tag_dir(storage, join(info.name, tag), info.path, full, shown=tag)
                return {"size": sum_sizes(files)}
            return check_ckpt_file(storage, info, full)

        return run_check(info, check)


# ------------------------------------------------------------------------------------------------- file checks
#: Types a Lightning checkpoint may hold beyond what ``torch.load(weights_only=True)`` accepts: what Lightning writes
#: itself (``save_hyperparameters`` keeps an ``AttributeDict``; argparse scripts and LightningCLI pass a
#: ``Namespace``; paths) and plain value types. Unpickling one only calls its constructor on data.
LIGHTNING_SAFE_GLOBALS: frozenset[str] = frozenset(
    {
        "argparse.Namespace",
        "builtins.frozenset",
        "builtins.slice",
        "lightning.fabric.utilities.data.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
    }
    | {f"datetime.{n}" for n in ("date", "datetime", "time", "timedelta", "timezone")}
    | {
        f"{m}.{n}"
        for m in ("pathlib", "pathlib._local")  # Python 3.13 moved the classes to pathlib._local
        for n in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")
    }
)
#: more allowed globals, comma-separated ``module.Name`` (e.g. ``omegaconf.dictconfig.DictConfig,...``): read by the
#: checks and by the integration's loader alike, so a job and ``resumekit verify`` agree
ENV_SAFE_GLOBALS = "RESUMEKIT_SAFE_GLOBALS"


def safe_globals() -> frozenset[str]:
    """Every global a Lightning checkpoint may name: torch's weights-only set, :data:`LIGHTNING_SAFE_GLOBALS` and
    the names in ``RESUMEKIT_SAFE_GLOBALS``."""
    extra = {n.strip() for n in os.environ.get(ENV_SAFE_GLOBALS, "").split(",") if n.strip()}
    return TORCH_SAFE_GLOBALS | LIGHTNING_SAFE_GLOBALS | extra


def link_target(storage: Storage, rel: str) -> str | None:
    """The root-relative file a local symlink ``rel`` points at (None: not a link, or it leaves the root)."""
    local = storage.local_path(rel)
    if not local or not os.path.islink(local):
        return None
    target = os.readlink(local)
    if os.path.isabs(target):
        root = storage.local_path("") or ""
        target = os.path.relpath(target, root).replace(os.sep, "/")
    else:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target.replace(os.sep, "/")))
    return None if target == ".." or target.startswith("../") else target


def check_ckpt_file(storage: Storage, info: CheckpointInfo, full: bool) -> dict[str, Any]:
    """Validate one ``.ckpt`` file (see the module docstring); raises CorruptCheckpointError.

    Returns:
        CheckpointInfo fields: the real ``step``, and metadata (``step_from``, ``epoch``, ``verified_by``).
    """
    where, shown = info.path, info.name
    rel = link_target(storage, info.name) or info.name
    man = check_sidecar_manifest(storage, rel, where, full, shown=shown)
    if man is None:  # no sidecar vouches for the bytes: the zip structure (quick) or its CRCs (full) must
        check_torch_zip(storage, rel, where, full, shown=shown)
    try:
        summary = summarize_pickle(read_torch_pickle(storage, rel))
    except KeyError:
        raise fail(where, f"{shown} has no data.pkl: not a torch.save file") from None
    except (ValueError, EOFError, struct.error, zipfile.BadZipFile, zlib.error) as e:
        raise fail(where, f"{shown}'s pickle is damaged ({type(e).__name__}: {e})") from None
    allowed = safe_globals()
    refused = sorted(g for g in summary.globals if g not in allowed)
    if refused:
        named = [g.replace("?", "a type the file computes") for g in refused]
        raise fail(
            where,
            f"{shown} holds objects of types outside the allow-list ({', '.join(named[:3])}"
            f"{', ...' if len(named) > 3 else ''}); loading it would run their code. Allowed: tensors, containers, "
            f"paths, argparse.Namespace, Lightning's AttributeDict, datetime. Store plain values, or add a type's "
            f"name to {ENV_SAFE_GLOBALS} if you trust it",
        )
    top = summary.top_keys
    if top is None:
        raise fail(where, f"{shown} does not hold a dict: not a Lightning checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in top]
    if missing:
        raise fail(
            where,
            f"keys missing: {', '.join(missing)} (saved with save_weights_only=True? it cannot resume training)",
        )
    gstep, epoch = top.get("global_step"), top.get("epoch")
    fields: dict[str, Any] = {}
    if isinstance(gstep, int) and not isinstance(gstep, bool):
        if man is not None and man.step != gstep:
            raise fail(where, f"{shown} holds global_step {gstep} but its sidecar manifest says step {man.step}")
        meta = {**info.metadata, "step_from": "file", "epoch": epoch if epoch is not NOT_SCALAR else None}
        if man is not None:
            meta["verified_by"] = "sidecar manifest"
        fields.update(step=gstep, metadata=meta)
    return fields


register(LightningLayout())
