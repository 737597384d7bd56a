"""DeepSpeed: ``save_dir/latest`` names a tag; ``save_dir/TAG/`` holds one file per model- and data-parallel rank.

What ``DeepSpeedEngine.save_checkpoint`` writes (deepspeed/runtime/engine.py)::

    save_dir/
        latest                                            the tag, written by rank 0 only
        global_step1200/                                  default tag f"global_step{global_steps}"
            mp_rank_00_model_states.pt                    one per model-parallel rank (ZeRO-3: one per DP rank:
                                                          zero_pp_rank_D_mp_rank_00_model_states.pt)
            zero_pp_rank_D_mp_rank_00_optim_states.pt     one per data-parallel rank D (bf16_ prefix with the
                                                          BF16 optimizer)
        zero_to_fp32.py

Rank 0 writes ``latest`` right after its own files, with no barrier before it, so ``latest`` may name a tag whose
other ranks are still writing. A tag is valid when every rank's file is present and each is a complete torch zip
archive, and the data-parallel size recorded inside the model states (``dp_world_size``, read from pickle opcodes
without unpickling) matches the number of optimizer files: no file name can reveal a missing highest rank. Quick
and full checks give the same verdict on which files are there; ``full`` also checks every member's CRC.

Candidates are ``global_stepN`` directories, plus whatever other tag ``latest`` names when that tag ends in digits;
the step is the tag's trailing integer.
"""

from __future__ import annotations

import builtins
import re

from ..storage import Entry, Storage
from ._tracked import TrackedLayout
from .base import CheckpointInfo, run_check
from .checks import (
    NOT_SCALAR,
    check_torch_zip,
    count_missing,
    describe_ranks,
    fail,
    files_of,
    join,
    missing_ranks,
    newest_mtime,
    scan_pickle_scalars,
    sum_sizes,
)
from .registry import register

LATEST = "latest"
_TAG_RE = re.compile(r"^global_step(\d+)$")
_TRAILING_INT_RE = re.compile(r"(\d+)$")
_MODEL_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ZERO_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
# DeepSpeed still reads the old name without the underscore before "optim_states" ("transparently handled").
_OPTIM_RE = re.compile(r"^(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")


def tag_step(tag: str) -> int | None:
    """The step of a tag: ``global_step1200`` -> 1200; any other tag's trailing integer; None without one."""
    m = _TAG_RE.match(tag) or _TRAILING_INT_RE.search(tag)
    return int(m.group(1)) if m else None


def check_tag_dir(storage: Storage, rel: str, where: str, full: bool, shown: str | None = None) -> dict[str, Entry]:
    """Validate one DeepSpeed tag directory; raises CorruptCheckpointError with the reason.

    Args:
        storage: the root the directory lives under.
        rel: the tag directory relative to ``storage``.
        where: the checkpoint path for messages.
        full: CRC-check every file (the recorded data-parallel size is cross-checked in both modes).
        shown: the prefix used for file names in messages (default ``rel``).

    Returns:
        The directory's files.
    """
    shown = rel if shown is None else shown
    files = files_of(storage, rel)
    if not files:
        raise fail(where, f"{shown or 'the tag directory'} is missing or empty")

    def name(n: str) -> str:
        return join(shown, n)

    models: set[int] = set()
    zero_models: set[tuple[int, int]] = set()
    optims: set[tuple[int, int]] = set()
    bf16 = False
    for n in files:
        if m := _MODEL_RE.match(n):
            models.add(int(m.group(1)))
        elif m := _ZERO_MODEL_RE.match(n):
            zero_models.add((int(m.group(1)), int(m.group(2))))
        elif m := _OPTIM_RE.match(n):
            optims.add((int(m.group(2)), int(m.group(3))))
            bf16 = bf16 or bool(m.group(1))
    if not models and not zero_models:
        raise fail(
            where, f"{name('mp_rank_00_model_states.pt')} is missing (no *model_states.pt: the save never finished)"
        )
    mp_ranks = models | {mp for _, mp in zero_models} | {mp for _, mp in optims}
    if models:
        gone = missing_ranks(models, max(mp_ranks) + 1)
        if gone:
            raise fail(
                where,
                f"{name(f'mp_rank_{gone[0]:02d}_model_states.pt')} is missing (model-parallel ranks "
                f"0-{max(mp_ranks)} expected)",
            )
    dp_ranks = {d for d, _ in zero_models} | {d for d, _ in optims}
    prefix = "bf16_" if bf16 else ""
    for mp in sorted(mp_ranks):
        if optims:
            have = {d for d, m in optims if m == mp}
            gone = missing_ranks(have, max(dp_ranks) + 1)
            if gone:
                raise fail(
                    where,
                    f"{name(f'{prefix}zero_pp_rank_{gone[0]}_mp_rank_{mp:02d}_optim_states.pt')} is "
                    f"missing (data-parallel ranks 0-{max(dp_ranks)} expected; also missing: "
                    f"{describe_ranks(gone, total=count_missing(have, max(dp_ranks) + 1))})",
                )
        if zero_models:
            have = {d for d, m in zero_models if m == mp}
            gone = missing_ranks(have, max(dp_ranks) + 1)
            if gone:
                raise fail(
                    where,
                    f"{name(f'zero_pp_rank_{gone[0]}_mp_rank_{mp:02d}_model_states.pt')} is missing "
                    f"(data-parallel ranks 0-{max(dp_ranks)} expected)",
                )
    for n in sorted(files):
        if n.endswith(".pt") and not files[n].is_dir:
            check_torch_zip(storage, join(rel, n), where, full, shown=name(n))
    # Quick too: reading the model states' pickle (not its tensors) is cheap, and a quick check that passes a tag
    # whose last optimizer shard is missing hands the job a checkpoint it cannot load.
    _cross_check_dp_size(storage, rel, where, files, optims, name)
    return files


