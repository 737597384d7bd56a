"""The seed guide's plain PyTorch loop, rewritten with resumekit.

The original saved ``ckpt_{epoch}.pth`` with torch.save, found the "latest" by sorting file names as text
(``ckpt_9`` after ``ckpt_10``), loaded it with plain pickle and restored neither the data position, the LR
schedule nor any RNG, so a resumed run was not the run it should have been. Here four lines do all of it.

Run it, kill it (Ctrl-C or kill -9) at any point, run it again: it continues where it stopped. Under the
supervisor it restarts by itself::

    resumekit run --dir /tmp/rk-example -- python examples/plain_pytorch.py --train_output /tmp/rk-example
"""

import argparse
import os

import torch

import resumekit

parser = argparse.ArgumentParser()
parser.add_argument("--train_output", default=os.environ.get("RESUMEKIT_DIR", "/tmp/rk-example"))
parser.add_argument("--epochs", type=int, default=3)
args, _ = parser.parse_known_args()

torch.manual_seed(0)
data = torch.utils.data.TensorDataset(torch.randn(1024, 32), torch.randint(0, 4, (1024,)))
train_loader = resumekit.ResumableDataLoader(data, batch_size=32, seed=0)  # resumable data order
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
criterion = torch.nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * len(train_loader))

mgr = resumekit.CheckpointManager(args.train_output, every_steps=20, keep_last=3)  # 1
state = {"net": model, "optimizer": optimizer, "scheduler": scheduler, "data": train_loader}
step = mgr.restore(state)  # 2
steps_per_epoch = len(train_loader.resumable_sampler.order()) // 32
for epoch in range(step // steps_per_epoch, args.epochs):
    train_loader.set_epoch(epoch)
    for images, labels in train_loader:
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        mgr.maybe_save(step, state, metrics={"loss": loss.item()})  # 3
    print(f"epoch {epoch} done at step {step}, loss {loss.item():.4f}")
mgr.save(step, state)
mgr.close()  # 4
