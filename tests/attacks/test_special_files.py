"""Attack: non-regular files and symlinks inside a checkpoint (issue 12, point 2).

A FIFO blocks ``open()`` until a writer comes, a device file reads forever, a symlink leads out of the checkpoint
(to a file the attacker chose, with matching size and checksum). Every command must answer at once with a one-line
reason, and a restore must fall back to the previous checkpoint.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from attack_helpers import assert_prompt_verdicts, probe, saved_run

from conftest import make_training
from resumekit import CheckpointManager
from resumekit.events import EventLog, EventTail, read_events
from resumekit.format import MANIFEST, TENSORS_FILE, TREE_FILE, step_dirname


def _fifo(path: str) -> None:
    os.unlink(path)
    os.mkfifo(path)


def _device(path: str) -> None:
    os.unlink(path)
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: reads forever
    except PermissionError:
        pytest.skip("creating a device node needs root")


def _symlink_out(path: str) -> None:
    # The same bytes, outside the checkpoint root: sizes and checksums match, the location does not.
    outside = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(path))), "elsewhere.bin")
    shutil.copyfile(path, outside)
    os.unlink(path)
    os.symlink(outside, path)


def _symlink_in(path: str) -> None:
    # A link to the same file of the older step: inside the root, but not the checkpoint's own file.
    older = path.replace(step_dirname(8), step_dirname(4))
    os.unlink(path)
    os.symlink(older, path)


ATTACKS = {
    "fifo-tree": (TREE_FILE, _fifo, "state.json is a FIFO (named pipe), not a regular file"),
    "fifo-manifest": (MANIFEST, _fifo, "manifest.json is a FIFO (named pipe), not a regular file"),
    "device-tensors": (TENSORS_FILE, _device, "tensors.safetensors is a character device, not a regular file"),
    "symlink-out": (
        TENSORS_FILE,
        _symlink_out,
        "tensors.safetensors is a symlink inside the checkpoint; a checkpoint must hold its own files",
    ),
    "symlink-in": (
        TREE_FILE,
        _symlink_in,
        "state.json is a symlink inside the checkpoint; a checkpoint must hold its own files",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_command_answers_at_once_and_restore_falls_back(tmp_path, attack):
    run = tmp_path / "run"
    run.mkdir()
    saved_run(str(run))
    rel, plant, reason = ATTACKS[attack]
    step8 = run / step_dirname(8)
    plant(str(step8 / rel))
    d, ck = str(run), str(step8)
    results = probe(
        [
            ["ls", d],
            ["ls", d, "--full"],
            ["latest", d],
            ["latest", d, "--quick"],
            ["verify", ck],
            ["verify", ck, "--quick"],
            ["gc", d, "--dry-run"],
            ["gc", d, "--keep-last", "1"],
        ]
    )
    assert_prompt_verdicts(results)
    by = {" ".join(r["argv"][:1] + r["argv"][2:]): r for r in results}
    assert by["latest"]["out"].strip() == str(run / step_dirname(4))
    assert reason in by["latest"]["err"]
    assert by["verify"]["code"] == 1
    assert by["verify"]["out"].strip().splitlines() == [f"{ck}: INVALID: {reason}"]
    assert f"INVALID: {reason}" in by["ls --full"]["out"]
    assert (step8 / rel).exists() or os.path.islink(step8 / rel)  # evidence is kept: gc removes no invalid step
    mgr = CheckpointManager(d)
    assert mgr.restore(make_training(seed=3)) == 4
    assert mgr.skipped[0].reason == reason
    mgr.close()


@pytest.mark.timeout(30)
def test_a_fifo_event_log_neither_hangs_the_writer_nor_the_tail(tmp_path):
    path = tmp_path / "events.jsonl"
    os.mkfifo(path)
    log = EventLog(str(path))
    log.emit("save", step=1)  # dropped, not blocked
    assert log.dropped == 1
    assert EventTail(str(path)).read(final=True) == []


@pytest.mark.timeout(60)
def test_the_supervisor_precheck_answers_at_once_and_hands_over_the_older_step(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved_run(str(run))
    _fifo(str(run / step_dirname(8) / TREE_FILE))
    show = "import os; print('FROM', os.environ.get('RESUMEKIT_RESUME_FROM'))"
    cmd = [sys.executable, "-m", "resumekit", "run", "--dir", str(run), "--max-restarts", "0", "--"]
    r = subprocess.run(cmd + [sys.executable, "-c", show], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"FROM {run / step_dirname(4)}" in r.stdout
    (start,) = [e for e in read_events(str(run / "events.jsonl")) if e["event"] == "start"]
    assert start["precheck_s"] < 2.0
