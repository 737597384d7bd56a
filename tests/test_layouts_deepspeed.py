"""DeepSpeed layout: latest + TAG/ with one file per model- and data-parallel rank."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import layout_fixtures as F
from resumekit.cli import main
from resumekit.layouts import detect_layout, get_layout
from resumekit.layouts.checks import NOT_SCALAR, scan_pickle_scalars
from resumekit.layouts.deepspeed import tag_step
from resumekit.storage import open_storage

ds = get_layout("deepspeed")


def st(root):
    return open_storage(str(root), create=False)


def check(root, name, full=True):
    s = st(root)
    info = next(i for i in ds.list(s) if i.name == name)
    return ds.validate(s, info, full=full)


def test_tag_steps():
    assert tag_step("global_step1200") == 1200
    assert tag_step("epoch3_step40") == 40
    assert tag_step("best") is None


@pytest.mark.parametrize("kwargs", [{}, {"dp": 4, "mp": 2}, {"zero3": True, "dp": 3}, {"bf16": True}])
def test_valid(tmp_path, kwargs):
    F.deepspeed_tag(str(tmp_path), "global_step40", **kwargs)
    F.write(os.path.join(str(tmp_path), "latest"), b"global_step40")
    got = check(tmp_path, "global_step40")
    assert (got.valid, got.reason, got.step, got.metadata) == (True, "", 40, {"tracked": True})
    assert detect_layout(st(tmp_path)).name == "deepspeed"


@pytest.mark.parametrize(
    "kwargs,damage,reason",
    [
        (
            {"dp": 4},
            lambda d: os.remove(os.path.join(d, "zero_pp_rank_2_mp_rank_00_optim_states.pt")),
            "zero_pp_rank_2_mp_rank_00_optim_states.pt is missing (data-parallel ranks 0-3 expected; also missing: 2)",
        ),
        (
            {"dp": 2, "mp": 2},
            lambda d: os.remove(os.path.join(d, "mp_rank_00_model_states.pt")),
            "mp_rank_00_model_states.pt is missing (model-parallel ranks 0-1 expected)",
        ),
        (
            {"dp": 2},
            lambda d: os.remove(os.path.join(d, "mp_rank_00_model_states.pt")),
            "mp_rank_00_model_states.pt is missing (no *model_states.pt: the save never finished)",
        ),
        (
            {"dp": 2},
            lambda d: os.remove(os.path.join(d, "zero_pp_rank_1_mp_rank_00_optim_states.pt")),
            "mp_rank_00_model_states.pt records dp_world_size=2 but there are 1 *optim_states.pt files (missing ranks "
            "1)",
        ),
        (
            {"dp": 2},
            lambda d: [os.remove(os.path.join(d, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")) for r in (0, 1)],
            "mp_rank_00_model_states.pt holds no optimizer state and no *zero_pp_rank_*_optim_states.pt files exist "
            "(a ZeRO "
            "save that never finished)",
        ),
        (
            {"dp": 2, "recorded_dp": 3},
            None,
            "mp_rank_00_model_states.pt records dp_world_size=3 but there are 2 *optim_states.pt files (missing ranks "
            "2)",
        ),
        (
            {"zero3": True, "dp": 3},
            lambda d: os.remove(os.path.join(d, "zero_pp_rank_1_mp_rank_00_model_states.pt")),
            "zero_pp_rank_1_mp_rank_00_model_states.pt is missing (data-parallel ranks 0-2 expected)",
        ),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "zero_pp_rank_1_mp_rank_00_optim_states.pt"), -30),
            "zero_pp_rank_1_mp_rank_00_optim_states.pt is not a complete torch file: its zip central directory is "
            "missing "
            "(truncated or still being written)",
        ),
    ],
)
@pytest.mark.parametrize("full", [True, False])
def test_invalid(tmp_path, kwargs, damage, reason, full):
    # Quick checks see every missing rank file too (the highest rank's through dp_world_size), so a job is never
    # handed a tag it cannot load.
    d = F.deepspeed_tag(str(tmp_path), "global_step40", **kwargs)
    if damage:
        damage(d)
    got = check(tmp_path, "global_step40", full=full)
    assert (got.valid, got.reason) == (False, reason)


def test_scan_reads_scalars_without_unpickling(tmp_path):
    d = F.deepspeed_tag(str(tmp_path), "global_step1", dp=5)
    found = scan_pickle_scalars(
        st(d), "mp_rank_00_model_states.pt", ["dp_world_size", "optimizer", "param_shapes", "absent"]
    )
    assert found == {"dp_world_size": 5, "optimizer": None, "param_shapes": NOT_SCALAR}


def test_latest_written_before_other_ranks_finished(tmp_path):
    # Rank 0 writes `latest` with no barrier before it: it can name a tag whose other ranks are still writing.
    root = str(tmp_path)
    F.deepspeed_tag(root, "global_step100", dp=4)
    F.deepspeed_tag(root, "global_step200", dp=4)
    os.remove(os.path.join(root, "global_step200", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    F.write(os.path.join(root, "latest"), b"global_step200")
    best, skipped = ds.latest(st(root))
    assert best.name == "global_step100" and skipped[0].name == "global_step200"
    r = CliRunner().invoke(main, ["repair", root, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["old"], doc["new"], doc["changed"]) == ("global_step200", "global_step100", True)
    assert doc["message"] == (
        "latest points at global_step200, which is invalid: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing "
        "(data-parallel ranks 0-3 expected; also missing: 1); set it to 'global_step100' (old content kept in "
        "latest.bak)"
    )
    assert open(os.path.join(root, "latest")).read().strip() == "global_step100"  # DeepSpeed strips it too


def test_numeric_tags_and_custom_tag_named_by_latest(tmp_path):
    root = str(tmp_path)
    F.deepspeed_tag(root, "global_step9")
    F.deepspeed_tag(root, "global_step10")
    F.deepspeed_tag(root, "run_step11")
    os.makedirs(os.path.join(root, "logs_2"))  # not a tag: never a candidate
    assert sorted(i.name for i in ds.list(st(root))) == ["global_step10", "global_step9"]
    F.write(os.path.join(root, "latest"), b"run_step11\n")
    best, _ = ds.latest(st(root))
    assert (best.name, best.step) == ("run_step11", 11)
