"""Tiered mode rides out a store outage (issue 16): training and local commits go on while uploads are retried in
the background, no local step is deleted before it is on the remote, the lag is in the events and in
``resumekit ls``, the backlog is bounded, and the remote catches up once the store is back."""

from __future__ import annotations

import os
import time

import pytest
from click.testing import CliRunner

from conftest import make_training, train_steps
from resumekit import CheckpointManager
from resumekit.cli import main
from resumekit.events import read_events
from resumekit.layouts.native import NativeLayout
from resumekit.storage import open_storage
from resumekit.storage.uploader import UploadOptions, backlog_full, remote_lag, upload_status

OUTAGE_S = 30.0  # the scenario: the store is down for 30 s in the middle of training


def valid_steps(storage):
    lay = NativeLayout()
    return sorted(i.step for i in lay.list(storage) if lay.validate(storage, i, full=True).valid)


# -- pure ------------------------------------------------------------------------------------------------------


def test_lag_and_backlog_decisions():
    assert remote_lag(40, 10, 100.0, 130.0) == (30, 30.0)
    assert remote_lag(40, None, 100.0, 130.0) == (40, 30.0)
    assert remote_lag(40, 40, None, 130.0) == (0, 0.0)  # nothing waits: caught up
    assert backlog_full(0, 4, 0, 10, 0) is None  # nothing waits: a full disk is retention's business
    assert backlog_full(4, 4, None, 10, 0) == "4 checkpoints wait for upload (RESUMEKIT_UPLOAD_BACKLOG=4)"
    assert backlog_full(1, 4, 100, 90, 20).startswith("0 MB free locally")
    assert backlog_full(1, 4, 200, 90, 20) is None


def test_upload_options_from_the_environment(monkeypatch):
    monkeypatch.setenv("RESUMEKIT_UPLOAD_BACKLOG", "5")
    monkeypatch.setenv("RESUMEKIT_UPLOAD_RETRY", "0.5")
    o = UploadOptions.from_env(retry_delay_max=3)
    assert (o.max_backlog, o.retry_delay, o.retry_delay_max) == (5, 0.5, 3)
    assert [o.retry_in(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3, 3]
    with pytest.raises(ValueError, match=r"UploadOptions.max_backlog must be a positive integer"):
        UploadOptions(max_backlog=0)


# -- against moto, through a proxy that goes down --------------------------------------------------------------


@pytest.fixture
def outage_env(s3_bucket, fault_proxy, monkeypatch):
    proxy = fault_proxy()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("RESUMEKIT_S3_RETRIES", "2")
    monkeypatch.setenv("RESUMEKIT_S3_READ_TIMEOUT", "2")
    monkeypatch.setenv("RESUMEKIT_UPLOAD_RETRY", "0.5")
    monkeypatch.setenv("RESUMEKIT_UPLOAD_RETRY_MAX", "1")
    return proxy


def test_training_rides_out_an_outage_and_the_remote_catches_up(outage_env, s3_bucket, monkeypatch, tmp_path):
    proxy = outage_env
    monkeypatch.setenv("RESUMEKIT_UPLOAD_LAG_WARN", "3")
    monkeypatch.setenv("RESUMEKIT_UPLOAD_BACKLOG", "200")
    fast = str(tmp_path / "fast")
    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=fast, every_steps=5, keep_last=2)
    assert mgr.restore(st) == 0
    step, slowest, saved = 0, 0.0, []
    t0 = time.monotonic()
    phase = "before"
    while True:
        now = time.monotonic() - t0
        if phase == "before" and now > 2:
            phase, down_step = "down", step
            proxy.down()
        elif phase == "down" and now > 2 + OUTAGE_S:
            # Every step committed during the outage is still on local disk: retention (keep_last=2) waits.
            local = set(valid_steps(open_storage(fast)))
            lost = [s for s in saved if s > down_step and s not in local]
            assert not lost, f"local steps deleted before upload: {lost}"
            r = CliRunner().invoke(main, ["ls", fast])
            assert f"remote {s3_bucket.uri('run')}: " in r.output and " steps / " in r.output, r.output
            phase = "after"
            proxy.heal()
        elif phase == "after" and now > 2 + OUTAGE_S + 3:
            break
        train_steps(st, step + 1, None, start=step)
        step += 1
        t = time.monotonic()
        if mgr.maybe_save(step, st):
            saved.append(step)
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.03)  # the rest of a training step
    mgr.close()  # the remote has caught up: nothing to raise
    assert slowest < 2.0, f"a step waited {slowest:.1f} s for the store"
    events = read_events(os.path.join(fast, "events.jsonl"))
    kinds = [e["event"] for e in events]
    assert [e["step"] for e in events if e["event"] == "save"] == saved  # no save failed or was deferred
    assert "save_deferred" not in kinds
    failed = [e for e in events if e["event"] == "upload_failed"]
    assert len(failed) >= 3 and max(e["lag_steps"] for e in failed) >= 10 and max(e["lag_s"] for e in failed) > 3
    (lag,) = [e for e in events if e["event"] == "upload_lag"]
    assert lag["level"] == "warning" and lag["remote"] == s3_bucket.uri("run")
    assert "upload_caught_up" in kinds[kinds.index("upload_lag") :]
    last_upload = [e for e in events if e["event"] == "upload"][-1]
    assert last_upload["lag_steps"] == 0 and last_upload["backlog"] == 0
    # The remote ends with the newest steps (retention keeps 2), valid; so does the local tier.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.server.endpoint)
    assert valid_steps(open_storage(s3_bucket.uri("run"))) == saved[-2:]
    assert valid_steps(open_storage(fast)) == saved[-2:]
    status = upload_status(fast)
    assert status["backlog"] == 0 and status["lag_steps"] == 0 and status["remote_newest"] == saved[-1]


