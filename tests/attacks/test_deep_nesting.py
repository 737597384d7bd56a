"""Attack: deep nesting in every parsed file (issue 12, point 3).

``[[[[...]]]]`` a hundred thousand levels deep made ``json.loads`` raise a raw ``RecursionError`` in every command
(manifest), or got past it and broke the decoder halfway through a restore (``state.json``, a safetensors
header). Every parser now returns a verdict: the file is nested too deeply.
"""

from __future__ import annotations

import json
import os

import pytest
from attack_helpers import assert_prompt_verdicts, probe, reseal, saved_run

import layout_fixtures as F
from conftest import make_training
from resumekit import CheckpointManager
from resumekit.format import MANIFEST, TENSORS_FILE, TREE_FILE, step_dirname

DEEP = 100_000


def _deep(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def _deep_manifest(ck: str) -> None:
    with open(os.path.join(ck, MANIFEST)) as f:
        text = f.read()
    with open(os.path.join(ck, MANIFEST), "w") as f:
        f.write(text.replace('"metadata": {', f'"deep": {_deep()}, "metadata": {{', 1))


def _deep_tree(ck: str) -> None:
    with open(os.path.join(ck, TREE_FILE)) as f:
        text = f.read()
    reseal(ck, TREE_FILE, text.replace('"epoch":', f'"deep":{_deep()},"epoch":', 1).encode())


def _moderately_deep_tree(ck: str) -> None:
    # Below the JSON parser's own limit, above ours: json.loads succeeds, the decoder would recurse.
    with open(os.path.join(ck, TREE_FILE)) as f:
        tree = json.load(f)
    tree["state"]["epoch"] = json.loads(_deep(500))
    reseal(ck, TREE_FILE, json.dumps(tree).encode())


def _deep_header(ck: str) -> None:
    with open(os.path.join(ck, TENSORS_FILE), "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = {"x": "@"}
    raw = json.dumps(header).replace('"@"', _deep(20_000)).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    reseal(ck, TENSORS_FILE, len(raw).to_bytes(8, "little") + raw + data[8 + n :])


CASES = {
    "manifest": (_deep_manifest, "manifest.json is nested too deeply (more than 128 levels)"),
    "state-json": (_deep_tree, "state.json is nested too deeply (more than 128 levels)"),
    "state-json-500": (_moderately_deep_tree, "state.json is nested too deeply (more than 128 levels)"),
    "safetensors-header": (_deep_header, "tensors.safetensors has a damaged safetensors header (nested too deeply)"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_deep_nesting_is_a_verdict_everywhere(tmp_path, case):
    run = tmp_path / "run"
    run.mkdir()
    saved_run(str(run))
    step8 = run / step_dirname(8)
    damage, reason = CASES[case]
    damage(str(step8))
    d = str(run)
    results = probe([["ls", d, "--full"], ["latest", d], ["verify", str(step8)], ["gc", d, "--keep-last", "1"]])
    assert_prompt_verdicts(results)
    assert results[1]["out"].strip() == str(run / step_dirname(4))
    assert results[2]["code"] == 1 and results[2]["out"].strip().endswith(f"INVALID: {reason}"), results[2]["out"]
    mgr = CheckpointManager(d)
    assert mgr.restore(make_training(seed=1)) == 4
    assert mgr.skipped[0].reason == reason
    mgr.close()


@pytest.mark.timeout(60)
def test_deep_trainer_state_json(tmp_path):
    F.hf_checkpoint(str(tmp_path), 2)
    F.hf_checkpoint(str(tmp_path), 4)
    with open(tmp_path / "checkpoint-4" / "trainer_state.json", "w") as f:
        f.write('{"global_step": 4, "log_history": ' + _deep() + "}")
    results = probe([["latest", str(tmp_path)], ["verify", str(tmp_path / "checkpoint-4")]])
    assert_prompt_verdicts(results)
    assert results[0]["out"].strip() == str(tmp_path / "checkpoint-2")
    assert "trainer_state.json is nested too deeply" in results[1]["out"]
