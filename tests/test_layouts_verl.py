"""VeRL layout: global_step_N with per-rank actor/critic files, data.pt, the (non-atomic) tracker."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

import layout_fixtures as F
from resumekit.cli import main
from resumekit.layouts import detect_layout, get_layout
from resumekit.storage import open_storage

verl = get_layout("verl")
TRACKER = "latest_checkpointed_iteration.txt"


def st(root):
    return open_storage(str(root), create=False)


def check(root, name, full=True):
    s = st(root)
    info = next(i for i in verl.list(s) if i.name == name)
    return verl.validate(s, info, full=full)


@pytest.mark.parametrize("kwargs", [{}, {"world": 1}, {"world": 4, "critic": True}])
def test_valid(tmp_path, kwargs):
    F.verl_step(str(tmp_path), 20, **kwargs)
    got = check(tmp_path, "global_step_20")
    assert (got.valid, got.reason, got.step) == (True, "", 20)
    assert detect_layout(st(tmp_path)).name == "verl"


def _rm(*parts):
    return lambda d: os.remove(os.path.join(d, *parts))


@pytest.mark.parametrize(
    "kwargs,damage,reason",
    [
        (
            {"data": False},
            None,
            "data.pt is missing (VeRL writes the dataloader state after the model: the save never finished)",
        ),
        ({}, _rm("actor", "optim_world_size_2_rank_1.pt"), "actor/optim_world_size_2_rank_1.pt is missing"),
        ({"world": 4}, _rm("actor", "model_world_size_4_rank_0.pt"), "actor/model_world_size_4_rank_0.pt is missing"),
        (
            {},
            lambda d: [os.remove(os.path.join(d, "actor", f"optim_world_size_2_rank_{r}.pt")) for r in (0, 1)],
            "actor/optim_world_size_2_rank_0.pt is missing (checkpoint.save_contents without it cannot resume)",
        ),
        (
            {"critic": True},
            _rm("critic", "extra_state_world_size_2_rank_1.pt"),
            "critic/extra_state_world_size_2_rank_1.pt is missing",
        ),
        ({}, lambda d: shutil.rmtree(os.path.join(d, "actor")), "actor/ is missing"),
        ({"fsdp_world": 4}, None, "actor/fsdp_config.json says world_size 4 but the rank files say 2"),
        (
            {},
            lambda d: F.write_torch(os.path.join(d, "actor", "model_world_size_4_rank_3.pt")),
            "actor/ mixes world sizes [2, 4]: leftovers of a run with another world size?",
        ),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "actor", "extra_state_world_size_2_rank_0.pt"), -1),
            "actor/extra_state_world_size_2_rank_0.pt is not a complete torch file: its zip central directory is "
            "missing "
            "(truncated or still being written)",
        ),
        (
            {},
            lambda d: F.cut_central_directory(os.path.join(d, "data.pt")),
            "data.pt is not a complete torch file: its zip central directory is missing (truncated or still being "
            "written)",
        ),
    ],
)
def test_invalid(tmp_path, kwargs, damage, reason):
    d = F.verl_step(str(tmp_path), 20, **kwargs)
    if damage:
        damage(d)
    got = check(tmp_path, "global_step_20")
    assert (got.valid, got.reason) == (False, reason)


def test_latest_and_repair(tmp_path):
    root = str(tmp_path)
    for s in (5, 10, 15):
        F.verl_step(root, s)
    os.remove(os.path.join(root, "global_step_15", "data.pt"))  # killed before the dataloader state
    # VeRL's async save never writes the tracker; a plain open("w") killed midway leaves it empty.
    F.write(os.path.join(root, TRACKER), b"")
    best, skipped = verl.latest(st(root))
    assert best.name == "global_step_10" and [s.name for s in skipped] == ["global_step_15"]
    res = verl.repair(st(root))
    assert (res.old, res.new, res.changed) == ("", "10", True)
    assert res.message == (
        "latest_checkpointed_iteration.txt is empty; set it to '10' (old content kept in "
        "latest_checkpointed_iteration.txt.bak)"
    )
    assert open(os.path.join(root, TRACKER)).read() == "10\n"
    assert int(open(os.path.join(root, TRACKER), "rb").read().decode()) == 10  # how VeRL reads it back
    assert [i.name for i in verl.list(st(root)) if i.metadata.get("tracked")] == ["global_step_10"]


def test_tracker_pointing_at_missing_step(tmp_path):
    root = str(tmp_path)
    F.verl_step(root, 9)
    F.verl_step(root, 10)
    F.write(os.path.join(root, TRACKER), b"12")
    r = CliRunner().invoke(main, ["repair", root, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["layout"], doc["old"], doc["new"]) == ("verl", "12", "10")
    assert doc["message"].startswith("latest_checkpointed_iteration.txt points at global_step_12, which does not exist")
    r = CliRunner().invoke(main, ["latest", root])
    assert r.stdout.strip() == os.path.join(root, "global_step_10")
