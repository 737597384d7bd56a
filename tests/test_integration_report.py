"""The integrations' shared reporter (integrations/_report.py): the events a framework job gives the supervisor,
including the two that time its restart (``job_init`` ends "spawn + imports", ``first_step`` ends "first step")."""

from __future__ import annotations

import os

from resumekit.events import read_events
from resumekit.integrations._report import JobReporter
from resumekit.supervisor.latency import attempt_fields, job_timings


def test_a_framework_job_reports_init_restore_and_its_first_step_once(tmp_path):
    rep = JobReporter("lightning", directory=str(tmp_path), metrics_every=0)
    rep.restored(40, str(tmp_path / "epoch=1-step=40.ckpt"))
    for step in (41, 42, 43):
        rep.step(step, {"loss": 0.5})
    events = read_events(os.path.join(tmp_path, "events.jsonl"))
    names = [e["event"] for e in events]
    assert names == ["job_init", "restore", "first_step"], names  # metrics_every=0: no metrics, one first_step
    assert events[2]["step"] == 41 and all(e["framework"] == "lightning" for e in events)
    # what the supervisor makes of it: spawn and first step are known; the restore's duration is not reported by
    # the framework, so it stays unknown rather than guessed
    start = events[0]["time"] - 2.0
    fields = attempt_fields(job_timings(events), start)
    assert fields["spawn_s"] == 2.0
    assert fields["first_step_s"] is not None and fields["first_step_s"] >= 0
    assert fields["restore_s"] is None


def test_only_the_rank_that_leads_the_job_writes_events(tmp_path):
    JobReporter("hf", directory=str(tmp_path), leads_job=False).step(1)
    assert not os.path.exists(tmp_path / "events.jsonl")
