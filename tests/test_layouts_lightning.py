"""Lightning layout: .ckpt files, steps from names, last.ckpt (file or symlink), the allow-list, sidecar manifests."""

from __future__ import annotations

import argparse
import collections
import datetime
import decimal
import json
import os
import pathlib
import pickle
import sys

import pytest
import torch
from click.testing import CliRunner

import layout_fixtures as F
from resumekit.cli import main
from resumekit.layouts import detect_layout, get_layout
from resumekit.layouts.checks import NOT_SCALAR, TORCH_SAFE_GLOBALS, sidecar_name, summarize_pickle
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
            "epoch=1-step=100.ckpt is not a complete torch file: its zip central directory is missing (truncated or "
            "still being written)",
        ),
        (
            lambda p: F.lightning_ckpt(p, 100, drop=("optimizer_states", "lr_schedulers")),
            "keys missing: optimizer_states, lr_schedulers (saved with save_weights_only=True? it cannot resume "
            "training)",
        ),
        (
            lambda p: F.write(p, F.torch_bytes(_ckpt(100, hyper_parameters={"lr": decimal.Decimal("0.1")}))),
            "epoch=1-step=100.ckpt holds objects of types outside the allow-list (decimal.Decimal); loading it would "
            "run their code. Allowed: tensors, containers, paths, argparse.Namespace, Lightning's AttributeDict, "
            "datetime. Store plain values, or add a type's name to RESUMEKIT_SAFE_GLOBALS if you trust it",
        ),
        (
            lambda p: F.write(p, F.torch_bytes([1, 2])),
            "epoch=1-step=100.ckpt does not hold a dict: not a Lightning checkpoint",
        ),
    ],
)
@pytest.mark.parametrize("full", [True, False])
def test_invalid(tmp_path, damage, reason, full):
    # Quick and full give the same verdict on what a file holds.
    p = str(tmp_path / "epoch=1-step=100.ckpt")
    F.lightning_ckpt(p, 100)
    damage(p)
    got = pl.validate(st(tmp_path), by_name(tmp_path)["epoch=1-step=100.ckpt"], full=full)
    assert (got.valid, got.reason) == (False, reason)


def _ckpt(step, **extra):
    return {
        "epoch": 0,
        "global_step": step,
        "state_dict": {"w": torch.zeros(2)},
        "loops": {},
        "callbacks": {},
        "optimizer_states": [],
        "lr_schedulers": [],
        **extra,
    }


def test_harmless_types_lightning_writes_are_valid_in_both_modes(tmp_path):
    """What Lightning itself writes (torch.load(weights_only=True) refuses paths and Namespaces, and cannot build an
    AttributeDict at all): the same verdict, valid, in quick and full mode, with no code run to decide."""
    data = pytest.importorskip("lightning.fabric.utilities.data")
    hparams = {
        "data_dir": pathlib.Path("/data/x"),
        "args": argparse.Namespace(lr=0.1, out=pathlib.PurePosixPath("o")),
        "when": datetime.datetime(2024, 1, 2),
        "every": datetime.timedelta(minutes=5),
        "names": frozenset({"a"}),
        "nested": data.AttributeDict(a=1, b=pathlib.Path("y")),
    }
    p = F.write(str(tmp_path / "epoch=0-step=7.ckpt"), F.torch_bytes(_ckpt(7, hyper_parameters=hparams)))
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        torch.load(p, weights_only=True)
    for full in (False, True):
        got = pl.validate(st(tmp_path), by_name(tmp_path)["epoch=0-step=7.ckpt"], full=full)
        assert (got.valid, got.reason, got.step, got.metadata["step_from"]) == (True, "", 7, "file")


def test_allow_list_extension_by_environment(tmp_path, monkeypatch):
    F.write(str(tmp_path / "epoch=0-step=3.ckpt"), F.torch_bytes(_ckpt(3, hyper_parameters={"d": decimal.Decimal(1)})))
    assert not pl.validate(st(tmp_path), by_name(tmp_path)["epoch=0-step=3.ckpt"]).valid
    monkeypatch.setenv("RESUMEKIT_SAFE_GLOBALS", "fractions.Fraction, decimal.Decimal")
    assert pl.validate(st(tmp_path), by_name(tmp_path)["epoch=0-step=3.ckpt"]).valid


