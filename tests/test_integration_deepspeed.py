"""The DeepSpeed helper's own logic, with a stand-in engine (DeepSpeed itself runs in `make test-frameworks`)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

import layout_fixtures as F
from resumekit.errors import CheckpointNotFoundError
from resumekit.events import read_events
from resumekit.integrations import deepspeed as rk


class FakeEngine:
    """What the helper uses of a DeepSpeedEngine: global_steps, ranks, save_checkpoint and load_checkpoint."""

    global_rank = 0
    local_rank = 0

    def __init__(self, step=0):
        self.global_steps = step
        self.saved = {}
        self.calls = []

    def save_checkpoint(self, save_dir, tag=None, client_state=None, **kw):
        self.calls.append(("save", save_dir, tag))
        F.deepspeed_tag(save_dir, tag, dp=1)
        F.write(os.path.join(save_dir, "latest"), tag.encode())
        self.saved[(save_dir, tag)] = (self.global_steps, client_state)

    def load_checkpoint(self, load_dir, tag=None, **kw):
        self.calls.append(("load", load_dir, tag, kw))
        if tag is None:
            tag = open(os.path.join(load_dir, "latest")).read().strip()
        if (load_dir, tag) not in self.saved:
            return None, None
        self.global_steps, client = self.saved[(load_dir, tag)]
        return os.path.join(load_dir, tag), dict(client)


def test_split_resume_path(tmp_path):
    root = str(tmp_path)
    F.deepspeed_tag(root, "global_step40", dp=2)
    F.write(os.path.join(root, "latest"), b"global_step40")
    assert rk.split_resume_path(os.path.join(root, "global_step40")) == (root, "global_step40")
    assert rk.split_resume_path(os.path.join(root, "global_step40") + "/") == (root, "global_step40")
    assert rk.split_resume_path(root) == (root, None)  # a save dir: DeepSpeed reads `latest`
    zero3 = F.deepspeed_tag(str(tmp_path / "z"), "best", zero3=True, dp=2)  # any tag name, ZeRO-3 files
    assert rk.split_resume_path(zero3) == (str(tmp_path / "z"), "best")
    with pytest.raises(CheckpointNotFoundError, match="no such checkpoint directory"):
        rk.split_resume_path(os.path.join(root, "global_step99"))


def test_save_then_load_from_the_supervisors_path_restores_rng_and_client_state(tmp_path, monkeypatch):
    events = str(tmp_path / "events.jsonl")
    monkeypatch.setenv("RESUMEKIT_EVENTS", events)
    monkeypatch.delenv("RESUMEKIT_RESUME_FROM", raising=False)
    save_dir = str(tmp_path / "ckpts")
    engine = FakeEngine(step=0)
    assert rk.load(engine) is None  # nothing to resume: from scratch, and it says so

    engine.global_steps = 7
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = rk.save(engine, save_dir, client_state={"data": {"position": 112}})
    assert path == os.path.join(save_dir, "global_step7")
    expected = (random.random(), np.random.rand(), torch.rand(2))

    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    monkeypatch.setenv("RESUMEKIT_RESUME_FROM", path)
    fresh = FakeEngine(step=0)
    fresh.saved = engine.saved
    client = rk.load(fresh, load_optimizer_states=True)
    assert client == {"data": {"position": 112}}  # resumekit's own entry removed
    assert fresh.calls == [("load", save_dir, "global_step7", {"load_optimizer_states": True})]
    assert fresh.global_steps == 7
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])

    all_events = read_events(events)
    assert all_events[0]["event"] == "job_init"  # ends "spawn + imports" in the restart-latency breakdown
    evs = [(e["event"], e["step"], e.get("path")) for e in all_events if e["event"] not in ("job_init", "first_step")]
    assert evs == [("restore", 0, None), ("save", 7, path), ("restore", 7, path)]


def test_load_of_a_tag_deepspeed_cannot_find(tmp_path):
    d = F.deepspeed_tag(str(tmp_path), "global_step3", dp=1)
    with pytest.raises(CheckpointNotFoundError, match="DeepSpeed loaded nothing"):
        rk.load(FakeEngine(), d)


def test_stop_flag(monkeypatch):
    import signal

    before = signal.getsignal(signal.SIGTERM)
    flag = rk.StopFlag()
    try:
        assert not flag.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.requested()
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is before
