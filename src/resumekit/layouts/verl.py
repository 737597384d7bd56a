"""VeRL: ``trainer.default_local_dir`` with ``latest_checkpointed_iteration.txt`` and ``global_step_N/``.

What ``RayPPOTrainer._save_checkpoint`` and the FSDP checkpoint manager write (verl/trainer/ppo/ray_trainer.py,
verl/utils/checkpoint/fsdp_checkpoint_manager.py)::

    default_local_dir/
        latest_checkpointed_iteration.txt     str(global_steps), plain open("w") (not atomic), written last;
                                              never written when actor.checkpoint.async_save is on
        global_step_N/
            actor/
                model_world_size_W_rank_R.pt        every rank R < W writes its own three files
                optim_world_size_W_rank_R.pt
                extra_state_world_size_W_rank_R.pt  (lr scheduler + rng)
                fsdp_config.json                    {"FSDP_version": .., "world_size": W} (rank 0)
                huggingface/                        config + tokenizer (rank 0)
            critic/                                 same, when a critic is trained
            data.pt                                 dataloader state, after actor and critic

The Megatron backend writes ``actor/dist_ckpt/`` (torch DCP) instead of the per-rank files; that directory is checked
as a DCP directory. Valid means: ``actor/`` (and ``critic/`` when present) has model, optim and extra_state files for
every rank of one world size W (and ``fsdp_config.json``, when present, agrees), ``data.pt`` exists, and every
``.pt`` is a complete torch zip (CRC-checked with ``full``).
"""

from __future__ import annotations

import builtins
import re

from ..storage import Entry, Storage
from ._tracked import TrackedLayout
from .base import CheckpointInfo, match_step, run_check, step_entries
from .checks import (
    check_dcp_dir,
    check_torch_zip,
    fail,
    files_of,
    join,
    missing_ranks,
    newest_mtime,
    read_json,
    sum_sizes,
)
from .registry import register

TRACKER = "latest_checkpointed_iteration.txt"
DATA_FILE = "data.pt"
ROLES = ("actor", "critic")
KINDS = ("model", "optim", "extra_state")
_DIR_RE = re.compile(r"^global_step_(\d+)$")
_RANK_RE = re.compile(r"^(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt$")


def parse_step_dirname(name: str) -> int | None:
    """``global_step_120`` -> 120; None for anything else."""
    return match_step(_DIR_RE, name)


class VerlLayout(TrackedLayout):
    """``global_step_N`` directories under VeRL's ``trainer.default_local_dir``."""

    name = "verl"
    tracker_name = TRACKER

    def detect(self, storage: Storage) -> bool:
        return bool(step_entries(storage, parse_step_dirname))

    def target_of(self, content: str) -> str | None:
        try:
            n = int(content.strip())
        except ValueError:
            return None
        return f"global_step_{n}" if n >= 0 else None

    def tracker_value(self, info: CheckpointInfo | None) -> str | None:
        return str(info.step) if info else None

    def list(self, storage: Storage) -> builtins.list[CheckpointInfo]:
        return self.mark_tracked(storage, self.list_matching(storage, parse_step_dirname))

    def validate(self, storage: Storage, info: CheckpointInfo, full: bool = True) -> CheckpointInfo:
        def check():
            files = check_step_dir(storage, info.name, info.path, full)
            return {"size": sum_sizes(files), "time": newest_mtime(files, DATA_FILE)}

        return run_check(info, check)


def check_step_dir(storage: Storage, name: str, where: str, full: bool) -> dict[str, Entry]:
    """Validate one ``global_step_N`` directory; raises CorruptCheckpointError. Returns its files (recursively)."""
    files = files_of(storage, name)
    if not files:
        raise fail(where, "the checkpoint directory is missing or empty")
    if "actor" not in files or not files["actor"].is_dir:
        raise fail(where, "actor/ is missing")
    out: dict[str, Entry] = {n: e for n, e in files.items() if not e.is_dir}
    for role in ROLES:
        if role in files and files[role].is_dir:
            for n, e in _check_role(storage, join(name, role), role, where, full).items():
                out[f"{role}/{n}"] = e
    if DATA_FILE not in files:
        raise fail(
            where, f"{DATA_FILE} is missing (VeRL writes the dataloader state after the model: the save never finished)"
        )
    check_torch_zip(storage, join(name, DATA_FILE), where, full, shown=DATA_FILE)
    return out


def _check_role(storage: Storage, rel: str, role: str, where: str, full: bool) -> dict[str, Entry]:
    files = files_of(storage, rel)
    ranks: dict[str, set[int]] = {k: set() for k in KINDS}
    sizes: set[int] = set()
    for n in files:
        m = _RANK_RE.match(n)
        if m:
            ranks[m.group(1)].add(int(m.group(3)))
            sizes.add(int(m.group(2)))
    if not sizes:
        if "dist_ckpt" in files and files["dist_ckpt"].is_dir:
            check_dcp_dir(storage, join(rel, "dist_ckpt"), where, shown=f"{role}/dist_ckpt")
            return {n: e for n, e in files.items() if not e.is_dir}
        raise fail(where, f"{role}/ has no model_world_size_*_rank_*.pt files (the save never finished)")
    if len(sizes) > 1:
        raise fail(where, f"{role}/ mixes world sizes {sorted(sizes)}: leftovers of a run with another world size?")
    world = sizes.pop()
    if "fsdp_config.json" in files:
        cfg = read_json(storage, join(rel, "fsdp_config.json"), where, shown=f"{role}/fsdp_config.json")
        recorded = cfg.get("world_size") if isinstance(cfg, dict) else None
        if isinstance(recorded, int) and recorded != world:
            raise fail(where, f"{role}/fsdp_config.json says world_size {recorded} but the rank files say {world}")
    for kind in KINDS:
        gone = missing_ranks(ranks[kind], world)
        if gone:
            hint = " (checkpoint.save_contents without it cannot resume)" if not ranks[kind] else ""
            raise fail(where, f"{role}/{kind}_world_size_{world}_rank_{gone[0]}.pt is missing{hint}")
        extra = sorted(r for r in ranks[kind] if r >= world)
        if extra:
            raise fail(where, f"{role}/{kind}_world_size_{world}_rank_{extra[0]}.pt has a rank outside the world size")
    for n in sorted(files):
        if n.endswith(".pt") and not files[n].is_dir:
            check_torch_zip(storage, join(rel, n), where, full, shown=f"{role}/{n}")
    return {n: e for n, e in files.items() if not e.is_dir}


register(VerlLayout())