def test_torch_safe_globals_match_torch():
    """The torch-free allow-list is torch's own weights-only list; a torch upgrade that changes it shows here."""
    allowed = pytest.importorskip("torch._weights_only_unpickler")._get_allowed_globals()
    assert set(allowed) == set(TORCH_SAFE_GLOBALS)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_summarize_pickle_reads_globals_and_top_keys_without_running_code():
    data = pickle.dumps({"a": 1, "b": None, "c": "x", "d": [1, {"e": 2}], "f": _Boom()}, protocol=2)
    s = summarize_pickle(data)
    assert s.globals == {f"{os.system.__module__}.system"}
    assert s.top_keys == {"a": 1, "b": None, "c": "x", "d": NOT_SCALAR, "f": NOT_SCALAR}
    s4 = summarize_pickle(pickle.dumps({"k": collections.OrderedDict(x=1)}, protocol=4))  # STACK_GLOBAL + memo
    assert s4.globals == {"collections.OrderedDict"} and s4.top_keys == {"k": NOT_SCALAR}
    assert summarize_pickle(pickle.dumps([1, 2], protocol=2)).top_keys is None
    with pytest.raises(ValueError):
        summarize_pickle(data[:-20])


def _sidecar(path, step):
    from resumekit.format import FileEntry, Manifest
    from resumekit.verify import hash_file

    head, base = os.path.split(path)
    size, digest = hash_file(open_storage(head, create=False), base)
    F.write(sidecar_name(path), Manifest(step=step, files={base: FileEntry(size, digest)}).to_json())


def test_sidecar_manifest_checks_bytes(tmp_path):
    root = str(tmp_path)
    p = F.lightning_ckpt(os.path.join(root, "epoch=0-step=5.ckpt"), 5)
    F.set_mtime(p, 1000)
    _sidecar(p, 5)
    got = pl.validate(st(root), by_name(root)["epoch=0-step=5.ckpt"], full=True)
    assert (got.valid, got.metadata["verified_by"]) == (True, "sidecar manifest")
    data = bytearray(open(p, "rb").read())
    data[len(data) // 2] ^= 0xFF  # a flip the zip directory cannot see, with the file's mtime kept
    F.write(p, bytes(data))
    F.set_mtime(p, 1000)
    assert pl.validate(st(root), by_name(root)["epoch=0-step=5.ckpt"], full=False).valid  # quick: sizes only
    got = pl.validate(st(root), by_name(root)["epoch=0-step=5.ckpt"], full=True)
    assert got.reason.startswith("epoch=0-step=5.ckpt checksum mismatch (xxh3 ")
    with open(p, "ab") as f:
        f.write(b"x")
    F.set_mtime(p, 1000)
    got = pl.validate(st(root), by_name(root)["epoch=0-step=5.ckpt"], full=False)
    assert got.reason == (
        f"epoch=0-step=5.ckpt has {len(data) + 1} bytes, epoch=0-step=5.ckpt.resumekit.manifest.json says "
        f"{len(data)} (truncated?)"
    )
    # A file written after its sidecar (a save without the callback) is judged by its contents, not by it.
    F.lightning_ckpt(p, 5)
    os.utime(p)
    got = pl.validate(st(root), by_name(root)["epoch=0-step=5.ckpt"], full=True)
    assert got.valid and "verified_by" not in got.metadata


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks")
def test_last_link_is_checked_through_its_target_and_its_sidecar(tmp_path):
    root = str(tmp_path)
    p = F.lightning_ckpt(os.path.join(root, "epoch=0-step=5.ckpt"), 5)
    _sidecar(p, 5)
    os.symlink("epoch=0-step=5.ckpt", os.path.join(root, "last.ckpt"))
    F.write(os.path.join(root, "last.ckpt.resumekit.manifest.json"), b"{stale}")  # the link's own is ignored
    got = pl.validate(st(root), by_name(root)["last.ckpt"], full=True)
    assert (got.valid, got.step, got.metadata["verified_by"]) == (True, 5, "sidecar manifest")


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
