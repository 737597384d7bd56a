"""``resumekit.supervisor.prechecks``: the checks before every start, in process and through ``resumekit run``."""

from __future__ import annotations

import os
import socket

import pytest
from supervisor_jobs import PY, events_of, run_cli

from resumekit.events import read_events
from resumekit.supervisor import PrecheckError, Supervisor, SupervisorOptions, check_directory, check_free_space


@pytest.mark.timeout(30)
def test_precheck_directory_under_a_regular_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    r = run_cli("--dir", str(f / "ckpt"), "--", PY, "-c", "pass")
    assert r.returncode == 1
    assert (
        f"resumekit run: cannot create checkpoint directory {f / 'ckpt'}: Not a directory; choose a writable "
        "--dir or fix its permissions" in r.stderr
    )
    assert "starts 0" in r.stderr


def test_precheck_unwritable_directory_in_process(tmp_path, monkeypatch):
    # Tests run as root, which no chmod stops: make the probe write fail instead.
    real_open = os.open

    def deny(path, *a, **kw):
        if ".resumekit-probe-" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(PrecheckError) as e:
        check_directory(str(tmp_path))
    assert str(e.value) == (
        f"checkpoint directory {tmp_path} is not writable (Permission denied); "
        "choose a writable --dir or fix its permissions"
    )
    sup = Supervisor(
        SupervisorOptions(
            command=[PY, "-c", "pass"], directory=str(tmp_path / "d"), quiet=True, events=str(tmp_path / "ev.jsonl")
        )
    )
    assert sup.run() == 1
    assert sup.summary.outcome == "failed" and "is not writable (Permission denied)" in sup.summary.reason
    assert not list((tmp_path / "d").iterdir())  # the probe file was not left behind


@pytest.mark.timeout(30)
def test_precheck_not_enough_free_space(tmp_path):
    r = run_cli("--dir", str(tmp_path), "--min-free", "1000000TiB", "--", PY, "-c", "pass")
    assert r.returncode == 1
    line = next(ln for ln in r.stderr.splitlines() if "not enough free space" in ln)
    assert line.startswith(f"resumekit run: not enough free space at {tmp_path}: ")
    assert "need 1000000.0 TiB (--min-free); free some space (resumekit gc) or lower --min-free" in line


def test_free_space_rule_is_twice_the_last_checkpoint():
    check_free_space("/x", free=2000, last_size=1000, min_free=None)
    with pytest.raises(PrecheckError, match=r"at /x: 1999 B free, need 2000 B \(2x the last checkpoint, 1000 B\)"):
        check_free_space("/x", free=1999, last_size=1000, min_free=10)
    check_free_space("/x", free=None, last_size=10**15, min_free=10**15)  # no notion of free space: skipped


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.timeout(90)
def test_precheck_unreachable_remote(tmp_path):
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }
    r = run_cli(
        "--dir",
        "s3://bucket/x",
        "--events",
        str(tmp_path / "ev.jsonl"),
        "--max-restarts",
        "0",
        "--",
        PY,
        "-c",
        "pass",
        env=env,
    )
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "cannot reach s3://bucket/x" in ln]
    assert lines and lines[0].startswith("resumekit run: cannot reach s3://bucket/x")
    (ev,) = [e for e in read_events(str(tmp_path / "ev.jsonl")) if e["event"] == "precheck_failed"]
    assert ev["check"] == "remote"


@pytest.mark.timeout(90)
def test_precheck_gpus_missing(tmp_path):
    pytest.importorskip("torch")
    r = run_cli("--dir", str(tmp_path), "--gpus", "64", "--max-restarts", "0", "--", PY, "-c", "pass")
    assert r.returncode == 1
    fails = [ln for ln in r.stderr.splitlines() if ln.startswith("resumekit run: hardware check failed")]
    assert len(fails) == 1
    assert "--gpus 64 requested, " in fails[0] and "device(s) visible" in fails[0]
    assert "starts 0" in r.stderr


def test_a_failed_hardware_check_is_retried_within_the_restart_budget(tmp_path, monkeypatch):
    import resumekit.supervisor.planning as sv  # the planner runs the pre-checks

    calls = []

    def flaky(gpus, timeout):
        calls.append(gpus)
        if len(calls) < 3:  # ModelArts re-issues such a job: the supervisor retries it itself
            raise PrecheckError("hardware", "hardware check failed: cuda:0 cannot run a kernel (ECC)", retry=True)
        return {"kind": "cuda", "count": gpus, "need": gpus, "bad": []}

    monkeypatch.setattr(sv, "check_hardware", flaky)
    opts = {"command": [PY, "-c", "pass"], "directory": str(tmp_path), "gpus": 2, "backoff": 0.01, "quiet": True}
    sup = Supervisor(SupervisorOptions(max_restarts=5, **opts))
    assert sup.run() == 0
    assert calls == [2, 2, 2] and sup.summary.precheck_retries == 2 and sup.summary.starts == 1
    assert [e["check"] for e in events_of(tmp_path, "precheck_failed")] == ["hardware", "hardware"]
    calls.clear()
    sup = Supervisor(SupervisorOptions(max_restarts=1, **opts))
    assert sup.run() == 1
    assert sup.summary.outcome == "gave-up" and "restart budget (1) used up" in sup.summary.reason
