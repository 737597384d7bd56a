"""Issue 13, acceptance 1: a user's script with global-RNG augmentation in ``__getitem__`` (torch, numpy, random),
``num_workers=2``, shuffle, batch norm, dropout, AdamW, OneCycleLR and gradient clipping, SIGKILLed 10 times under
``resumekit run`` (mid-epoch and mid-save): every batch's bytes, every loss and the final state equal the straight
run; and the same when the worker count changes between restarts (2 -> 0 -> 3 -> 2 ...)."""

from __future__ import annotations

import os
import random
import subprocess

import pytest

from conftest import PYTHON, REPO
from killrun import differing_steps, run_killed, straight_records
from resumekit.demo.single import compare_final
from resumekit.events import EVENTS_FILE, read_events

JOB = os.path.join(REPO, "tests", "jobs", "augjob.py")
STEPS, EVERY, PER_EPOCH = 120, 4, 20  # 6 epochs; most checkpoints fall mid-epoch


def _job(directory: str, workers: str, async_save: bool):
    cmd = [PYTHON, JOB, "--dir", directory, "--steps", str(STEPS), "--save-every", str(EVERY), "--workers", workers]
    return cmd + (["--async"] if async_save else [])


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("straight"))
    subprocess.run(_job(d, "2", False), check=True)
    return d


@pytest.mark.parametrize(
    "workers,kills,async_save,kill_seed",
    [("2", 10, False, 11), ("2,0,3", 4, True, 12)],
    ids=["workers=2", "workers=2,0,3"],
)
def test_augmenting_job_killed_and_resumed_equals_straight(straight, tmp_path, workers, kills, async_save, kill_seed):
    d = str(tmp_path)
    r = run_killed(_job(d, workers, async_save), d, kills=kills, rng=random.Random(kill_seed))
    assert r["exit_code"] == 0, r["summary"]
    assert r["kills"] == kills and r["kills_mid_save"] >= 1, r["attempts"]
    resumed = [a["resumed_from"] for a in r["attempts"][1:]]
    assert len(resumed) == kills and any(s % PER_EPOCH for s in resumed), resumed  # mid-epoch resumes
    if "," in workers:
        used = [a["last_record"]["workers"] for a in r["attempts"]]
        assert used[:4] == [2, 0, 3, 2], used
    ref = straight_records(straight)
    assert len(ref) == STEPS and len(r["batches"]) == STEPS
    assert differing_steps(ref, r["batches"], ("batch", "loss")) == []
    assert compare_final(straight, d, STEPS) == []
    # Warm restart is on by default: restarts ran in standby interpreters (torch imported ahead), bitwise all the same.
    warm = [e["warm"] for e in read_events(os.path.join(d, EVENTS_FILE)) if e.get("event") == "start"]
    assert warm[0] is False and sum(warm) >= 1, warm
