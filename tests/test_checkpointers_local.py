"""The Checkpointer protocol, driven directly on the single-process implementation (no manager)."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import make_training
from resumekit.checkpointers import LocalCheckpointer
from resumekit.checkpointers.base import candidates_at, is_committed, not_found_reason, remove_stale_tmp
from resumekit.errors import CorruptCheckpointError
from resumekit.format import TENSORS_FILE, step_dirname
from resumekit.storage import open_storage


def _save(cp, step, state, stage=False):
    snap = cp.snapshot(step, state, metadata={"loss": 1.5}, stage=stage, rng=True, skip_if_committed=False)
    return cp.persist(snap, background=stage)


@pytest.mark.parametrize("stage", [False, True])
def test_snapshot_persist_open_load_round_trip(tmp_path, stage):
    cp = LocalCheckpointer(open_storage(str(tmp_path)))
    state = make_training(seed=1)
    committed = _save(cp, 7, state, stage=stage)
    assert committed.step == 7 and committed.path == str(tmp_path / step_dirname(7)) and committed.nbytes > 0
    (cand,) = cp.candidates()
    assert (cand.step, cand.name, cand.explicit, cand.remote) == (7, step_dirname(7), False, False)
    opened = cp.open(cand)
    assert opened.info.valid and opened.info.metadata == {"loss": 1.5} and opened.info.size == committed.nbytes
    fresh = make_training(seed=2)
    loaded = cp.load(opened, fresh, only=None, strict=True, rng=False)
    assert loaded == list(state)
    for a, b in zip(state["model"].parameters(), fresh["model"].parameters(), strict=True):
        assert torch.equal(a, b)
    cp.release()


def test_staged_snapshot_is_a_copy_taken_at_snapshot_time(tmp_path):
    cp = LocalCheckpointer(open_storage(str(tmp_path)))
    state = make_training()
    snap = cp.snapshot(1, state, metadata={}, stage=True, rng=False, skip_if_committed=False)
    before = [p.detach().clone() for p in state["model"].parameters()]
    with torch.no_grad():
        for p in state["model"].parameters():
            p.add_(1.0)  # training goes on while the persist has not run yet
    cp.persist(snap, background=True)
    fresh = make_training(seed=5)
    cp.load(cp.open(cp.candidates()[0]), fresh, only=["model"], strict=True, rng=False)
    for want, got in zip(before, fresh["model"].parameters(), strict=True):
        assert torch.equal(want, got)


def test_skip_if_committed_only_skips_a_valid_commit(tmp_path):
    st = open_storage(str(tmp_path))
    cp = LocalCheckpointer(st)
    state = make_training()
    _save(cp, 3, state)
    assert is_committed(st, step_dirname(3))
    assert cp.snapshot(3, state, metadata={}, stage=False, rng=False, skip_if_committed=True) is None
    os.truncate(tmp_path / step_dirname(3) / TENSORS_FILE, 10)
    assert not is_committed(st, step_dirname(3))
    assert cp.snapshot(3, state, metadata={}, stage=False, rng=False, skip_if_committed=True) is not None


def test_candidates_newest_first_and_explicit_paths(tmp_path):
    cp = LocalCheckpointer(open_storage(str(tmp_path)))
    state = make_training()
    for s in (2, 10, 9):
        _save(cp, s, state)
    assert [c.step for c in cp.candidates()] == [10, 9, 2]  # integer order, not text order
    (one,) = cp.candidates(str(tmp_path / step_dirname(9)))
    assert one.explicit and one.step == 9
    assert [c.step for c in candidates_at(str(tmp_path))] == [10, 9, 2]  # a run directory: not explicit
    assert not any(c.explicit for c in candidates_at(str(tmp_path)))


def test_open_refuses_a_damaged_candidate_with_the_reason(tmp_path):
    cp = LocalCheckpointer(open_storage(str(tmp_path)))
    _save(cp, 4, make_training())
    path = tmp_path / step_dirname(4) / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        cp.open(cp.candidates()[0])


def test_not_found_reason_says_what_to_pass():
    assert not_found_reason("/x/step_000000004") == "its manifest.json is missing: that save never finished"
    assert not_found_reason("/x/run/") == "pass a step_N directory or a run directory that holds one"


def test_remove_stale_tmp_removes_only_tmp_dirs(tmp_path):
    st = open_storage(str(tmp_path))
    (tmp_path / ".tmp-step_000000001-abc").mkdir()
    (tmp_path / ".tmp-step_000000001-abc" / "x").write_bytes(b"1")
    _save(LocalCheckpointer(st), 1, make_training())
    remove_stale_tmp(st)
    assert sorted(os.listdir(tmp_path)) == [step_dirname(1)]
