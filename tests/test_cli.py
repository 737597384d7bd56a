import json
import os
import time

import pytest
from click.testing import CliRunner

from conftest import make_training, train_steps
from resumekit import CheckpointManager
from resumekit.cli import main
from resumekit.format import TENSORS_FILE, step_dirname


@pytest.fixture
def run_dir(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path), every_steps=3)
    train_steps(st, 12, mgr)
    mgr.close()
    return tmp_path


def cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def flip(path):
    with open(path, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))


def test_ls_json(run_dir):
    r = cli("ls", str(run_dir), "--json")
    assert r.exit_code == 0
    rows = json.loads(r.output)
    assert [x["step"] for x in rows] == [3, 6, 9, 12] and all(x["valid"] for x in rows)


def test_latest_verifies_checksums_by_default(run_dir):
    r = cli("latest", str(run_dir))
    assert r.exit_code == 0 and r.output.strip() == str(run_dir / step_dirname(12))
    flip(run_dir / step_dirname(12) / TENSORS_FILE)
    r = cli("latest", str(run_dir))
    assert r.output.strip().endswith(step_dirname(9))
    assert "skipped" in r.stderr and "checksum mismatch" in r.stderr
    r = cli("latest", str(run_dir), "--quick", "--json")  # sizes only: the flip is invisible
    assert json.loads(r.output)["latest"]["step"] == 12


def test_latest_none_exits_1(tmp_path):
    r = cli("latest", str(tmp_path))
    assert r.exit_code == 1 and "no valid checkpoint" in r.stderr


def test_verify(run_dir):
    assert cli("verify", str(run_dir / step_dirname(6))).exit_code == 0
    flip(run_dir / step_dirname(6) / TENSORS_FILE)
    r = cli("verify", str(run_dir / step_dirname(6)), "--json")
    assert r.exit_code == 1 and "checksum mismatch" in json.loads(r.output)["reason"]


def test_usage_error_exits_2(run_dir):
    assert cli("ls", str(run_dir), "--layout", "nonsense").exit_code == 2
    assert cli("frobnicate").exit_code == 2


def test_gc(run_dir):
    tmp = run_dir / ".tmp-step_000000015-abc"
    tmp.mkdir()
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    fresh = run_dir / ".tmp-step_000000018-def"
    fresh.mkdir()
    r = cli("gc", str(run_dir), "--keep-last", "2", "--dry-run", "--json")
    out = json.loads(r.output)
    assert sorted(os.path.basename(p) for p in out["removed"]) == [
        ".tmp-step_000000015-abc",
        step_dirname(3),
        step_dirname(6),
    ]
    assert tmp.exists()
    cli("gc", str(run_dir), "--keep-last", "2")
    assert sorted(p for p in os.listdir(run_dir) if "step_" in p) == [
        ".tmp-step_000000018-def",
        step_dirname(9),
        step_dirname(12),
    ]