def test_a_full_backlog_holds_new_saves_and_keeps_the_waiting_steps(outage_env, s3_bucket, monkeypatch, tmp_path):
    proxy = outage_env
    monkeypatch.setenv("RESUMEKIT_UPLOAD_BACKLOG", "2")
    monkeypatch.setenv("RESUMEKIT_UPLOAD_RETRY", "60")
    fast = str(tmp_path / "fast")
    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=fast, every_steps=1, keep_last=1)
    assert mgr.restore(st) == 0
    proxy.down()
    assert mgr.maybe_save(1, st) and mgr.maybe_save(2, st)
    assert not mgr.maybe_save(3, st)  # two steps wait for the store: this save waits, training goes on
    assert valid_steps(open_storage(fast)) == [1, 2]  # keep_last=1, but neither is on the remote yet
    (deferred,) = [e for e in read_events(os.path.join(fast, "events.jsonl")) if e["event"] == "save_deferred"]
    assert deferred["step"] == 3 and deferred["backlog"] == 2 and "RESUMEKIT_UPLOAD_BACKLOG=2" in deferred["reason"]
    mgr.save(3, st)  # an explicit save is never held
    proxy.heal()
    mgr.wait()  # tries at once: the store is back
    assert mgr.maybe_save(4, st)
    mgr.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.server.endpoint)
    assert valid_steps(open_storage(s3_bucket.uri("run"))) == [4]
    assert valid_steps(open_storage(fast)) == [4]


def test_the_run_summary_and_ls_show_the_remote_lag(s3_bucket, tmp_path):
    import io
    import json

    from conftest import PYTHON
    from resumekit.events import EventLog
    from resumekit.supervisor import Supervisor, SupervisorOptions

    fast = tmp_path / "fast"
    fast.mkdir()
    # What the uploader of a job that was cut off mid-outage left in the local tier's log.
    EventLog(str(fast / "events.jsonl"), "library").emit(
        "upload_failed", steps=[30], remote=s3_bucket.uri("run"), remote_newest=10, lag_steps=20, lag_s=42.0, backlog=2
    )
    err = io.StringIO()
    sup = Supervisor(
        SupervisorOptions(
            command=[PYTHON, "-c", "pass"],
            directory=s3_bucket.uri("run"),
            local_tier=str(fast),
            max_restarts=0,
            quiet=False,
        ),
        stderr=err,
    )
    assert sup.run() == 0
    assert f"remote {s3_bucket.uri('run')}: 20 steps / " in err.getvalue()
    (summary,) = [e for e in read_events(str(fast / "events.jsonl")) if e["event"] == "summary"]
    assert summary["remote_lag"]["lag_steps"] == 20 and summary["remote_lag"]["backlog"] == 2
    assert summary["remote_lag"]["lag_s"] >= 42.0
    out = CliRunner().invoke(main, ["ls", str(fast)]).output
    assert "20 steps / " in out and "2 checkpoint(s) waiting for upload (newest there: step 10)" in out
    assert json.loads(CliRunner().invoke(main, ["ls", str(fast), "--json"]).output) == []
