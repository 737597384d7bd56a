"""PyTorch Lightning with resumekit: resume from the newest *valid* ``.ckpt``, bitwise equal to a run never stopped.

Runs on a CPU in seconds (a small MLP with dropout, synthetic data, no downloads)::

    python examples/lightning_train.py --root runs/pl          # kill it any time (Ctrl-C, kill -9), run it again
    resumekit run --dir runs/pl --layout lightning -- python examples/lightning_train.py --root runs/pl

What makes the resume exact:

* ``ckpt_path=resume_path(root)``: under ``resumekit run`` the checkpoint the supervisor verified
  (``RESUMEKIT_RESUME_FROM``; unset when nothing valid exists, then the run starts from scratch); run alone, the
  newest ``.ckpt`` under ``root`` that validates. Lightning's default directories put each start's checkpoints in a
  new ``lightning_logs/version_N/checkpoints/``; the lightning layout looks in all of them.
* :class:`resumekit.ResumableDataLoader` as the training loader: Lightning saves its ``state_dict()`` (the position
  in the epoch's order) and restores it, so a resumed epoch continues with the next batch, not from its start.
* :class:`ResumekitCallback`: every RNG saved and restored (dropout and the noise below draw from torch's), a
  checksum manifest beside every ``.ckpt``, a save at the next step on SIGTERM, heartbeat and events for
  ``resumekit run``.

``--resume last`` passes ``ckpt_path="last"`` instead, as many Lightning scripts do. Lightning then looks only in
*this* start's ModelCheckpoint directory, which with the default logger is a new ``version_N`` every start (so it
never finds the previous start's ``last.ckpt``); give ModelCheckpoint a fixed ``dirpath`` (``--ckpt-dir``) for it.
Under ``resumekit run`` an invalid ``last.ckpt`` is moved aside before the start.
"""

from __future__ import annotations

import argparse
import os

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import resumekit
from resumekit.integrations.lightning import ResumekitCallback, resume_path


class Regressor(L.LightningModule):
    """A two-layer MLP with dropout, trained on noisy inputs (two consumers of the torch RNG)."""

    def __init__(self, width: int = 32, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(width, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x + 0.01 * torch.randn_like(x)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=os.environ.get("RESUMEKIT_DIR", "runs/pl"), help="default_root_dir")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=5, help="save every N steps")
    parser.add_argument("--resume", choices=("auto", "last"), default="auto")
    parser.add_argument("--ckpt-dir", default=None, help="ModelCheckpoint dirpath (default: Lightning's)")
    args = parser.parse_args()

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(256, 16, generator=g), torch.randn(256, 1, generator=g))
    loader = resumekit.ResumableDataLoader(data, batch_size=16, seed=0)
    checkpoints = ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=args.every, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        default_root_dir=args.root,
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=1,
        callbacks=[checkpoints, ResumekitCallback(metrics_every=1)],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt_path = "last" if args.resume == "last" else resume_path(args.root)
    trainer.fit(Regressor(), loader, ckpt_path=ckpt_path)
    print(f"done at step {trainer.global_step}; checkpoints in {checkpoints.dirpath}")


if __name__ == "__main__":
    main()
