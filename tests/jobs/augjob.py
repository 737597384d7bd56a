"""The training script of issue 13, as a new user writes it: an MLP with batch norm and dropout, AdamW, OneCycleLR,
gradient clipping, and a ``ResumableDataLoader(shuffle=True, num_workers=...)`` over a dataset whose
``__getitem__`` augments with torch, numpy and python ``random`` (global RNGs, no seeding by hand).

It follows the job contract of ``resumekit run`` through ``CheckpointManager`` and appends one progress record per
step (``step``, ``pid``, a hash of the batch's bytes, the loss, the worker count) to ``DIR/progress.jsonl``.
``--workers 2,0,3`` picks the worker count of each attempt from ``RESUMEKIT_RESTART_COUNT`` (2 for the first start,
0 after the first restart, 3 after the second, ...), so a run resumed with other workers can be compared with a
straight one.

    python tests/jobs/augjob.py --dir D --steps 60 --save-every 4 --workers 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random

import numpy as np
import torch

import resumekit

PROGRESS = "progress.jsonl"
N, FEATURES, CLASSES, BATCH = 160, 6, 3, 8  # 20 batches per epoch


class Augmented(torch.utils.data.Dataset):
    """Fixed base data; every read adds noise from the three global RNGs and flips at random."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(N, FEATURES, generator=g)
        self.y = (self.x[:, :2].sum(1) > 0).long() + (self.x[:, 2] > 1).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        x = self.x[i] + 0.1 * torch.randn(FEATURES)
        x = x + torch.from_numpy(np.random.normal(0.0, 0.1, FEATURES).astype(np.float32))
        x = x * random.uniform(0.9, 1.1)
        if random.random() < 0.5:
            x = x.flip(0)
        return i, x, self.y[i]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=os.environ.get("RESUMEKIT_DIR"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=4)
    p.add_argument("--workers", default="2", help="comma-separated worker counts, one per attempt, cycling")
    p.add_argument("--async", dest="async_save", action="store_true")
    a = p.parse_args()
    cycle = [int(w) for w in a.workers.split(",")]
    workers = cycle[int(os.environ.get("RESUMEKIT_RESTART_COUNT", "0")) % len(cycle)]

    torch.set_num_threads(1)  # one thread split: bitwise reproducible on one machine
    resumekit.seed_everything(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 32),
        torch.nn.BatchNorm1d(32),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(32, CLASSES),
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=1e-2, total_steps=a.steps)
    extra = {"multiprocessing_context": "fork"} if workers else {}  # workers start in milliseconds
    loader = resumekit.ResumableDataLoader(
        Augmented(), batch_size=BATCH, shuffle=True, seed=0, num_workers=workers, auto_epoch=True, **extra
    )
    mgr = resumekit.CheckpointManager(a.dir, every_steps=a.save_every, keep_last=3, async_save=a.async_save)
    state = {"model": model, "optim": optim, "sched": sched, "data": loader}
    step = mgr.restore(state)
    progress = open(os.path.join(a.dir, PROGRESS), "a", buffering=1)
    while step < a.steps:
        for idx, x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            step += 1
            digest = hashlib.sha1(idx.numpy().tobytes() + x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
            rec = {"step": step, "pid": os.getpid(), "batch": digest, "loss": loss.item().hex(), "workers": workers}
            progress.write(json.dumps(rec) + "\n")
            mgr.maybe_save(step, state)
            if step == a.steps:
                break
    mgr.save(a.steps, state, block=True)  # the final state both runs are compared on
    mgr.close()
    progress.close()


if __name__ == "__main__":
    main()
