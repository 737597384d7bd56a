"""The training job of ``bench_goodput.py``: the demo's model (or the demo's model plus a big buffer, for a
~1 GiB state) trained with the four resumekit lines, one step every ``--step-time`` seconds.

Each step is the demo's real batch fetch and forward/backward/optimizer step, padded with a sleep to ``--step-time``
so that the step time is known and the machine stays quiet; the step's own duration (from the end of the previous
``maybe_save`` to the call of this one, so save stalls are not in it) is reported as the ``step_time`` metric.
``--calibrate K`` saves K times outside the supervisor and
prints one JSON line with the measured save cost (what Young's rule needs).

    python benchmarks/goodput_job.py --dir D --every-seconds 5 --steps 100000
    python benchmarks/goodput_job.py --dir D --state-mib 1024 --calibrate 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

PROGRESS = "progress.jsonl"  # one {"pid", "step"} line per step trained


def build(state_mib: int, seed: int = 0):
    import numpy as np
    import torch

    from resumekit.data import ResumableDataLoader

    torch.set_num_threads(1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2048, 64, generator=g)
    y = (x[:, :8].sum(1, keepdim=True) > 0).float()
    ds = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 1)
    )
    if state_mib:
        # Frozen weights of a bigger model: they are checkpointed and restored like any other state.
        model.register_buffer("frozen", torch.rand((state_mib << 20) // 4, generator=g))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = ResumableDataLoader(ds, batch_size=32, seed=seed)
    return model, opt, loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--steps", type=int, default=10**9)
    ap.add_argument("--every-seconds", type=float, default=None)
    ap.add_argument("--step-time", type=float, default=0.05)
    ap.add_argument("--state-mib", type=int, default=0)
    ap.add_argument("--sync", action="store_true", help="blocking saves (default: async)")
    ap.add_argument("--calibrate", type=int, default=0, metavar="K")
    args = ap.parse_args()

    import torch

    from resumekit import CheckpointManager

    model, opt, loader = build(args.state_mib)
    state = {"model": model, "optim": opt, "loader": loader}
    mgr = CheckpointManager(args.dir, every_seconds=args.every_seconds, keep_last=2, async_save=not args.sync)
    if args.calibrate:
        for step in range(1, args.calibrate + 1):
            mgr.save(step, state)
            mgr.wait()
        c = mgr.cost
        print(json.dumps({"blocking_s": c.blocking_s_mean, "persist_s": c.persist_s_mean, "bytes": c.bytes_last}))
        mgr.close()
        return
    step = mgr.restore(state)
    epoch_len = len(loader)
    # Every step, for the bench's ground truth of redone work (the job's own reports are rate-limited).
    progress = open(os.path.join(args.dir, PROGRESS), "a", buffering=1)  # open for the whole run
    t0 = time.perf_counter()  # a step runs from the end of the previous maybe_save: fetching its batch included
    while step < args.steps:
        loader.set_epoch(step // epoch_len)
        for xb, yb in loader:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = loss.item()
            left = args.step_time - (time.perf_counter() - t0)
            if left > 0:
                time.sleep(left)
            step += 1
            progress.write(f'{{"pid": {os.getpid()}, "step": {step}}}\n')
            mgr.maybe_save(step, state, metrics={"loss": value, "step_time": time.perf_counter() - t0})
            t0 = time.perf_counter()
            if step >= args.steps:
                break
    mgr.save(step, state, block=True)
    mgr.close()


if __name__ == "__main__":
    main()
