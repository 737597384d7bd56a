"""HF Trainer / LLaMA-Factory layout: checkpoint-N validity, latest, CLI (trees built per trainer.py's rules)."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner

import layout_fixtures as F
from resumekit.cli import main
from resumekit.layouts import detect_layout, get_layout
from resumekit.layouts.base import CheckpointInfo
from resumekit.storage import open_storage

hf = get_layout("hf")


def check(root: str, name: str, full: bool = True) -> CheckpointInfo:
    st = open_storage(root, create=False)
    info = next(i for i in hf.list(st) if i.name == name)
    return hf.validate(st, info, full=full)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"weights": "sharded"},
        {"weights": "lora"},
        {"weights": "bin"},
        {"rng_ranks": [0, 1, 2]},
        {"deepspeed_dp": 2},
    ],
)
def test_valid_variants(tmp_path, kwargs):
    F.hf_checkpoint(str(tmp_path), 4, **kwargs)
    got = check(str(tmp_path), "checkpoint-4")
    assert (got.valid, got.reason, got.step) == (True, "", 4)
    assert got.metadata["global_step"] == 4


def test_aliases_and_detection(tmp_path):
    F.hf_checkpoint(str(tmp_path), 2)
    assert get_layout("llamafactory") is hf and get_layout("transformers") is hf
    assert detect_layout(open_storage(str(tmp_path), create=False)).name == "hf"


def _del(name):
    return lambda d: os.remove(os.path.join(d, name))


@pytest.mark.parametrize(
    "build,damage,reason",
    [
        ({"state": False}, None, "trainer_state.json is missing (the Trainer writes it last: the save never finished)"),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "trainer_state.json"), 10),
            "trainer_state.json is not valid JSON (truncated or still being written)",
        ),
        (
            {},
            lambda d: F.write(os.path.join(d, "checkpoint-is-incomplete.txt"), b"in progress"),
            "checkpoint-is-incomplete.txt is present: the Trainer's save was interrupted",
        ),
        (
            {},
            lambda d: F.write_json(os.path.join(d, "trainer_state.json"), {"global_step": 3}),
            "trainer_state.json says global_step 3 but the directory is checkpoint-4",
        ),
        (
            {"weights": "sharded"},
            _del("model-00002-of-00002.safetensors"),
            "model-00002-of-00002.safetensors is missing (named in model.safetensors.index.json)",
        ),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "model.safetensors"), -40),
            "model.safetensors is truncated: its header describes 80 bytes of tensor data but only 40 follow it",
        ),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "model.safetensors"), 50),
            "model.safetensors is truncated or not safetensors: header length 168 does not fit in its 50 bytes",
        ),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "model.safetensors"), 5),
            "model.safetensors is truncated: 5 bytes, shorter than the 8-byte safetensors header",
        ),
        (
            {"weights": "lora"},
            _del("adapter_config.json"),
            "adapter_config.json is missing (it must sit next to adapter_model.safetensors)",
        ),
        (
            {"weights": "none"},
            None,
            "no model weights (model.safetensors, model-*.safetensors + model.safetensors.index.json, "
            "pytorch_model.bin, "
            "or adapter_model.safetensors + adapter_config.json)",
        ),
        (
            {"optimizer": False},
            None,
            "optimizer.pt is missing (saved with save_only_model=True? the Trainer would silently start a fresh "
            "optimizer)",
        ),
        (
            {},
            lambda d: F.cut_central_directory(os.path.join(d, "optimizer.pt")),
            "optimizer.pt is not a complete torch file: its zip central directory is missing (truncated or still being "
            "written)",
        ),
        (
            {},
            lambda d: F.truncate(os.path.join(d, "rng_state.pth"), -3),
            "rng_state.pth is not a complete torch file: its zip central directory is missing (truncated or still "
            "being "
            "written)",
        ),
        (
            {"scheduler": False},
            None,
            "scheduler.pt is missing (the Trainer would silently restart the learning-rate schedule)",
        ),
        (
            {},
            _del("rng_state.pth"),
            "rng_state.pth is missing (nor rng_state_<rank>.pth: the Trainer would resume with fresh random state, "
            "not an "
            "exact resume)",
        ),
        ({"rng_ranks": [0, 2]}, None, "rng_state_1.pth is missing (process ranks 0-2 expected)"),
        (
            {"deepspeed_dp": 3},
            lambda d: os.remove(os.path.join(d, "global_step4", "zero_pp_rank_1_mp_rank_00_optim_states.pt")),
            "global_step4/zero_pp_rank_1_mp_rank_00_optim_states.pt is missing (data-parallel ranks 0-2 expected; also "
            "missing: 1)",
        ),
        (
            {"deepspeed_dp": 2},
            _del("latest"),
            "latest is missing next to the DeepSpeed global_step* directory (DeepSpeed writes it after its files: the "
            "save "
            "never finished)",
        ),
    ],
)
def test_invalid_variants(tmp_path, build, damage, reason):
    d = F.hf_checkpoint(str(tmp_path), 4, **build)
    if damage:
        damage(d)
    got = check(str(tmp_path), "checkpoint-4")
    assert (got.valid, got.reason) == (False, reason)


def test_full_check_finds_crc_damage_quick_does_not(tmp_path):
    d = F.hf_checkpoint(str(tmp_path), 4)
    opt = os.path.join(d, "optimizer.pt")
    F.flip_byte(opt, F.member_data_offset(opt))
    assert check(str(tmp_path), "checkpoint-4", full=False).valid
    got = check(str(tmp_path), "checkpoint-4", full=True)
    assert got.reason == "optimizer.pt is damaged: CRC mismatch in member archive/data/0"


def test_deepspeed_missing_highest_rank_found_quick_and_full(tmp_path):
    # File names cannot reveal a missing *last* rank; the dp_world_size recorded in the model states can, and
    # (issue 11) the quick check reads it too, so a tag missing a rank file is never resumed.
    d = F.hf_checkpoint(str(tmp_path), 4, deepspeed_dp=2)
    os.remove(os.path.join(d, "global_step4", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    assert check(str(tmp_path), "checkpoint-4", full=False).reason == check(str(tmp_path), "checkpoint-4").reason
    assert check(str(tmp_path), "checkpoint-4").reason == (
        "global_step4/mp_rank_00_model_states.pt records dp_world_size=2 but there are 1 *optim_states.pt files "
        "(missing ranks 1)"
    )


def test_manifest_decides_when_present(tmp_path):
    d = F.hf_checkpoint(str(tmp_path), 4)
    F.foreign_manifest(d, 4)
    got = check(str(tmp_path), "checkpoint-4")
    assert got.valid and got.metadata["verified_by"] == "resumekit.manifest.json"
    # Same size, one byte changed: only the checksum can see it.
    F.flip_byte(os.path.join(d, "model.safetensors"), 200)
    assert check(str(tmp_path), "checkpoint-4", full=False).valid
    assert check(str(tmp_path), "checkpoint-4").reason.startswith("model.safetensors checksum mismatch (xxh3 ")
    F.truncate(os.path.join(d, "scheduler.pt"), -1)
    size = os.path.getsize(os.path.join(d, "scheduler.pt"))
    assert check(str(tmp_path), "checkpoint-4", full=False).reason == (
        f"scheduler.pt has {size} bytes, resumekit.manifest.json says {size + 1} (truncated?)"
    )


def test_manifest_of_another_step_is_refused(tmp_path):
    d = F.hf_checkpoint(str(tmp_path), 4)
    F.foreign_manifest(d, 2)
    assert check(str(tmp_path), "checkpoint-4").reason == (
        "resumekit.manifest.json says step 2 but the directory is step 4"
    )


def test_latest_orders_numerically_and_skips_broken(tmp_path):
    root = str(tmp_path)
    for s in (2, 9, 10, 100):
        F.hf_checkpoint(root, s)
    os.remove(os.path.join(root, "checkpoint-100", "trainer_state.json"))
    F.cut_central_directory(os.path.join(root, "checkpoint-10", "optimizer.pt"))
    os.makedirs(os.path.join(root, "tmp-checkpoint-200"))  # staging dirs of old transformers are never candidates
    st = open_storage(root, create=False)
    best, skipped = hf.latest(st)
    assert best.name == "checkpoint-9"
    assert [(s.name, s.reason.split(" (")[0]) for s in skipped] == [
        ("checkpoint-100", "trainer_state.json is missing"),
        ("checkpoint-10", "optimizer.pt is not a complete torch file: its zip central directory is missing"),
    ]
    assert hf.repair(st) is None  # the Trainer keeps no tracker


def test_cli_latest_verify_ls(tmp_path):
    root = str(tmp_path)
    F.hf_checkpoint(root, 2)
    F.hf_checkpoint(root, 4, state=False)
    r = CliRunner().invoke(main, ["latest", root, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["latest"]["name"] == "checkpoint-2" and doc["latest"]["layout"] == "hf"
    assert doc["skipped"][0]["reason"].startswith("trainer_state.json is missing")
    r = CliRunner().invoke(main, ["latest", root, "--layout", "llamafactory"])
    assert (r.exit_code, r.stdout.strip()) == (0, os.path.join(root, "checkpoint-2"))
    r = CliRunner().invoke(main, ["verify", os.path.join(root, "checkpoint-4")])
    assert r.exit_code == 1
    assert "INVALID: trainer_state.json is missing" in r.stdout
    r = CliRunner().invoke(main, ["verify", os.path.join(root, "checkpoint-2"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["valid"] is True
    r = CliRunner().invoke(main, ["ls", root, "--json"])
    assert r.exit_code == 0
    assert [(i["step"], i["valid"]) for i in json.loads(r.stdout)] == [(2, True), (4, False)]


def test_cli_latest_exit_1_when_nothing_valid(tmp_path):
    F.hf_checkpoint(str(tmp_path), 4, optimizer=False)
    r = CliRunner().invoke(main, ["latest", str(tmp_path), "--layout", "hf"])
    assert r.exit_code == 1 and r.stdout == ""
    r = CliRunner().invoke(main, ["repair", str(tmp_path), "--layout", "hf", "--json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {"layout": "hf", "tracker": None, "changed": False, "dry_run": False}
