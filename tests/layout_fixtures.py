"""Builders for foreign checkpoint trees, following each framework's file rules (see src/resumekit/layouts/*.py).

Torch files are real ``torch.save`` zip archives (small), safetensors files are written byte by byte, so every
validity check runs against the same bytes the frameworks produce.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import struct
from collections.abc import Iterable, Sequence

import torch

# --- file primitives --------------------------------------------------------------------------------------------


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@functools.cache
def _small_torch() -> bytes:
    return torch_bytes({"w": torch.arange(4, dtype=torch.float32), "step": 1})


def write(path: str, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def write_torch(path: str, obj=None) -> str:
    return write(path, _small_torch() if obj is None else torch_bytes(obj))


def write_json(path: str, obj) -> str:
    return write(path, json.dumps(obj).encode())


def safetensors_bytes(tensors: dict[str, tuple[str, Sequence[int]]], extra: bytes = b"") -> bytes:
    """A safetensors file: 8-byte LE header length, JSON header, then the zero-filled tensor data."""
    widths = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}
    header, pos = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = widths[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"\0" * pos + extra


def write_safetensors(path: str, tensors: dict[str, tuple[str, Sequence[int]]] | None = None) -> str:
    return write(path, safetensors_bytes(tensors or {"w": ("F32", [4, 4]), "b": ("F32", [4])}))


def truncate(path: str, keep: int) -> None:
    """Keep the first ``keep`` bytes (negative: drop that many from the end)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(keep if keep >= 0 else size + keep)


def cut_central_directory(path: str) -> None:
    """Drop a zip's central directory and end record: what a writer killed before its last write leaves."""
    data = open(path, "rb").read()
    at = data.index(b"PK\x01\x02")
    with open(path, "wb") as f:
        f.write(data[:at])


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# --- HF Trainer -------------------------------------------------------------------------------------------------


def hf_checkpoint(
    root: str,
    step: int,
    *,
    weights: str = "single",
    rng_ranks: Iterable[int] | None = None,
    optimizer: bool = True,
    scheduler: bool = True,
    state: bool = True,
    deepspeed_dp: int = 0,
) -> str:
    """``root/checkpoint-STEP`` as ``Trainer._save_checkpoint`` leaves it; options drop or swap parts."""
    d = os.path.join(root, f"checkpoint-{step}")
    os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "config.json"), {"model_type": "llama"})
    if weights == "single":
        write_safetensors(os.path.join(d, "model.safetensors"))
    elif weights == "sharded":
        shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for s in shards:
            write_safetensors(os.path.join(d, s))
        write_json(
            os.path.join(d, "model.safetensors.index.json"),
            {"metadata": {"total_size": 160}, "weight_map": {"a.w": shards[0], "b.w": shards[1]}},
        )
    elif weights == "lora":
        write_safetensors(os.path.join(d, "adapter_model.safetensors"))
        write_json(os.path.join(d, "adapter_config.json"), {"peft_type": "LORA", "r": 8})
    elif weights == "bin":
        write_torch(os.path.join(d, "pytorch_model.bin"))
    write_torch(os.path.join(d, "training_args.bin"))
    if deepspeed_dp:
        tag = f"global_step{step}"
        deepspeed_tag(d, tag, dp=deepspeed_dp)
        write(os.path.join(d, "latest"), tag.encode())
    elif optimizer:
        write_torch(os.path.join(d, "optimizer.pt"))
    if scheduler and not deepspeed_dp:
        write_torch(os.path.join(d, "scheduler.pt"))
    if rng_ranks is None:
        write_torch(os.path.join(d, "rng_state.pth"))
    else:
        for r in rng_ranks:
            write_torch(os.path.join(d, f"rng_state_{r}.pth"))
    if state:
        write_json(os.path.join(d, "trainer_state.json"), {"global_step": step, "epoch": 0.5, "log_history": []})
    return d


# --- DeepSpeed --------------------------------------------------------------------------------------------------


def deepspeed_tag(
    root: str,
    tag: str,
    *,
    dp: int = 2,
    mp: int = 1,
    zero3: bool = False,
    bf16: bool = False,
    recorded_dp: int | None = None,
) -> str:
    """``root/TAG`` as ``DeepSpeedEngine.save_checkpoint`` writes it (without ``latest``)."""
    d = os.path.join(root, tag)
    states = {
        "module": {"w": torch.zeros(2)},
        "optimizer": None,
        "param_shapes": [{"w": [2]}],
        "dp_world_size": dp if recorded_dp is None else recorded_dp,
        "mp_world_size": mp,
    }
    for m in range(mp):
        if zero3:
            for r in range(dp):
                write_torch(os.path.join(d, f"zero_pp_rank_{r}_mp_rank_{m:02d}_model_states.pt"), states)
        else:
            write_torch(os.path.join(d, f"mp_rank_{m:02d}_model_states.pt"), states)
        for r in range(dp):
            prefix = "bf16_" if bf16 else ""
            write_torch(os.path.join(d, f"{prefix}zero_pp_rank_{r}_mp_rank_{m:02d}_optim_states.pt"))
    return d


