"""Lightning layout: .ckpt files, steps from names, last.ckpt (file or symlink), weights_only loading."""

from __future__ import annotations

import json
import os
import sys

import pytest
from click.testing import CliRunner

import layout_fixtures as F
from resumekit.cli import main
from resumekit.layouts import detect_layout, get_layout
from resumekit.layouts.lightning import parse_step
from resumekit.storage import open_storage

pl = get_layout("lightning")


def st(root):
    return open_storage(str(root), create=False)


def by_name(root):
    return {i.name: i for i in pl.list(st(root))}


def test_parse_step():
    assert parse_step("epoch=3-step=1200.ckpt") == 1200
    assert parse_step("epoch=3-step=1200-val_loss=0.25-v1.ckpt") == 1200
    assert parse_step("last.ckpt") is None and parse_step("mystep=3.ckpt") is None


def test_valid_full_reads_global_step(tmp_path):
    F.lightning_ckpt(str(tmp_path / "epoch=1-step=100.ckpt"), 100, epoch=1)
    assert detect_layout(st(tmp_path)).name == "lightning"
    info = by_name(tmp_path)["epoch=1-step=100.ckpt"]
    got = pl.validate(st(tmp_path), info)
    assert (got.valid, got.step, got.metadata) == (True, 100, {"step_from": "file", "epoch": 1})


def test_last_ckpt_step_by_mtime_then_by_content(tmp_path):
    root = str(tmp_path)
    F.lightning_ckpt(os.path.join(root, "epoch=0-step=100.ckpt"), 100)
    F.lightning_ckpt(os.path.join(root, "epoch=1-step=200.ckpt"), 200)
    F.lightning_ckpt(os.path.join(root, "last.ckpt"), 250)
    F.set_mtime(os.path.join(root, "epoch=0-step=100.ckpt"), 1000)
    F.set_mtime(os.path.join(root, "epoch=1-step=200.ckpt"), 2000)
    F.set_mtime(os.path.join(root, "last.ckpt"), 2500)
    last = by_name(root)["last.ckpt"]
    assert (last.step, last.metadata["step_from"]) == (200, "mtime")  # quick: estimated, no torch needed
    best, _ = pl.latest(st(root), full=False)
    assert best.name == "last.ckpt"  # ties with step 200 go to the later name
    best, _ = pl.latest(st(root), full=True)
    assert (best.name, best.step, best.metadata["step_from"]) == ("last.ckpt", 250, "file")
    # A stale last.ckpt (older than every step-named file) sorts below them.
    F.set_mtime(os.path.join(root, "last.ckpt"), 10)
    assert by_name(root)["last.ckpt"].step == 0


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_last_ckpt_symlink(tmp_path):
    root = str(tmp_path)
    F.lightning_ckpt(os.path.join(root, "epoch=0-step=100.ckpt"), 100)
    F.lightning_ckpt(os.path.join(root, "epoch=1-step=200.ckpt"), 200)
    os.symlink("epoch=1-step=200.ckpt", os.path.join(root, "last.ckpt"))
    last = by_name(root)["last.ckpt"]
    assert (last.step, last.metadata["step_from"]) == (200, "link")
    F.cut_central_directory(os.path.join(root, "epoch=1-step=200.ckpt"))
    best, skipped = pl.latest(st(root))
    assert best.name == "epoch=0-step=100.ckpt"
    assert sorted(s.name for s in skipped) == ["epoch=1-step=200.ckpt", "last.ckpt"]
    os.remove(os.path.join(root, "epoch=1-step=200.ckpt"))  # dangling link: not listed, verify says why
    assert "last.ckpt" not in by_name(root)
    r = CliRunner().invoke(main, ["verify", os.path.join(root, "last.ckpt"), "--layout", "lightning"])
    assert r.exit_code == 1 and r.stdout.strip().endswith("INVALID: the file is missing (a dangling symlink?)")


@pytest.mark.parametrize(
    "damage,reason",
    [
        (
            lambda p: F.truncate(p, 200),
            "epoch=1-step=100.ckpt is not a complete torch file: its zip central directory is missing (truncated or still "
            "being written)",
        ),
        (
            lambda p: F.lightning_ckpt(p, 100, drop=("optimizer_states", "lr_schedulers")),
            "keys missing: optimizer_states, lr_schedulers (saved with save_weights_only=True? it cannot resume training)",
        ),
        (
            lambda p: F.write(p, F.torch_bytes({"global_step": 1, "hparams": __import__("argparse").Namespace(lr=1)})),
            "epoch=1-step=100.ckpt cannot be loaded with weights_only=True (argparse.Namespace is not allowed): it holds "
            "Python objects beyond tensors and plain containers; re-save plain state_dicts, or allow the types with "
            "torch.serialization.add_safe_globals",
        ),
    ],
)
def test_invalid(tmp_path, damage, reason):
    p = str(tmp_path / "epoch=1-step=100.ckpt")
    F.lightning_ckpt(p, 100)
    damage(p)
    got = pl.validate(st(tmp_path), by_name(tmp_path)["epoch=1-step=100.ckpt"])
    assert (got.valid, got.reason) == (False, reason)


def test_deepspeed_strategy_ckpt_dir(tmp_path):
    d = str(tmp_path / "epoch=0-step=30.ckpt")
    F.deepspeed_tag(d, "checkpoint", dp=2)
    F.write(os.path.join(d, "latest"), b"checkpoint")
    got = pl.validate(st(tmp_path), by_name(tmp_path)["epoch=0-step=30.ckpt"])
    assert (got.valid, got.step) == (True, 30)
    os.remove(os.path.join(d, "checkpoint", "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    got = pl.validate(st(tmp_path), by_name(tmp_path)["epoch=0-step=30.ckpt"])
    assert got.reason.startswith("checkpoint/mp_rank_00_model_states.pt records dp_world_size=2")


def test_cli_latest_json(tmp_path):
    root = str(tmp_path)
    F.lightning_ckpt(os.path.join(root, "epoch=0-step=9.ckpt"), 9)
    F.lightning_ckpt(os.path.join(root, "epoch=0-step=10.ckpt"), 10)
    r = CliRunner().invoke(main, ["latest", root, "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["latest"]["name"] == "epoch=0-step=10.ckpt"
