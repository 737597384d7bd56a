"""Training-step overhead of async checkpointing: a ~256 MiB model (AdamW: ~768 MiB of state) checkpointed every
10 steps, vs the same loop without checkpointing, measured back to back in one run.

Prints one JSON line with ``step_overhead`` (extra time per step / step time without checkpoints).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

import torch


def make(width: int, layers: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt


def loop(model, opt, steps: int, batch: int, width: int, mgr=None, start: int = 0) -> float:
    x = torch.randn(batch, width)
    t = time.perf_counter()
    for step in range(start + 1, start + steps + 1):
        loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if mgr is not None:
            mgr.maybe_save(step, {"model": model, "optim": opt})
    if mgr is not None:
        mgr.wait()  # the last persist counts too
    return time.perf_counter() - t


def run(model_mb: int, steps: int, every: int, directory: str, batch: int, async_save: bool = True) -> dict:
    from resumekit import CheckpointManager

    width = 2048
    layers = max(1, round((model_mb << 20) / (4 * (width * width + width))))
    model, opt = make(width, layers)
    loop(model, opt, 3, batch, width)  # warm-up: allocates Adam state
    base = [loop(model, opt, steps, batch, width) for _ in range(2)]
    shutil.rmtree(directory, ignore_errors=True)
    mgr = CheckpointManager(
        directory, every_steps=every, keep_last=2, async_save=async_save, handle_sigterm=False, metrics_every=0
    )
    loop(model, opt, every, batch, width, mgr)  # first save allocates the staging buffers once
    # global step numbers keep growing: every loop saves at its multiples of `every`
    with_ckpt = [loop(model, opt, steps, batch, width, mgr, start=every + i * steps) for i in range(2)]
    mgr.close()
    shutil.rmtree(directory, ignore_errors=True)
    state_bytes = sum(p.numel() * 4 for p in model.parameters()) * 3
    t0, t1 = min(base), min(with_ckpt)
    return {
        "model_mb": round(sum(p.numel() * 4 for p in model.parameters()) / 2**20),
        "state_mb": state_bytes >> 20,
        "steps": steps,
        "every": every,
        "step_s": t0 / steps,
        "step_s_with_ckpt": t1 / steps,
        "save_blocking_s": mgr.cost.blocking_s_mean,
        "save_persist_s": mgr.cost.persist_s_mean,
        "step_overhead": (t1 - t0) / t0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-mb", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dir", default="bench-out/overhead")
    p.add_argument("--sync", action="store_true", help="synchronous saves, for comparison")
    p.add_argument("--threads", type=int, default=0, help="torch compute threads (0: torch's default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.model_mb, a.steps, a.every, a.dir, a.batch, async_save=not a.sync)
    res["threads"] = torch.get_num_threads()
    res["async"] = not a.sync
    print(
        json.dumps(
            {"bench": "step_overhead", **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()}}
        )
    )


if __name__ == "__main__":
    main()
