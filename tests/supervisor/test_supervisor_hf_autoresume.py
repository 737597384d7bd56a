"""A real HF Trainer job that relies on its own auto-resume (issue 11): whatever it does, it never loads an invalid
checkpoint under ``resumekit run``, and no valid checkpoint is ever quarantined."""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("transformers")

from supervisor_jobs import (
    PY,
    events_of,
    finish,
    procs,  # noqa: F401 - a fixture, used as an argument
    summary_of,
)

import layout_fixtures as F

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The HF examples' pattern: no path is given, the Trainer resumes from get_last_checkpoint(output_dir), which takes
# the highest checkpoint-N without looking inside.
AUTO_RESUME_JOB = """
import sys
from transformers.trainer_utils import get_last_checkpoint
import hf_tiny
out = sys.argv[1]
last = get_last_checkpoint(out)
print("job: get_last_checkpoint ->", last, flush=True)
hf_tiny.make_trainer(out, 4).train(resume_from_checkpoint=last)
"""


@pytest.mark.timeout(180)
def test_hf_auto_resume_with_only_a_half_written_checkpoint_starts_from_scratch_and_finishes(tmp_path, procs):
    out = tmp_path / "out"
    F.hf_checkpoint(str(out), 2, state=False)  # a save killed before trainer_state.json: the only checkpoint
    env = {"PYTHONPATH": os.pathsep.join([TESTS] + sys.path), "HF_HUB_OFFLINE": "1"}
    p = procs.run(
        out,
        "--layout",
        "hf",
        "--max-restarts",
        "2",
        "--json",
        command=[PY, "-c", AUTO_RESUME_JOB, str(out)],
        env=env,
    )
    rc, stdout, err = finish(p, timeout=170)
    assert rc == 0, err
    assert "job: get_last_checkpoint -> None" in stdout  # the framework's own choice: nothing, a fresh start
    (hidden,) = events_of(out, "hide_invalid")
    assert hidden["name"] == "checkpoint-2" and "trainer_state.json" in hidden["reason"]
    assert os.path.isdir(hidden["to"]) and os.path.dirname(hidden["to"]) == str(out / "quarantine")
    assert "moved invalid checkpoint" in err and "out of the framework's sight" in err
    assert not events_of(out, "quarantine")
    s = summary_of(stdout)
    assert s["starts"] == 1 and s["failures"] == 0 and s["quarantined"] == 0 and s["hidden_invalid"] == 1
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # rewritten by this run, valid
