"""Attack: well-formed JSON whose values are not what they claim (issue 12, point 3).

A malformed python or numpy RNG state, a torch RNG state that is not a byte tensor, a device tag ``"foo:99"``, an
unknown tag, a numpy array of Python objects, a plain value of the wrong kind: each used to raise a raw
``TypeError``/``ValueError``/``RuntimeError`` halfway through a restore, after the model and optimizer had already
been overwritten. The whole checkpoint is now validated before the first live object changes: the restore falls
back to the older checkpoint, and with no older one the live objects are bitwise unchanged. ``resumekit verify``
runs the same checks on what a checkpoint holds.
"""

from __future__ import annotations

import io
import random
import shutil

import numpy as np
import pytest
import torch
from attack_helpers import edit_tree, reseal, saved_run
from click.testing import CliRunner

from conftest import assert_same, make_training, state_tensors
from resumekit import CheckpointManager
from resumekit.cli import main
from resumekit.codec import read_tensors, write_tensors
from resumekit.format import TENSORS_FILE, new_hasher, step_dirname


def _python_rng(tree):
    words = tree["rng"]["python"]["v"][1]["v"]
    del words[100:]


def _numpy_rng(tree):
    tree["rng"]["numpy"]["v"][2] = 700  # position past the 624-word key


def _torch_rng_not_bytes(tree):
    tree["rng"]["torch"]["k"] = "model/0.weight"  # a float tensor of the model


def _device(tree):
    tree["state"]["device"] = {"__rk__": "device", "v": "foo:99"}


def _unknown_tag(tree):
    tree["state"]["epoch"] = {"__rk__": "pickle", "v": "Y3Bvc2l4CnN5c3RlbQ=="}


def _object_array(tree):
    tree["rng"]["numpy"]["v"][1]["dtype"] = "|O"


def _plain_value(tree):
    tree["state"]["epoch"] = "foo"


#: case -> (damage, reason, whether `resumekit verify` can see it without the live objects)
CASES = {
    "python-rng": (_python_rng, "state.json: the python RNG state is malformed", True),
    "numpy-rng": (_numpy_rng, "state.json: the numpy RNG state is malformed", True),
    "torch-rng": (_torch_rng_not_bytes, "state.json: the torch RNG state is not a byte tensor", True),
    "device": (_device, "state.json['state']['device']: device 'foo:99' is not a device torch knows", True),
    "unknown-tag": (_unknown_tag, "state.json['state']['epoch']: unknown tag 'pickle'", True),
    "object-array": (_object_array, "numpy dtype '|O' is not a plain data type", True),
    "plain-value": (_plain_value, "state['epoch'] holds a string (str) where the live value is a number (int)", False),
}


def _rng_now():
    return (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_restore_validates_everything_first_and_falls_back(tmp_path, case):
    run = tmp_path / "run"
    run.mkdir()
    saved_run(str(run))
    damage, reason, visible = CASES[case]
    edit_tree(str(run / step_dirname(8)), damage)

    r = CliRunner().invoke(main, ["verify", str(run / step_dirname(8))])
    if visible:
        assert r.exit_code == 1 and reason in r.stdout, r.stdout
    else:
        assert r.exit_code == 0  # only the live objects can tell

    expected = make_training(seed=9)  # what step 4 holds, loaded on its own
    CheckpointManager(str(run), resume=str(run / step_dirname(4)), read_only=True).restore(expected)
    fresh = make_training(seed=5)
    mgr = CheckpointManager(str(run))
    assert mgr.restore(fresh) == 4
    assert reason in mgr.skipped[0].reason
    assert_same(state_tensors(expected)["model"], state_tensors(fresh)["model"])
    mgr.close()

    # With nothing older to fall back to, the live objects are left exactly as they were.
    shutil.rmtree(run / step_dirname(4))
    fresh = make_training(seed=5)
    before, rng_before = state_tensors(fresh), _rng_now()
    mgr = CheckpointManager(str(run))
    assert mgr.restore(fresh) == 0
    assert_same(before, state_tensors(fresh))
    rng_after = _rng_now()
    assert rng_before[0] == rng_after[0] and np.array_equal(rng_before[1], rng_after[1])
    assert torch.equal(rng_before[2], rng_after[2])
    mgr.close()


@pytest.mark.timeout(60)
def test_a_torch_rng_state_of_the_wrong_length_is_refused_before_anything_changes(tmp_path):
    # Shaped right (a byte tensor) but no generator state: only loading it into a scratch generator tells.
    run = tmp_path / "run"
    run.mkdir()
    saved_run(str(run), steps=4)
    ck = run / step_dirname(4)
    path = ck / TENSORS_FILE
    with open(path, "rb") as f:
        tensors = read_tensors(f, path.stat().st_size, str(path), new_hasher())
    assert tensors["<rng>/torch"].dtype == torch.uint8
    tensors["<rng>/torch"] = torch.zeros(10, dtype=torch.uint8)  # 10 bytes, not a generator state
    buf = io.BytesIO()
    write_tensors(buf, tensors, new_hasher())
    reseal(str(ck), TENSORS_FILE, buf.getvalue())
    fresh = make_training(seed=5)
    before = state_tensors(fresh)
    mgr = CheckpointManager(str(run))
    assert mgr.restore(fresh) == 0
    assert "the saved torch RNG state is malformed" in mgr.skipped[0].reason
    assert_same(before, state_tensors(fresh))
    mgr.close()
