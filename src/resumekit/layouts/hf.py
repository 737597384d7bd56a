"""HF Trainer and LLaMA-Factory: ``output_dir/checkpoint-N/``.

What ``Trainer._save_checkpoint`` writes, in order (transformers 5.x trainer.py; 4.4x is the same)::

    checkpoint-N/
        model.safetensors | model-0000K-of-0000M.safetensors + model.safetensors.index.json | pytorch_model.bin
          | adapter_model.safetensors + adapter_config.json (PEFT/LoRA) | pytorch_model_fsdp* (FSDP)
        config.json, tokenizer files, training_args.bin
        optimizer.pt        (DeepSpeed: latest + global_stepN/ instead; FSDP: optimizer.bin or optimizer_0/)
        scheduler.pt        (absent when DeepSpeed owns the scheduler)
        scaler.pt           (mixed precision only)
        rng_state.pth       (one process) or rng_state_R.pth (one per process R)
        trainer_state.json  last
        checkpoint-is-incomplete.txt   present only while a JIT (SIGTERM) save is running

The Trainer resumes from whatever ``get_last_checkpoint`` returns: the highest N, without looking inside, and it
silently skips a missing optimizer/scheduler/rng file. Here a checkpoint is valid when ``trainer_state.json`` parses
(it is written last), its ``global_step`` matches N, the JIT sentinel is absent, weights, optimizer, scheduler and
rng files are all there, and every torch/safetensors file is readable to its end (``full`` CRC-checks the torch
zips). When :class:`resumekit.integrations.hf.ResumekitCallback` has written ``resumekit.manifest.json`` into the
checkpoint, its sizes (and, with ``full``, xxh3 checksums) decide instead of the per-file header checks.
"""

from __future__ import annotations

import builtins
import re

from ..storage import Entry, Storage
from .base import CheckpointInfo, Layout, match_step, run_check, step_entries
from .checks import (
    FOREIGN_MANIFEST,
    check_dcp_dir,
    check_foreign_manifest,
    check_safetensors,
    check_torch_zip,
    fail,
    files_of,
    join,
    missing_ranks,
    newest_mtime,
    read_json,
    read_small,
    sum_sizes,
)
from .registry import register

PREFIX = "checkpoint"
TRAINER_STATE = "trainer_state.json"
SENTINEL = "checkpoint-is-incomplete.txt"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
DS_LATEST = "latest"  # DeepSpeed's tag file, as in layouts/deepspeed.py
_DIR_RE = re.compile(r"^checkpoint-(\d+)$")
_RNG_RE = re.compile(r"^rng_state_(\d+)\.pth$")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_ADAPTERS = ("adapter_model.safetensors", "adapter_model.bin")
_FSDP_MODEL = re.compile(r"^pytorch_model_fsdp(_\d+)?(_rank\d+)?(\.bin)?$")
_FSDP_OPTIM = re.compile(r"^optimizer(_\d+)?(_rank\d+)?(\.bin)?$")


def parse_checkpoint_dirname(name: str) -> int | None:
    """``checkpoint-1200`` -> 1200 (as the Trainer's own ``_re_checkpoint``); None for anything else."""
    return match_step(_DIR_RE, name)


class HFLayout(Layout):
    """``checkpoint-N`` directories of the HF Trainer (and LLaMA-Factory, which uses it)."""

    name = "hf"

    def detect(self, storage: Storage) -> bool:
        return bool(step_entries(storage, parse_checkpoint_dirname))

    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        return self.list_matching(storage, parse_checkpoint_dirname)

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        return run_check(info, lambda: check_checkpoint(storage, info.name, info.path, full))


def check_checkpoint(storage: Storage, name: str, where: str, full: bool) -> dict:
    """Validate one ``checkpoint-N`` directory; raises CorruptCheckpointError. Returns CheckpointInfo fields."""
    files = files_of(storage, name)
    if not files:
        raise fail(where, "the checkpoint directory is missing or empty")
    if SENTINEL in files:
        raise fail(where, f"{SENTINEL} is present: the Trainer's save was interrupted")
    state = read_json(
        storage,
        join(name, TRAINER_STATE),
        where,
        "(the Trainer writes it last: the save never finished)",
        shown=TRAINER_STATE,
    )
    if not isinstance(state, dict):
        raise fail(where, f"{TRAINER_STATE} is not a JSON object")
    step = parse_checkpoint_dirname(name.rsplit("/", 1)[-1])
    gstep = state.get("global_step")
    if step is not None and isinstance(gstep, int) and gstep != step:
        raise fail(where, f"{TRAINER_STATE} says global_step {gstep} but the directory is {PREFIX}-{step}")
    deepspeed = DS_LATEST in files or any(n.startswith("global_step") and files[n].is_dir for n in files)
    by_manifest = FOREIGN_MANIFEST in files
    if by_manifest:
        check_foreign_manifest(storage, name, where, full, step=step)
    # With a manifest the checksums vouch for the bytes, so the file checks below only test presence.
    content = not by_manifest
    _check_weights(storage, name, where, files, full, content, required=not deepspeed)
    if deepspeed:
        _check_deepspeed(storage, name, where, files, full)
    else:
        _check_optimizer(storage, name, where, files, full, content)
        if SCHEDULER not in files:
            raise fail(where, f"{SCHEDULER} is missing (the Trainer would silently restart the learning-rate schedule)")
    _check_rng(files, where)
    if content:
        for n in sorted(files):
            if files[n].is_dir:
                continue
            if n.endswith((".pt", ".pth", ".bin")):
                check_torch_zip(storage, join(name, n), where, full, shown=n)
    metadata = {"global_step": gstep, "epoch": state.get("epoch")}
    if by_manifest:
        metadata["verified_by"] = FOREIGN_MANIFEST
    return {
        "size": sum_sizes(files),
        "time": newest_mtime(files, TRAINER_STATE, FOREIGN_MANIFEST),
        "metadata": metadata,
    }


