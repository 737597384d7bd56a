"""Plain torch.save files: integer steps from names (ckpt_9 < ckpt_10), zip checks, weights_only loading."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as hs

import layout_fixtures as F
from resumekit.cli import main
from resumekit.layouts import choose_latest, detect_layout, get_layout, order_by_step
from resumekit.layouts.base import CheckpointInfo
from resumekit.layouts.torchfiles import parse_step
from resumekit.storage import open_storage

tf = get_layout("torchfiles")


def st(root):
    return open_storage(str(root), create=False)


@pytest.mark.parametrize(
    "name,step",
    [
        ("ckpt_9.pth", 9),
        ("ckpt_10.pth", 10),
        ("ckpt_best_12.pth", 12),
        ("model_0012.pt", 12),
        ("epoch-7.pth.tar", 7),
        ("42.pt", 42),
        ("best.pth", None),
        ("ckpt_9.pth.bak", None),
        ("ckpt_9.ckpt", None),
    ],
)
def test_parse_step(name, step):
    assert parse_step(name) == step


def test_latest_is_numeric(tmp_path):
    root = str(tmp_path)
    for n in (1, 9, 10):
        F.write_torch(os.path.join(root, f"ckpt_{n}.pth"))
    F.write_torch(os.path.join(root, "best.pth"))  # no number: not a candidate
    s = st(root)
    assert detect_layout(s).name == "torchfiles"
    assert sorted(os.listdir(root))[-1] == "ckpt_9.pth"  # what `sorted(os.listdir())[-1]`-style code trips on
    best, skipped = tf.latest(s)
    assert (best.name, best.step, skipped) == ("ckpt_10.pth", 10, [])


def test_latest_skips_truncated_and_unsafe(tmp_path):
    root = str(tmp_path)
    F.write_torch(os.path.join(root, "ckpt_8.pth"), {"net": {"w": __import__("torch").zeros(2)}, "epoch": 8})
    F.write(os.path.join(root, "ckpt_9.pth"), F.torch_bytes({"opt": __import__("argparse").Namespace(lr=0.1)}))
    F.write_torch(os.path.join(root, "ckpt_10.pth"))
    F.truncate(os.path.join(root, "ckpt_10.pth"), 300)
    best, skipped = tf.latest(st(root))
    assert best.name == "ckpt_8.pth"
    assert [(s.name, s.reason) for s in skipped] == [
        (
            "ckpt_10.pth",
            "ckpt_10.pth is not a complete torch file: its zip central directory is missing (truncated "
            "or still being written)",
        ),
        (
            "ckpt_9.pth",
            "ckpt_9.pth cannot be loaded with weights_only=True (argparse.Namespace is not allowed): it "
            "holds Python objects beyond tensors and plain containers; re-save plain state_dicts, or allow "
            "the types with torch.serialization.add_safe_globals",
        ),
    ]
    quick, _ = tf.latest(st(root), full=False)  # quick never loads: the unsafe file passes the zip check
    assert quick.name == "ckpt_9.pth"


def test_empty_and_legacy_files(tmp_path):
    F.write(str(tmp_path / "ckpt_1.pth"), b"")
    F.write(str(tmp_path / "ckpt_2.pth"), b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")
    got = {i.name: tf.validate(st(tmp_path), i).reason for i in tf.list(st(tmp_path))}
    assert got == {
        "ckpt_1.pth": "ckpt_1.pth is empty (truncated or still being written)",
        "ckpt_2.pth": "ckpt_2.pth is not a zip archive: a torch file in the legacy format (re-save it with torch>=1.6) "
        "or not a torch.save file at all",
    }


def test_crc_damage_needs_full(tmp_path):
    p = F.write_torch(str(tmp_path / "ckpt_3.pt"))
    F.flip_byte(p, F.member_data_offset(p))
    info = tf.list(st(tmp_path))[0]
    assert tf.validate(st(tmp_path), info, full=False).valid
    assert tf.validate(st(tmp_path), info).reason == "ckpt_3.pt is damaged: CRC mismatch in member archive/data/0"


def test_cli_verify_file_and_ls(tmp_path):
    root = str(tmp_path)
    F.write_torch(os.path.join(root, "ckpt_best_5.pth"))
    F.write_torch(os.path.join(root, "ckpt_7.pth"))
    F.cut_central_directory(os.path.join(root, "ckpt_7.pth"))
    r = CliRunner().invoke(main, ["verify", os.path.join(root, "ckpt_best_5.pth"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["valid"], doc["step"], doc["layout"]) == (True, 5, "torchfiles")
    r = CliRunner().invoke(main, ["verify", os.path.join(root, "ckpt_7.pth")])
    assert r.exit_code == 1 and "INVALID: ckpt_7.pth is not a complete torch file" in r.stdout
    r = CliRunner().invoke(main, ["ls", root, "--json", "--full"])
    assert [(i["name"], i["valid"]) for i in json.loads(r.stdout)] == [("ckpt_best_5.pth", True), ("ckpt_7.pth", False)]
    r = CliRunner().invoke(main, ["repair", root])
    assert (r.exit_code, r.stdout.strip()) == (0, "layout torchfiles keeps no tracker: nothing to repair")


@settings(max_examples=60, deadline=None)
@given(
    steps=hs.lists(hs.integers(min_value=0, max_value=10**12), min_size=1, max_size=12, unique=True),
    pad=hs.integers(min_value=0, max_value=12),
    valid=hs.data(),
)
def test_ordering_property(steps, pad, valid):
    # Whatever the padding, names order by their integer step, and latest is the highest *valid* step.
    names = {f"ckpt_{s:0{pad}d}.pth": s for s in steps}
    infos = [CheckpointInfo(step=parse_step(n), name=n, path=n, layout="torchfiles") for n in names]
    assert [i.step for i in order_by_step(infos)] == sorted(steps)
    good = set(valid.draw(hs.lists(hs.sampled_from(steps), unique=True)))
    best, skipped = choose_latest(infos, lambda i: i.__class__(**{**i.__dict__, "valid": i.step in good}))
    assert (best.step if best else None) == (max(good) if good else None)
    assert [s.step for s in skipped] == sorted((s for s in steps if s > (max(good) if good else -1)), reverse=True)
