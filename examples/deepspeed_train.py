"""DeepSpeed (ZeRO-1) with resumekit: resume from the checkpoint the supervisor verified, bitwise exact.

Runs on CPUs (DeepSpeed's CPU accelerator, gloo; ``pip install deepspeed``), one process or several::

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_train.py --save-dir runs/ds
    resumekit run --dir runs/ds --layout deepspeed -- \\
        env DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_train.py --save-dir runs/ds

DeepSpeed restores model, optimizer partitions and LR scheduler by itself, from ``load_checkpoint(dir, tag)``.
:mod:`resumekit.integrations.deepspeed` adds what makes the resumed run the run it should have been: it loads the
tag that ``resumekit run`` verified (``RESUMEKIT_RESUME_FROM``, a tag directory; not whatever ``latest`` says), puts
every rank's RNG states in ``client_state`` and restores them, and the data position travels in ``client_state``
too (:class:`resumekit.ResumableDataLoader`). SIGTERM saves at the end of the step and exits 0.

``--final PATH`` writes the final parameters and optimizer state (rank 0) for comparing runs.
"""

from __future__ import annotations

import argparse
import os

import deepspeed
import torch

import resumekit
from resumekit.integrations import deepspeed as rk


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--save-dir", default=os.environ.get("RESUMEKIT_DIR", "runs/ds"))
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="save every N steps")
    parser.add_argument("--final", default=None, help="write final params + optimizer state here (rank 0)")
    args, _ = parser.parse_known_args()

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(512, 16, generator=g), torch.randn(512, 1, generator=g))
    loader = resumekit.ResumableDataLoader(data, batch_size=8, seed=0, num_replicas=world, rank=rank)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    client = rk.load(engine)  # last before the loop: it restores the RNGs
    if client:
        loader.load_state_dict(client["data"])
    stop = rk.StopFlag()
    steps_per_epoch = loader.resumable_sampler.epoch_length // (8 * world)
    while engine.global_steps < args.max_steps:
        loader.set_epoch(engine.global_steps // steps_per_epoch)
        for x, y in loader:
            x = x + 0.01 * torch.randn_like(x)
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            rk.step(engine, loss)
            step = engine.global_steps
            stopping = stop.requested()
            if step % args.every == 0 or stopping or step == args.max_steps:
                rk.save(engine, args.save_dir, client_state={"data": loader.state_dict()})
            if stopping:
                raise SystemExit(0)
            if step >= args.max_steps:
                break
    if args.final:
        # The optimizer state lives partitioned on the ranks (ZeRO-1); rank 0 writes its own partition and the
        # full fp32 parameters, which is what a comparison of runs needs.
        state = {"params": engine.module.state_dict(), "optim": engine.optimizer.state_dict()}
        if rank == 0:
            torch.save(state, args.final)
    print(f"rank {rank}: done at step {engine.global_steps}")


if __name__ == "__main__":
    main()