def _check_weights(
    storage: Storage, name: str, where: str, files: dict[str, Entry], full: bool, content: bool, required: bool
) -> None:
    for index in _INDEXES:
        if index in files:
            doc = read_json(storage, join(name, index), where, shown=index)
            wmap = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(wmap, dict) or not wmap:
                raise fail(where, f"{index} has no weight_map")
            for shard in sorted(set(map(str, wmap.values()))):
                if "/" in shard or shard not in files:
                    raise fail(where, f"{shard} is missing (named in {index})")
                if content and shard.endswith(".safetensors"):
                    check_safetensors(storage, join(name, shard), where, full, size=files[shard].size, shown=shard)
            return
    for single in _SINGLE_WEIGHTS:
        if single in files:
            if content and single.endswith(".safetensors"):
                check_safetensors(storage, join(name, single), where, full, size=files[single].size, shown=single)
            return
    for adapter in _ADAPTERS:
        if adapter in files:
            cfg = "adapter_config.json"
            read_json(storage, join(name, cfg), where, f"(it must sit next to {adapter})", shown=cfg)
            if content and adapter.endswith(".safetensors"):
                check_safetensors(storage, join(name, adapter), where, full, size=files[adapter].size, shown=adapter)
            return
    for n in sorted(files):
        if _FSDP_MODEL.match(n):
            if files[n].is_dir:
                check_dcp_dir(storage, join(name, n), where, shown=n)
            return
    if required:
        raise fail(
            where,
            "no model weights (model.safetensors, model-*.safetensors + model.safetensors.index.json, "
            "pytorch_model.bin, or adapter_model.safetensors + adapter_config.json)",
        )


def _check_optimizer(
    storage: Storage, name: str, where: str, files: dict[str, Entry], full: bool, content: bool
) -> None:
    if OPTIMIZER in files:
        return  # its zip check runs with every other torch file
    for n in sorted(files):
        if _FSDP_OPTIM.match(n):
            if files[n].is_dir and content:
                check_dcp_dir(storage, join(name, n), where, shown=n)
            return
    raise fail(
        where,
        f"{OPTIMIZER} is missing (saved with save_only_model=True? the Trainer would silently start a fresh optimizer)",
    )


def _check_deepspeed(storage: Storage, name: str, where: str, files: dict[str, Entry], full: bool) -> None:
    if DS_LATEST not in files:
        raise fail(
            where,
            f"{DS_LATEST} is missing next to the DeepSpeed global_step* directory (DeepSpeed writes "
            "it after its files: the save never finished)",
        )
    tag = read_small(storage, join(name, DS_LATEST), where, DS_LATEST)
    if not tag or "/" in tag or tag not in files or not files[tag].is_dir:
        raise fail(where, f"{DS_LATEST} names {tag!r}, which is not a directory of this checkpoint")
    # Imported here so that importing this module does not register the deepspeed layout ahead of its turn.
    from .deepspeed import check_tag_dir

    check_tag_dir(storage, join(name, tag), where, full, shown=tag)


def _check_rng(files: dict[str, Entry], where: str) -> None:
    if "rng_state.pth" in files:
        return
    ranks: set[int] = set()
    for n in files:
        m = _RNG_RE.match(n)
        if m:
            ranks.add(int(m.group(1)))
    if not ranks:
        raise fail(
            where,
            "rng_state.pth is missing (nor rng_state_<rank>.pth: the Trainer would resume with fresh "
            "random state, not an exact resume)",
        )
    gone = missing_ranks(ranks)
    if gone:
        raise fail(where, f"rng_state_{gone[0]}.pth is missing (process ranks 0-{max(ranks)} expected)")


register(HFLayout(), "llamafactory", "transformers")
