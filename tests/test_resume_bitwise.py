"""Acceptance: a job SIGKILLed at random steps (some inside a save), restarted and resumed, ends bitwise equal to a
straight run: model, optimizer, scheduler, scaler, data position, every RNG, and the batch seen at every step."""

import os
import random
import subprocess
import sys

import pytest

from resumekit.demo.single import batch_sequence, compare_final, run_with_kills
from resumekit.demo.single import job_cmd as _job_cmd
from resumekit.events import EVENTS_FILE, read_events

STEPS, EVERY = 120, 10  # 64 batches per epoch: kills land mid-epoch and across the epoch boundary


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("straight"))
    subprocess.run(_job_cmd(d, STEPS, EVERY, 0, False), check=True)
    return d


@pytest.mark.parametrize("kill_seed,async_save", [(1, False), (2, False), (3, True)])
def test_killed_and_resumed_equals_straight(straight, tmp_path, kill_seed, async_save):
    stats = run_with_kills(
        str(tmp_path), STEPS, EVERY, 0, crashes=3, rng=random.Random(kill_seed), async_save=async_save
    )
    assert stats.kills == 3 and stats.kills_mid_save >= 1, stats.attempts
    assert any(a["reached"] % 64 > 0 for a in stats.attempts[:-1])  # at least one kill mid-epoch
    assert compare_final(straight, str(tmp_path), STEPS) == []
    seq = batch_sequence(str(tmp_path))
    assert seq == batch_sequence(straight) and len(seq) == STEPS
    # With warm restart on (resumekit run's default): the first start is cold, later ones came from the standby.
    warm = [e["warm"] for e in read_events(os.path.join(str(tmp_path), EVENTS_FILE)) if e.get("event") == "start"]
    assert warm[0] is False and sum(warm) >= 1, warm


def test_demo_command_passes(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "resumekit",
            "demo",
            "--dir",
            str(tmp_path),
            "--crashes",
            "2",
            "--steps",
            "80",
            "--seed",
            "7",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    import json

    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["identical"] and out["kills"] == 2 and out["kills_mid_save"] >= 1


def test_tree_diff_finds_every_kind_of_difference():
    import numpy as np
    import torch

    from resumekit.demo import tree_diff

    a = {"t": torch.tensor([0.0, float("nan")]), "l": [1, 2], "n": np.arange(3), "x": float("nan")}
    assert tree_diff(a, {**a}) == []
    b = {"t": torch.tensor([-0.0, float("nan")]), "l": [1], "n": np.arange(1, 4), "x": 1.0, "extra": 1}
    assert sorted(tree_diff(a, b)) == [" (keys)", "/l (length)", "/n", "/t", "/x"]
