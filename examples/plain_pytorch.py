"""The seed guide's plain PyTorch loop, rewritten with resumekit.

The original saved ``ckpt_{epoch}.pth`` with torch.save, found the "latest" by sorting file names as text
(``ckpt_9`` after ``ckpt_10``), loaded it with plain pickle and restored neither the data position, the LR
schedule nor any RNG, so a resumed run was not the run it should have been. Here four lines do all of it, and the
loader makes the random augmentation in ``__getitem__`` exact too, whatever ``num_workers`` is.

Run it, kill it (Ctrl-C or kill -9) at any point, run it again: it continues where it stopped. Under the
supervisor it restarts by itself::

    resumekit run --dir /tmp/rk-example -- python examples/plain_pytorch.py --train_output /tmp/rk-example
"""

import argparse
import os
import random

import torch

import resumekit


class NoisyPoints(torch.utils.data.Dataset):
    """Fixed points with random augmentation drawn from the global RNGs, as most augmentation code does: the loader
    seeds them per sample, so a resumed run sees the same noise."""

    def __init__(self, n: int = 1024):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 32, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + 0.05 * torch.randn(32)
        return (-x if random.random() < 0.1 else x), self.y[i]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_output", default=os.environ.get("RESUMEKIT_DIR", "/tmp/rk-example"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args, _ = parser.parse_known_args()

    resumekit.seed_everything(0)  # before the model is built: its initial weights come from it
    train_loader = resumekit.ResumableDataLoader(  # resumable order, position and per-sample augmentation seeds
        NoisyPoints(), batch_size=32, shuffle=True, seed=0, num_workers=args.workers, auto_epoch=True
    )
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    total_steps = args.epochs * len(train_loader)  # len() is a whole epoch, also after a mid-epoch restore
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)

    mgr = resumekit.CheckpointManager(args.train_output, every_steps=20, keep_last=3)  # 1
    state = {"net": model, "optimizer": optimizer, "scheduler": scheduler, "data": train_loader}
    step = mgr.restore(state)  # 2
    while step < total_steps:
        for images, labels in train_loader:  # auto_epoch: after the last batch of an epoch comes the next epoch
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            mgr.maybe_save(step, state, metrics={"loss": loss.item()})  # 3
            if step == total_steps:
                break
        print(f"epoch {step // len(train_loader) - 1} done at step {step}, loss {loss.item():.4f}")
    mgr.save(step, state)
    mgr.close()  # 4


if __name__ == "__main__":  # worker processes started with spawn/forkserver import this file again
    main()