# --- Megatron ---------------------------------------------------------------------------------------------------


def megatron_iter(
    root: str,
    iteration: int,
    *,
    fmt: str = "torch_dist",
    grid: tuple[int, ...] = (2,),
    distrib_optim: bool = False,
    args_grid: tuple[int, int, int] | None = None,
    name: str | None = None,
) -> str:
    """``root/iter_%07d`` in the torch_dist, torch_dcp or legacy (torch) format."""
    d = os.path.join(root, name or f"iter_{iteration:07d}")
    os.makedirs(d, exist_ok=True)
    if fmt == "none":
        return d
    if fmt in ("torch_dist", "torch_dcp"):
        for r in range(2):
            write(os.path.join(d, f"__{r}_0.distcp"), b"\x01" * 64)
        write(os.path.join(d, ".metadata"), b"\x80\x02pickled-metadata")
        if fmt == "torch_dist":
            write_torch(os.path.join(d, "common.pt"))
            write_json(
                os.path.join(d, "metadata.json"), {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
            )
        return d
    tp, pp, ep = args_grid or (grid + (1, 1, 1))[:3]
    args = argparse.Namespace(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
    )
    dims = [range(n) for n in grid]
    import itertools

    for coord in itertools.product(*dims):
        parts = [f"{coord[0]:02d}"] + [f"{c:03d}" for c in coord[1:]]
        sub = os.path.join(d, "mp_rank_" + "_".join(parts))
        write_torch(os.path.join(sub, "model_optim_rng.pt"), {"iteration": iteration, "args": args})
        if distrib_optim:
            write_torch(os.path.join(sub, "distrib_optim.pt"))
    return d


# --- VeRL -------------------------------------------------------------------------------------------------------


def verl_step(
    root: str, step: int, *, world: int = 2, critic: bool = False, data: bool = True, fsdp_world: int | None = None
) -> str:
    d = os.path.join(root, f"global_step_{step}")
    for role in ["actor"] + (["critic"] if critic else []):
        for kind in ("model", "optim", "extra_state"):
            for r in range(world):
                write_torch(os.path.join(d, role, f"{kind}_world_size_{world}_rank_{r}.pt"))
        write_json(
            os.path.join(d, role, "fsdp_config.json"),
            {"FSDP_version": 1, "world_size": world if fsdp_world is None else fsdp_world},
        )
        write_json(os.path.join(d, role, "huggingface", "config.json"), {"model_type": "qwen2"})
    if data:
        write_torch(os.path.join(d, "data.pt"))
    return d


# --- Lightning --------------------------------------------------------------------------------------------------


def lightning_ckpt(path: str, global_step: int, *, epoch: int = 0, drop: Sequence[str] = ()) -> str:
    ckpt = {
        "epoch": epoch,
        "global_step": global_step,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {"layer.weight": torch.zeros(2, 2)},
        "loops": {"fit_loop": {"state_dict": {}}},
        "callbacks": {},
        "optimizer_states": [{"state": {}, "param_groups": []}],
        "lr_schedulers": [],
    }
    for k in drop:
        ckpt.pop(k)
    return write(path, torch_bytes(ckpt))


def set_mtime(path: str, t: float) -> None:
    os.utime(path, (t, t), follow_symlinks=False)


# --- resumekit manifests (what integrations/hf.py writes, without importing transformers) ------------------------


def foreign_manifest(ckpt_dir: str, step: int) -> str:
    from resumekit.format import FileEntry, Manifest
    from resumekit.layouts.checks import FOREIGN_MANIFEST
    from resumekit.storage import LocalStorage
    from resumekit.verify import hash_file

    st = LocalStorage(ckpt_dir, create=False)
    files = {}
    for base, _, names in os.walk(ckpt_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(base, n), ckpt_dir).replace(os.sep, "/")
            if rel != FOREIGN_MANIFEST:
                files[rel] = FileEntry(*hash_file(st, rel))
    return write(os.path.join(ckpt_dir, FOREIGN_MANIFEST), Manifest(step=step, files=files).to_json())


def member_data_offset(path: str, suffix: str = "/data/0") -> int:
    """Where a zip member's stored bytes start (to damage data without touching any header)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        zi = next(i for i in zf.infolist() if i.filename.endswith(suffix))
    with open(path, "rb") as f:
        f.seek(zi.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return zi.header_offset + 30 + name_len + extra_len
