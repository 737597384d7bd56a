"""Megatron-LM / MindSpeed-LLM layout: iter_%07d formats, rank grids, the tracker and its repair."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

import layout_fixtures as F
from resumekit.cli import main
from resumekit.layouts import detect_layout, get_layout
from resumekit.layouts.megatron import iter_dirname, parse_iter_dirname
from resumekit.storage import open_storage

mg = get_layout("megatron")
TRACKER = "latest_checkpointed_iteration.txt"


def st(root):
    return open_storage(str(root), create=False)


def check(root, name, full=True):
    s = st(root)
    info = next(i for i in mg.list(s) if i.name == name)
    return mg.validate(s, info, full=full)


def tracker(root, text):
    F.write(os.path.join(str(root), TRACKER), text.encode())


def test_iter_names_are_integers():
    assert iter_dirname(1200) == "iter_0001200"
    assert iter_dirname(10_000_000) == "iter_10000000"
    assert parse_iter_dirname("iter_9999999") < parse_iter_dirname("iter_10000000")
    assert parse_iter_dirname("iter_12a") is None and parse_iter_dirname("iter_") is None


@pytest.mark.parametrize(
    "kwargs,fmt",
    [
        ({"fmt": "torch_dist"}, "torch_dist"),
        ({"fmt": "torch_dcp"}, "torch_dcp"),
        ({"fmt": "legacy", "grid": (2,)}, "torch"),
        ({"fmt": "legacy", "grid": (2, 2), "distrib_optim": True}, "torch"),
        ({"fmt": "legacy", "grid": (1, 2, 2)}, "torch"),
    ],
)
def test_valid_formats(tmp_path, kwargs, fmt):
    F.megatron_iter(str(tmp_path), 100, **kwargs)
    got = check(tmp_path, "iter_0000100")
    assert (got.valid, got.reason, got.step, got.metadata["format"]) == (True, "", 100, fmt)


def _rm(*parts):
    return lambda d: os.remove(os.path.join(d, *parts))


@pytest.mark.parametrize(
    "kwargs,damage,reason",
    [
        (
            {},
            lambda d: (os.remove(os.path.join(d, "metadata.json")), F.megatron_iter(os.path.dirname(d), 50)),
            "metadata.json is missing (Megatron's rank 0 writes it last, after every rank's data: the save never "
            "finished)",
        ),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "metadata.json"), 5),
            "metadata.json is not valid JSON (truncated or still being written)",
        ),
        (
            {},
            lambda d: F.write_json(os.path.join(d, "metadata.json"), {"x": 1}),
            "metadata.json has no 'sharded_backend' (not a Megatron dist-checkpoint config)",
        ),
        (
            {},
            _rm(".metadata"),
            ".metadata is missing (torch.distributed.checkpoint writes it once every rank has finished: the save never "
            "finished)",
        ),
        (
            {},
            lambda d: [os.remove(os.path.join(d, n)) for n in os.listdir(d) if n.endswith(".distcp")],
            "*.distcp data files are missing",
        ),
        (
            {},
            lambda d: F.cut_central_directory(os.path.join(d, "common.pt")),
            "common.pt is not a complete torch file: its zip central directory is missing (truncated or still being "
            "written)",
        ),
        (
            {"fmt": "legacy", "grid": (2, 2)},
            lambda d: shutil.rmtree(os.path.join(d, "mp_rank_01_000")),
            "mp_rank_01_000/ is missing (the rank grid 2 x 2 is incomplete: 1 of 4 model-parallel ranks absent)",
        ),
        (
            {"fmt": "legacy", "grid": (2,)},
            _rm("mp_rank_01", "model_optim_rng.pt"),
            "mp_rank_01/model_optim_rng.pt is missing",
        ),
        (
            {"fmt": "legacy", "grid": (2,), "distrib_optim": True},
            _rm("mp_rank_00", "distrib_optim.pt"),
            "mp_rank_00/distrib_optim.pt is missing (other ranks have it)",
        ),
        (
            {"fmt": "legacy", "grid": (2,)},
            lambda d: F.truncate(os.path.join(d, "mp_rank_01", "model_optim_rng.pt"), 100),
            "mp_rank_01/model_optim_rng.pt is not a complete torch file: its zip central directory is missing "
            "(truncated or "
            "still being written)",
        ),
        (
            {"fmt": "legacy", "grid": (2,)},
            lambda d: F.megatron_iter(os.path.dirname(d), 100, fmt="legacy", grid=(1, 1)),
            "mp_rank_* directories mix naming schemes (mp_rank_00, mp_rank_00_000, mp_rank_01): leftovers of a run "
            "with "
            "another parallel layout?",
        ),
        (
            {"fmt": "legacy", "grid": (2,), "args_grid": (4, 1, 1)},
            None,
            "mp_rank_00/model_optim_rng.pt records TP=4 x PP=1 x EP=1 = 4 model-parallel ranks but there are 2 "
            "mp_rank_* "
            "directories",
        ),
        (
            {"fmt": "none"},
            lambda d: F.write(os.path.join(d, "junk.txt"), b"x"),
            "no checkpoint files (neither metadata.json + *.distcp nor mp_rank_*/model_optim_rng.pt)",
        ),
    ],
)
def test_invalid(tmp_path, kwargs, damage, reason):
    d = F.megatron_iter(str(tmp_path), 100, **kwargs)
    if damage:
        damage(d)
    got = check(tmp_path, "iter_0000100")
    assert (got.valid, got.reason) == (False, reason)


def test_args_cross_check_only_in_full_mode(tmp_path):
    F.megatron_iter(str(tmp_path), 100, fmt="legacy", grid=(2,), args_grid=(4, 1, 1))
    assert check(tmp_path, "iter_0000100", full=False).valid


def test_dcp_without_config_is_invalid_beside_torch_dist(tmp_path):
    # .metadata without metadata.json: torch_dcp if the run never wrote torch_dist, else a torch_dist save cut short.
    F.megatron_iter(str(tmp_path), 200, fmt="torch_dcp")
    assert check(tmp_path, "iter_0000200").valid
    F.megatron_iter(str(tmp_path), 100, fmt="torch_dist")
    assert check(tmp_path, "iter_0000200").reason.startswith("metadata.json is missing")


def test_integrity_manifest(tmp_path):
    d = F.megatron_iter(str(tmp_path), 100)
    import hashlib

    files = {
        n: hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
        for n in sorted(os.listdir(d))
        if os.path.isfile(os.path.join(d, n))
    }
    F.write_json(os.path.join(d, "integrity.json"), {"algorithm": "sha256", "files": files})
    assert check(tmp_path, "iter_0000100").valid
    F.flip_byte(os.path.join(d, "__1_0.distcp"), 3)
    assert check(tmp_path, "iter_0000100", full=False).valid
    assert check(tmp_path, "iter_0000100").reason == (
        "__1_0.distcp sha256 does not match integrity.json: the file was altered or damaged"
    )
    os.remove(os.path.join(d, "__1_0.distcp"))
    assert check(tmp_path, "iter_0000100", full=False).reason == "__1_0.distcp is missing (listed in integrity.json)"


def test_latest_is_numeric_not_lexicographic(tmp_path):
    root = str(tmp_path)
    F.megatron_iter(root, 9_999_999)
    F.megatron_iter(root, 10_000_000)
    best, skipped = mg.latest(st(root))
    assert (best.name, skipped) == ("iter_10000000", [])


@pytest.mark.parametrize(
    "content,finding",
    [
        (None, "latest_checkpointed_iteration.txt is missing"),
        ("", "latest_checkpointed_iteration.txt is empty"),
        ("garbage\n", "latest_checkpointed_iteration.txt holds 'garbage', which names no checkpoint"),
        ("300", "latest_checkpointed_iteration.txt points at iter_0000300, which does not exist"),
        (
            "200",
            "latest_checkpointed_iteration.txt points at iter_0000200, which is invalid: metadata.json is missing "
            "(Megatron's rank 0 writes it last, after every rank's data: the save never finished)",
        ),
        (
            "50",
            "latest_checkpointed_iteration.txt points at iter_0000050, older than the newest valid checkpoint "
            "iter_0000100",
        ),
        ("release", "latest_checkpointed_iteration.txt points at release, which does not exist"),
    ],
)
def test_repair_findings(tmp_path, content, finding):
    root = str(tmp_path)
    F.megatron_iter(root, 50)
    F.megatron_iter(root, 100)
    os.remove(os.path.join(F.megatron_iter(root, 200), "metadata.json"))
    if content is not None:
        tracker(root, content)
    dry = mg.repair(st(root), dry_run=True)
    assert dry.message == f"{finding}; would set it to '100'"
    assert (dry.changed, dry.new) == (True, "100")
    assert (
        open(os.path.join(root, TRACKER)).read() == content
        if content is not None
        else not os.path.exists(os.path.join(root, TRACKER))
    )
    res = mg.repair(st(root))
    assert res.changed and res.new == "100"
    assert open(os.path.join(root, TRACKER)).read() == "100\n"
    if content is not None:
        assert res.backup == TRACKER + ".bak"
        assert open(os.path.join(root, TRACKER + ".bak")).read() == content.strip() + "\n"
    again = mg.repair(st(root))
    assert (again.changed, again.message) == (
        False,
        "latest_checkpointed_iteration.txt points at the newest valid checkpoint iter_0000100; nothing to do",
    )


def test_release_dir(tmp_path):
    root = str(tmp_path)
    F.megatron_iter(root, 0, fmt="legacy", grid=(2,), name="release")
    tracker(root, "release")
    s = st(root)
    assert detect_layout(s).name == "megatron"
    best, _ = mg.latest(s)
    assert (best.name, best.step, best.metadata["tracked"]) == ("release", 0, True)
    assert (
        mg.repair(s).message == "latest_checkpointed_iteration.txt points at the newest valid checkpoint release; "
        "nothing to do"
    )
    F.megatron_iter(root, 20)
    res = mg.repair(s)
    assert (res.old, res.new) == ("release", "20")


def test_cli_repair_and_json(tmp_path):
    root = str(tmp_path)
    F.megatron_iter(root, 100)
    tracker(root, "300")
    r = CliRunner().invoke(main, ["repair", root, "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["layout"], doc["old"], doc["new"], doc["changed"], doc["backup"]) == (
        "megatron",
        "300",
        "100",
        True,
        None,
    )
    assert open(os.path.join(root, TRACKER)).read() == "300"
    r = CliRunner().invoke(main, ["repair", root, "--layout", "mindspeed"])
    assert r.exit_code == 0
    assert r.stdout.strip() == (
        "latest_checkpointed_iteration.txt points at iter_0000300, which does not exist; set "
        "it to '100' (old content kept in latest_checkpointed_iteration.txt.bak)"
    )
    shutil.rmtree(os.path.join(root, "iter_0000100"))
    F.megatron_iter(root, 100, fmt="legacy", grid=(2,))
    F.cut_central_directory(os.path.join(root, "iter_0000100", "mp_rank_00", "model_optim_rng.pt"))
    r = CliRunner().invoke(main, ["repair", root])
    assert r.exit_code == 1
    assert "no valid checkpoint, tracker left as it is" in r.stdout
    r = CliRunner().invoke(main, ["verify", os.path.join(root, "iter_0000100"), "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)["reason"].startswith("mp_rank_00/model_optim_rng.pt is not a complete torch file")