def _cross_check_dp_size(
    storage: Storage, rel: str, where: str, files: dict[str, Entry], optims: set[tuple[int, int]], name
) -> None:
    # The model states record dp_world_size; it catches a missing highest rank, which no file name can reveal.
    first = (
        "mp_rank_00_model_states.pt"
        if "mp_rank_00_model_states.pt" in files
        else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    )
    if first not in files or any(n.startswith("expp_rank_") for n in files):
        return  # MoE checkpoints shard optimizer states differently; file-name checks only
    found = scan_pickle_scalars(storage, join(rel, first), ("dp_world_size", "optimizer", "param_shapes"))
    dp = found.get("dp_world_size")
    have = {d for d, m in optims if m == 0}
    if optims and isinstance(dp, int) and dp > 0 and len(have) != dp:
        gone = missing_ranks(have, dp)
        detail = (
            f"missing ranks {describe_ranks(gone, total=count_missing(have, dp))}" if gone else f"found {len(have)}"
        )
        raise fail(
            where,
            f"{name(first)} records dp_world_size={dp} but there are {len(have)} *optim_states.pt files ({detail})",
        )
    # Under ZeRO the model states keep optimizer=None and the parameter shapes; the optimizer lives in the
    # per-rank zero files, so a ZeRO tag without any of them was cut short.
    zero = "optimizer" in found and found["optimizer"] is None and found.get("param_shapes") is NOT_SCALAR
    if not optims and zero:
        raise fail(
            where,
            f"{name(first)} holds no optimizer state and no *zero_pp_rank_*_optim_states.pt files "
            "exist (a ZeRO save that never finished)",
        )


class DeepSpeedLayout(TrackedLayout):
    """``save_dir/latest`` + ``save_dir/TAG/`` per DeepSpeed's ``save_checkpoint``."""

    name = "deepspeed"
    tracker_name = LATEST

    def detect(self, storage: Storage) -> bool:
        entries = storage.listdir("")
        if any(e.is_dir and _TAG_RE.match(e.name) for e in entries):
            return True
        return any(e.name == LATEST and not e.is_dir for e in entries) and any(e.is_dir for e in entries)

    def target_of(self, content: str) -> str | None:
        tag = content.strip()
        return tag if tag and "/" not in tag and tag not in (".", "..") else None

    def tracker_value(self, info: CheckpointInfo | None) -> str | None:
        return info.name if info else None

    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        entries = storage.listdir("")
        latest = self.read_tracker(storage) if any(e.name == LATEST for e in entries) else None
        out = []
        for e in entries:
            if not e.is_dir:
                continue
            step = tag_step(e.name)
            if step is None or not (_TAG_RE.match(e.name) or e.name == latest):
                continue
            out.append(self.candidate(storage, e.name, step))
        return self.mark_tracked(storage, out)

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        def check():
            files = check_tag_dir(storage, info.name, info.path, full, shown="")
            return {"size": sum_sizes(files), "time": newest_mtime(files, *files)}

        return run_check(info, check)


register(DeepSpeedLayout())
