"""The cost of per-sample seeding in ``ResumableDataLoader`` (issue 13), against a realistic ``__getitem__``: decode
a small PNG (PIL) and augment it with python ``random``, numpy and torch (random crop, flip, colour jitter, noise).

Measured in one process, back to back, one torch thread:

* ``seed_us_per_sample``: seeding python ``random``, numpy's global generator and torch's CPU generator from
  ``(seed, epoch, index)``: what a worker process pays per sample;
* ``main_process_us_per_sample``: the same plus saving and restoring the three global states once per batch around
  the fetch and once around ``collate_fn``, spread over the batch: what ``num_workers=0`` pays per sample;
* ``getitem_us``: the decode + augment ``__getitem__`` alone; ``seed_fraction`` = seeding / ``__getitem__``;
* ``loader_*_us_per_sample``: a whole epoch through ``ResumableDataLoader(num_workers=0)`` with seeding on and off,
  and ``loader_overhead_fraction``, the difference over the time with seeding off.

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from resumekit.data import ResumableDataLoader
from resumekit.data.seeding import restore_global_rngs, sample_seed, save_global_rngs, seed_global_rngs


def synthetic_pngs(n: int, side: int) -> list[bytes]:
    """``n`` distinct smooth RGB images (gradients plus blobs, like a photo compresses), PNG-encoded."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(0.5, 3.0, 3)
        img = np.stack([np.sin(a * xx * 6 + b), np.cos(b * yy * 5 + c), np.sin((xx + yy) * c * 4)], -1)
        img = (img * 0.4 + 0.5 + rng.normal(0, 0.03, img.shape)).clip(0, 1)
        buf = io.BytesIO()
        Image.fromarray((img * 255).astype(np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


class PngDataset(torch.utils.data.Dataset):
    """Decode + augment, drawing from all three global RNGs as ordinary augmentation code does."""

    def __init__(self, pngs: list[bytes], crop: int):
        self.pngs = pngs
        self.crop = crop

    def __len__(self) -> int:
        return len(self.pngs)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = np.array(Image.open(io.BytesIO(self.pngs[i])).convert("RGB"))
        x = torch.from_numpy(img).permute(2, 0, 1).float().div_(255)
        side = x.shape[-1]
        top, left = random.randint(0, side - self.crop), random.randint(0, side - self.crop)
        x = x[:, top : top + self.crop, left : left + self.crop]
        if random.random() < 0.5:
            x = x.flip(-1)
        x = x * (0.8 + 0.4 * torch.rand(1)) + (torch.rand(3, 1, 1) - 0.5) * 0.1  # brightness, colour shift
        x = x + torch.from_numpy(np.random.normal(0, 0.02, x.shape).astype(np.float32))
        return (x - 0.5) / 0.25


def per_call_us(fn: Callable[[int], object], n: int, repeats: int) -> float:
    """The best of ``repeats`` mean times of ``fn(i)`` for i in range(n), in microseconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def loader_us(ds: PngDataset, batch: int, repeats: int) -> tuple:
    """Best time per sample of a whole epoch through the loader (main process), seeding on and off; the two are
    measured alternately so that load from elsewhere on the machine hits both alike."""
    best = {True: float("inf"), False: float("inf")}
    for epoch in range(repeats):
        for on in (True, False):
            ld = ResumableDataLoader(ds, batch_size=batch, seed=0, seed_per_sample=on)
            ld.set_epoch(epoch)
            t = time.perf_counter()
            for _ in ld:
                pass
            best[on] = min(best[on], (time.perf_counter() - t) / len(ds))
    return best[True] * 1e6, best[False] * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--side", type=int, default=64, help="image side in pixels (PNG)")
    p.add_argument("--crop", type=int, default=56)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    ds = PngDataset(synthetic_pngs(a.images, a.side), a.crop)
    n = a.images

    getitem = per_call_us(ds.__getitem__, n, a.repeats)
    seed = per_call_us(lambda i: seed_global_rngs(sample_seed(0, 1, i)), n, a.repeats)

    def save_restore(_: int) -> None:
        restore_global_rngs(save_global_rngs())

    # two save/restore pairs per batch (fetch, collate) in the main process
    pair = per_call_us(save_restore, n, a.repeats)
    main = seed + 2 * pair / a.batch
    on, off = loader_us(ds, a.batch, a.repeats)
    res = {
        "bench": "seeding",
        "image": f"{a.side}x{a.side} PNG, crop {a.crop}",
        "getitem_us": round(getitem, 1),
        "seed_us_per_sample": round(seed, 2),
        "seed_fraction": round(seed / getitem, 4),
        "main_process_us_per_sample": round(main, 2),
        "main_process_fraction": round(main / getitem, 4),
        "loader_on_us_per_sample": round(on, 1),
        "loader_off_us_per_sample": round(off, 1),
        "loader_overhead_fraction": round((on - off) / off, 4),
    }
    print(
        f"__getitem__ (decode {a.side}x{a.side} PNG + augment): {getitem:.1f} us; per-sample seeding: {seed:.2f} us "
        f"in a worker ({seed / getitem:.1%}), {main:.2f} us with num_workers=0 ({main / getitem:.1%}); "
        f"whole epoch through the loader: {on:.1f} vs {off:.1f} us/sample ({(on - off) / off:+.1%})"
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
