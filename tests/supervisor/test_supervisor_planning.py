"""``resumekit.supervisor.planning``: what each start resumes from, ``--resume``, ``--config`` and the hand-off."""

from __future__ import annotations

import json
import sys

import pytest
from supervisor_jobs import PY, ckptjob, events_of, run_cli

from resumekit.supervisor import Supervisor, SupervisorOptions


@pytest.mark.timeout(30)
def test_precheck_invalid_explicit_resume_and_missing_command(tmp_path):
    bad = tmp_path / "step_000000007"
    bad.mkdir()
    r = run_cli("--dir", str(tmp_path), "--resume", str(bad), "--", PY, "-c", "pass")
    assert r.returncode == 1
    assert (
        f"resumekit run: --resume {bad} is not a valid checkpoint: manifest.json is missing (the save never "
        "finished); pass a valid one, or --resume auto"
    ) in r.stderr
    r = run_cli("--dir", str(tmp_path / "d"), "--", "no-such-command-xyz")
    assert r.returncode == 127
    assert "cannot start 'no-such-command-xyz': No such file or directory; check the command and PATH" in r.stderr
    r = run_cli("--dir", str(tmp_path))
    assert r.returncode == 2 and "Missing argument" in r.stderr


def test_config_without_yamlconfig_is_a_one_line_fatal_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "resumekit.yamlconfig", None)  # as before yamlconfig exists
    cfg = tmp_path / "train.yaml"
    cfg.write_text("output_dir: x\n")
    sup = Supervisor(
        SupervisorOptions(command=[PY, "-c", "pass"], directory=str(tmp_path / "d"), config=str(cfg), quiet=True)
    )
    assert sup.run() == 1
    assert sup.summary.reason.startswith(f"--config {cfg} needs resumekit.yamlconfig")


def test_config_gives_the_root_and_gets_the_checkpoint_before_each_start(tmp_path):
    pytest.importorskip("ruamel.yaml")
    pytest.importorskip("resumekit.yamlconfig")
    d = tmp_path / "out"
    d.mkdir()
    ckptjob.save_checkpoint(str(d), {"step": 4, "w": 1.0, "b": 0.0, "h": 1})
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"### output\noutput_dir: {d}  # where checkpoints go\nresume_from_checkpoint: null\n")
    out = tmp_path / "seen.txt"
    code = (
        f"import os; open({str(out)!r}, 'w').write(os.environ['RESUMEKIT_RESUME_FROM'] + '|' + "
        f"open({str(cfg)!r}).read())"
    )
    sup = Supervisor(SupervisorOptions(command=[PY, "-c", code], config=str(cfg), layout="native", quiet=True))
    assert sup.run() == 0
    env_value, yaml_text = out.read_text().split("|", 1)
    assert env_value == str(d / "step_000000004")
    assert yaml_text == (
        f"### output\noutput_dir: {d}  # where checkpoints go\nresume_from_checkpoint: {d / 'step_000000004'}\n"
    )
    (ev,) = events_of(d, "config_resolved")  # the root came from output_dir: the log is there too
    assert ev["resume_from"] == str(d / "step_000000004")


def test_environment_hand_off_modelarts_counters_and_tracker_repair(tmp_path, monkeypatch):
    from resumekit.layouts import _REGISTRY, NativeLayout, register

    class TrackedNative(NativeLayout):  # a native layout with a tracker, to see repair() called before starts
        name = "test-tracked"
        tracker_name = "latest"

        def detect(self, storage):
            return False

        def tracker_value(self, info):
            return info.name if info else None

    register(TrackedNative())
    try:
        d = tmp_path / "ckpt"
        d.mkdir()
        ckptjob.save_checkpoint(str(d), {"step": 4, "w": 1.0, "b": 0.0, "h": 1})
        (d / "latest").write_text("step_000000099\n")  # points at a checkpoint that does not exist
        out = tmp_path / "env.json"
        keys = [
            "RESUMEKIT_RESUME_FROM",
            "RESUMEKIT_RESTART_COUNT",
            "RESUMEKIT_DIR",
            "RESUMEKIT_HEARTBEAT",
            "RESUMEKIT_EVENTS",
        ]
        code = f"import os, json; json.dump({{k: os.environ.get(k) for k in {keys!r}}}, open({str(out)!r}, 'w'))"
        monkeypatch.setenv("MA_PROC_START_CNT", "2")
        monkeypatch.setenv("MA_SCHEDULE_CNT", "1")
        sup = Supervisor(
            SupervisorOptions(command=[PY, "-c", code], directory=str(d), layout="test-tracked", quiet=True)
        )
        assert sup.run() == 0
    finally:
        _REGISTRY.pop("test-tracked", None)
    env = json.loads(out.read_text())
    assert env == {
        "RESUMEKIT_RESUME_FROM": str(d / "step_000000004"),
        "RESUMEKIT_RESTART_COUNT": "0",
        "RESUMEKIT_DIR": str(d),
        "RESUMEKIT_HEARTBEAT": str(d / ".heartbeat"),
        "RESUMEKIT_EVENTS": str(d / "events.jsonl"),
    }
    (start,) = events_of(d, "start")
    assert start["ma_proc_start_cnt"] == "2" and start["ma_schedule_cnt"] == "1" and start["resume_step"] == 4
    (rep,) = events_of(d, "repair")
    assert rep["old"] == "step_000000099" and rep["new"] == "step_000000004" and rep["changed"]
    assert (d / "latest").read_text().strip() == "step_000000004"
    assert (d / "latest.bak").read_text().strip() == "step_000000099"


