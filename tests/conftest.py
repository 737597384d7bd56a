"""Shared fixtures: a tiny but complete training state (model, optimizer, scheduler, scaler, loader, RNG)."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests must never inherit a supervisor's hand-off from the shell that runs them.
for _k in ("RESUMEKIT_RESUME_FROM", "RESUMEKIT_HEARTBEAT", "RESUMEKIT_EVENTS", "RESUMEKIT_DIR"):
    os.environ.pop(_k, None)
# Every Python process the tests start skips its last garbage collection at exit (seconds per torch process on 2
# cores; see tests/fastexit/sitecustomize.py). RESUMEKIT_TEST_FULL_EXIT=1: the interpreter's full exit instead.
if not os.environ.get("RESUMEKIT_TEST_FULL_EXIT"):
    _FASTEXIT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastexit")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_FASTEXIT, os.environ.get("PYTHONPATH", "")) if p)

from s3_fixtures import fault_proxy, moto_server, s3_bucket  # noqa: E402,F401 - S3 endpoint fixtures, lazy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable


def make_training(seed: int = 0, width: int = 16, n: int = 64, batch: int = 8):
    import torch

    from resumekit import ResumableDataLoader

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True)
    ds = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    loader = ResumableDataLoader(ds, batch_size=batch, seed=seed)
    return {"model": model, "optim": opt, "sched": sched, "scaler": scaler, "loader": loader, "epoch": 0}


def agreed_events(tier):
    """The ``resume_agreed`` events a node tier's event log holds (sharded restores through a node tier)."""
    from resumekit.events import read_events

    return [e for e in read_events(os.path.join(str(tier), "events.jsonl")) if e["event"] == "resume_agreed"]


def restore_through_tier(root, tier, **kw):
    """A world-of-one sharded restore of a fresh :func:`make_training` state from ``root`` through the node tier
    ``tier``; returns (the step it starts at, the state)."""
    from resumekit import CheckpointManager

    mgr = CheckpointManager(root, distributed=True, local_tier=str(tier), **kw)
    state = make_training()
    start = mgr.restore(state)
    mgr.close()
    return start, state


def train_steps(state, steps: int, mgr=None, start: int = 0):
    """Run ``steps`` optimisation steps from ``start``, calling ``mgr.maybe_save`` after each."""
    import torch

    model, opt, sched, scaler, loader = (state[k] for k in ("model", "optim", "sched", "scaler", "loader"))
    per_epoch = len(loader.resumable_sampler.order()) // loader.batch_size
    step = start
    while step < steps:
        loader.set_epoch(step // per_epoch)
        for xb, yb in loader:
            loss = torch.nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            state["epoch"] = step // per_epoch
            if mgr is not None:
                mgr.maybe_save(step, state, metrics={"loss": loss.item()})
            if step >= steps:
                break
    return step


def state_tensors(state):
    """Comparable snapshot of everything that must match bitwise."""
    return {k: (v.state_dict() if hasattr(v, "state_dict") else v) for k, v in state.items()}


def assert_same(a, b, path=""):
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            assert_same(u, v, f"{path}/{i}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, (path, a, b)


@pytest.fixture
def training():
    return make_training
