"""Attack: files far larger than what they hold (issue 12, point 4).

A 1 GiB sparse ``manifest.json`` costs nothing on disk but used to take 1.3-1.6 GB of memory before being refused;
the same goes for a tracker, a ``trainer_state.json`` or a safetensors header length. Every read of a small file is
capped by its size before a byte is read.
"""

from __future__ import annotations

import os
import struct

import pytest
from attack_helpers import assert_prompt_verdicts, probe, reseal, saved_run

import layout_fixtures as F
from conftest import make_training
from resumekit import CheckpointManager
from resumekit.format import MANIFEST, TENSORS_FILE, step_dirname

GIB = 1 << 30


def _sparse(path: str, size: int = GIB) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.mark.timeout(120)
def test_a_sparse_gigabyte_manifest_is_refused_by_its_size(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved_run(str(run))
    step8 = run / step_dirname(8)
    _sparse(str(step8 / MANIFEST))
    d = str(run)
    results = probe([["ls", d], ["ls", d, "--full"], ["latest", d], ["verify", str(step8)], ["gc", d]])
    assert_prompt_verdicts(results)
    reason = "manifest.json has 1.0 GiB, more than the 64.0 MiB such a file may have"
    assert results[2]["out"].strip() == str(run / step_dirname(4)) and reason in results[2]["err"]
    assert results[3]["out"].strip() == f"{step8}: INVALID: {reason}"
    mgr = CheckpointManager(d)
    assert mgr.restore(make_training(seed=2)) == 4 and mgr.skipped[0].reason == reason
    mgr.close()


@pytest.mark.timeout(120)
def test_a_huge_safetensors_header_length_is_refused_before_reading(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saved_run(str(run))
    path = run / step_dirname(8) / TENSORS_FILE
    # Claims a 1 TiB header; the manifest is forged to match, so only the header check can tell.
    reseal(str(path.parent), TENSORS_FILE, struct.pack("<Q", 1 << 40) + path.read_bytes()[8:])
    results = probe([["verify", str(run / step_dirname(8))], ["latest", str(run)]])
    assert_prompt_verdicts(results)
    assert "header length 1099511627776 does not fit in its" in results[0]["out"]


@pytest.mark.timeout(120)
def test_huge_trackers_and_json_files_of_foreign_layouts(tmp_path):
    hf = tmp_path / "hf"
    F.hf_checkpoint(str(hf), 2)
    F.hf_checkpoint(str(hf), 4)
    _sparse(str(hf / "checkpoint-4" / "trainer_state.json"), 300 << 20)  # above the 256 MiB cap for JSON
    meg = tmp_path / "meg"
    F.megatron_iter(str(meg), 100)
    _sparse(str(meg / "latest_checkpointed_iteration.txt"))
    results = probe(
        [
            ["latest", str(hf)],
            ["verify", str(hf / "checkpoint-4")],
            ["ls", str(meg), "--full"],
            ["latest", str(meg)],
            ["repair", str(meg), "--dry-run"],
        ]
    )
    assert_prompt_verdicts(results)
    assert results[0]["out"].strip() == str(hf / "checkpoint-2")
    assert "trainer_state.json has 300.0 MiB, more than the 256.0 MiB such a file may have" in results[1]["out"]
    assert results[3]["out"].strip() == str(meg / "iter_0000100")
    assert "latest_checkpointed_iteration.txt is empty" in results[4]["out"]
    assert os.path.getsize(meg / "latest_checkpointed_iteration.txt") == GIB  # a dry run changes nothing