def test_resume_never_and_invalid_newest_checkpoint_is_skipped_and_logged(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    ckptjob.save_checkpoint(str(d), {"step": 4, "w": 1.0, "b": 0.0, "h": 1})
    ckptjob.save_checkpoint(str(d), {"step": 8, "w": 1.0, "b": 0.0, "h": 2})
    with open(d / "step_000000008" / "state.json", "r+b") as f:  # bit rot in the newest checkpoint
        f.write(b"X")
    out = tmp_path / "resume.txt"
    # Issue 11: with nothing to resume, RESUMEKIT_RESUME_FROM is unset (it was "").
    code = f"import os; open({str(out)!r}, 'w').write(os.environ.get('RESUMEKIT_RESUME_FROM', '<unset>'))"
    assert Supervisor(SupervisorOptions(command=[PY, "-c", code], directory=str(d), quiet=True)).run() == 0
    assert out.read_text() == str(d / "step_000000004")
    (skip,) = events_of(d, "skip_invalid")
    assert skip["step"] == 8 and "checksum mismatch" in skip["reason"]
    assert (
        Supervisor(SupervisorOptions(command=[PY, "-c", code], directory=str(d), quiet=True, resume="never")).run() == 0
    )
    assert out.read_text() == "<unset>"


def test_verified_token_is_handed_to_the_job_only_for_what_this_start_verified(tmp_path, monkeypatch):
    """Hash once: after verifying the newest checkpoint in full, the supervisor hands the job a token naming it;
    none with --resume never, and never one inherited from its own environment."""
    import os
    import time

    from resumekit.storage.verified import ENV_VERIFIED, VerifiedToken

    monkeypatch.setenv(ENV_VERIFIED, "inherited")
    d = tmp_path / "out"
    d.mkdir()
    out = tmp_path / "seen.txt"
    code = f"import os; open({str(out)!r}, 'w').write(os.environ.get({ENV_VERIFIED!r}, '<unset>'))"

    def run(**kw) -> str:
        sup = Supervisor(SupervisorOptions(command=[PY, "-c", code], directory=str(d), quiet=True, **kw))
        assert sup.run() == 0
        return out.read_text()

    assert run() == "<unset>"  # nothing to resume: no token, and not the inherited one
    ckptjob.save_checkpoint(str(d), {"step": 4, "w": 1.0, "b": 0.0, "h": 1})
    time.sleep(0.15)  # past the settle margin of storage.verified
    tok = VerifiedToken.from_env(run())
    assert tok is not None and tok.path == os.path.realpath(d / "step_000000004")
    assert set(tok.files) == {e.name for e in (d / "step_000000004").iterdir() if e.name != "manifest.json"}
    assert run(resume="never") == "<unset>"


def test_local_tier_space_check_names_tmpfs_and_the_fix(tmp_path, monkeypatch):
    """A local tier without room for the newest checkpoint and the next fails the pre-check in one line that says
    what the tier is (tmpfs counts against RAM) and how to fix it."""
    import os
    import uuid

    from resumekit.storage.local import LocalStorage

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = tmp_path / "out"
    d.mkdir()
    ckptjob.save_checkpoint(str(d), {"step": 4, "w": 1.0, "b": 0.0, "h": 1})
    tier = f"/dev/shm/resumekit-test-{uuid.uuid4().hex[:12]}"
    real_free = LocalStorage.free_bytes
    monkeypatch.setattr(
        LocalStorage, "free_bytes", lambda self: 10 if self.root == tier else real_free(self), raising=True
    )
    try:
        sup = Supervisor(SupervisorOptions(command=[PY, "-c", "pass"], directory=str(d), local_tier=tier, quiet=True))
        assert sup.run() == 1
        assert f"local tier {tier} (tmpfs, in RAM) has 10 B free, needs " in sup.summary.reason
        assert "keep fewer steps there (keep_last), or put the local tier on a disk" in sup.summary.reason
    finally:
        import shutil

        shutil.rmtree(tier, ignore_errors=True)
