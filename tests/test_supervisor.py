"""``resumekit run``: the supervisor, with real processes (tests/jobs/ckptjob.py) and its pure decision logic."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resumekit.errors import ConfigError
from resumekit.events import read_events
from resumekit.supervisor import (
    AttemptRecord,
    PrecheckError,
    Supervisor,
    SupervisorOptions,
    backoff_delay,
    check_directory,
    check_free_space,
    descendants,
    exit_code_of,
    is_crash_loop,
    is_failure,
    lost_steps_of,
    made_progress,
    next_streak,
    parse_size,
    pid_alive,
    quarantine,
    summarize,
)

JOBS = Path(__file__).parent / "jobs"
JOB = str(JOBS / "ckptjob.py")
PY = sys.executable
sys.path.insert(0, str(JOBS))
import ckptjob  # noqa: E402


# ------------------------------------------------------------------------------------------------ fixtures


class Procs:
    """Starts ``resumekit run`` in its own session and makes sure nothing it started survives the test."""

    def __init__(self) -> None:
        self.started: List[subprocess.Popen] = []
        self.dirs: List[Path] = []

    def run(self, directory: Path, *args: str, job: Optional[List[str]] = None, env: Optional[dict] = None,
            command: Optional[List[str]] = None) -> subprocess.Popen:
        self.dirs.append(directory)
        cmd = [PY, "-m", "resumekit", "run", "--dir", str(directory), *args, "--"]
        cmd += command if command is not None else [PY, JOB, *(job or [])]
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, env=dict(os.environ, **(env or {})))
        self.started.append(p)
        return p

    def cleanup(self) -> None:
        for p in self.started:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        pids = []
        for d in self.dirs:
            pids += [e["pid"] for e in read_events(str(d / "events.jsonl")) if e.get("event") == "start"]
            try:
                pids.append(int((d / ckptjob.CHILD_PIDFILE).read_text()))
            except (OSError, ValueError):
                pass
        for pid in pids:
            for fn in (os.killpg, os.kill):
                try:
                    fn(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.cleanup()


def events_of(directory: Path, name: Optional[str] = None) -> List[Dict[str, Any]]:
    evs = read_events(str(directory / "events.jsonl"))
    return [e for e in evs if name is None or e.get("event") == name]


def final_state(directory: Path) -> Dict[str, Any]:
    return json.loads((directory / ckptjob.FINAL_FILE).read_text())


def read_beat(directory: Path) -> Dict[str, Any]:
    try:
        return json.loads((directory / ".heartbeat").read_text())
    except (OSError, ValueError):
        return {}


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def summary_of(out: str) -> Dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ acceptance


@pytest.mark.timeout(240)
def test_random_sigkills_including_mid_save_end_equal_to_a_straight_run(tmp_path, procs):
    d = tmp_path / "ckpt"
    steps, n_kills = 1000, 20  # the acceptance: 20+ kills
    p = procs.run(d, "--backoff", "0.05", "--backoff-max", "0.05", "--max-restarts", "40", "--json",
                  job=["--steps", str(steps), "--save-every", "10", "--step-time", "0.01", "--save-pause", "0.03",
                       "--payload", "65536"])
    rng = random.Random(1234)
    killed: List[int] = []
    mid_save = 0
    deadline = time.monotonic() + 200
    while len(killed) < n_kills and p.poll() is None and time.monotonic() < deadline:
        beat = read_beat(d)
        pid = beat.get("pid")
        if not pid or pid in killed:
            time.sleep(0.005)
            continue
        first = beat.get("step")
        while read_beat(d).get("step") == first and p.poll() is None:  # trained past its resume point
            time.sleep(0.005)
        if len(killed) % 3 == 0:
            # Aim at a save: wait for a new in-progress directory and kill while it is being written.
            known = {n for n in os.listdir(d) if n.startswith(".tmp-")}
            t_end = time.monotonic() + 2
            while time.monotonic() < t_end and not ({n for n in os.listdir(d) if n.startswith(".tmp-")} - known):
                time.sleep(0.002)
            in_save = bool({n for n in os.listdir(d) if n.startswith(".tmp-")} - known)
        else:
            time.sleep(rng.uniform(0.0, 0.25))
            in_save = any(n.startswith(".tmp-") and not n.startswith(".tmp-deleting") for n in os.listdir(d))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        killed.append(pid)
        mid_save += in_save
    rc, out, err = finish(p, timeout=90)
    assert rc == 0, err
    assert len(killed) == n_kills, err
    assert mid_save >= 1, "no kill landed during a save"
    assert final_state(d) == ckptjob.straight_run(steps)
    s = summary_of(out)
    assert s["killed_by_signal"] == n_kills and s["failures"] == n_kills and s["restarts"] == n_kills
    assert s["outcome"] == "success" and s["quarantined"] == 0
    assert 0 <= s["effective_ratio"] <= 1 and s["lost_steps"] >= 0
    exits = [e for e in events_of(d, "exit") if e["failure"]]
    assert sorted(e["pid"] for e in exits) == sorted(killed)
    assert all(e["signal"] == "SIGKILL" and e["exit_code"] == 137 for e in exits)
    assert "killed by a signal" in err and "lost steps" in err
    # Each restart resumed from a checkpoint that verifies (half-written ones were never handed over).
    starts = events_of(d, "start")
    assert len(starts) == n_kills + 1
    assert all(s["resume_from"] is None or Path(s["resume_from"]).name.startswith("step_") for s in starts)


@pytest.mark.timeout(60)
def test_hung_job_is_dumped_killed_with_its_detached_child_and_restarted(tmp_path, procs):
    d = tmp_path / "ckpt"
    timeout = 1.5
    p = procs.run(d, "--hang-timeout", str(timeout), "--backoff", "0.05", "--json",
                  job=["--steps", "30", "--save-every", "5", "--step-time", "0.01", "--hang-at", "12"])
    rc, out, err = finish(p)
    assert rc == 0, err
    child = int((d / ckptjob.CHILD_PIDFILE).read_text())
    assert not pid_alive(child), "the hung job's detached child survived"
    (hang,) = events_of(d, "hang")
    assert hang["step"] == 12
    assert timeout < hang["heartbeat_age_s"] <= timeout + 2
    kill = [e for e in events_of(d, "kill") if e["reason"] == "hang"][0]
    assert child in kill["pids"] and kill["time"] - hang["time"] < 2
    if hang["dump"].startswith("SIGUSR1"):
        assert "ckptjob.py" in err and "most recent call first" in err  # faulthandler's dump on the job's stderr
    else:
        assert Path(hang["dump_path"]).is_file()
    s = summary_of(out)
    assert s["hangs"] == 1 and s["restarts"] == 1 and s["lost_steps"] == 2  # hung at 12, resumed from 10
    assert final_state(d) == ckptjob.straight_run(30)


@pytest.mark.timeout(60)
def test_sigterm_makes_the_job_save_and_a_second_run_resumes_without_losing_a_step(tmp_path, procs):
    d = tmp_path / "ckpt"
    job = ["--steps", "200", "--save-every", "50", "--step-time", "0.01"]
    p = procs.run(d, "--grace", "5", "--json", job=job)
    t_end = time.monotonic() + 30
    while (read_beat(d).get("step") or 0) < 23 and time.monotonic() < t_end:
        time.sleep(0.005)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p)
    assert time.monotonic() - t0 < 5
    assert rc == 0, err
    s = summary_of(out)
    assert s["outcome"] == "preempted" and s["preemptions"] == 1 and s["restarts"] == 0 and s["failures"] == 0
    (pre,) = events_of(d, "preempt")
    assert pre["signal"] == "SIGTERM"
    saved = events_of(d, "save")[-1]["step"]
    assert saved == read_beat(d)["step"] and saved % 50 != 0  # the preemption save, at the last step reached
    assert not events_of(d, "restart")

    p2 = procs.run(d, "--json", job=job)
    rc, out, err = finish(p2)
    assert rc == 0, err
    restores = events_of(d, "restore")
    assert restores[-1]["step"] == saved
    assert summary_of(out)["lost_steps"] == 0
    assert final_state(d) == ckptjob.straight_run(200)


@pytest.mark.timeout(60)
def test_a_job_that_ignores_sigterm_is_killed_after_the_grace_period_and_not_restarted(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = procs.run(d, "--grace", "0.5", "--json", job=["--steps", "100000", "--ignore-term"])
    t_end = time.monotonic() + 30
    while not read_beat(d) and time.monotonic() < t_end:
        time.sleep(0.01)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p)
    assert rc == 128 + signal.SIGKILL
    assert 0.5 <= time.monotonic() - t0 < 4
    assert [e["reason"] for e in events_of(d, "kill")] == ["grace period expired"]
    assert len(events_of(d, "start")) == 1
    assert summary_of(out)["outcome"] == "preempted"


@pytest.mark.timeout(60)
def test_a_checkpoint_that_crashes_every_load_is_quarantined_and_the_run_completes(tmp_path, procs):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / ckptjob.POISON_FILE).write_text("10")
    p = procs.run(d, "--crash-loop", "3", "--max-restarts", "6", "--backoff", "0.02", "--json",
                  job=["--steps", "20", "--save-every", "5", "--step-time", "0.005", "--crash-at", "12"])
    rc, out, err = finish(p)
    assert rc == 0, err
    (q,) = events_of(d, "quarantine")
    assert q["step"] == 10 and q["failures"] == 3 and q["next_step"] == 5
    moved = Path(q["to"])
    assert moved.name.startswith("quarantined-step_000000010-")
    assert (moved / "manifest.json").is_file() and (moved / "state.json").is_file()  # never deleted
    starts = events_of(d, "start")
    assert [s["resume_step"] for s in starts] == [None, 10, 10, 10, 5]
    s = summary_of(out)
    assert s["quarantined"] == 1 and s["failures"] == 4 and s["starts"] == 5
    assert "quarantined it as" in err
    assert final_state(d) == ckptjob.straight_run(20)


@pytest.mark.timeout(60)
def test_a_crash_loop_with_nothing_to_quarantine_gives_up_with_the_jobs_exit_code(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = procs.run(d, "--crash-loop", "2", "--max-restarts", "9", "--backoff", "0.01", "--json",
                  command=[PY, "-c", "import sys; sys.exit(5)"])
    rc, out, err = finish(p)
    assert rc == 5
    s = summary_of(out)
    assert s["outcome"] == "gave-up" and s["starts"] == 2
    assert "crash loop: the job failed 2 times in a row starting from scratch" in err


@pytest.mark.timeout(60)
def test_restart_budget_is_respected(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = procs.run(d, "--crash-loop", "100", "--max-restarts", "2", "--backoff", "0.01", "--json",
                  command=[PY, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    rc, out, err = finish(p)
    assert rc == 128 + signal.SIGSEGV
    s = summary_of(out)
    assert s["starts"] == 3 and s["restarts"] == 2 and s["outcome"] == "gave-up"
    assert "restart budget used up (--max-restarts 2); last exit 139 (killed by SIGSEGV)" in err


@pytest.mark.timeout(30)
def test_leftover_processes_of_a_finished_job_are_killed(tmp_path, procs):
    d = tmp_path / "ckpt"
    pidfile = tmp_path / "bg.pid"
    script = (f"import subprocess, sys; "
              f"a = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"b = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
              f"open({str(pidfile)!r}, 'w').write(f'{{a.pid}} {{b.pid}}')")
    p = procs.run(d, command=[PY, "-c", script])
    rc, out, err = finish(p)
    assert rc == 0, err
    pids = [int(x) for x in pidfile.read_text().split()]
    assert not any(pid_alive(x) for x in pids), "a process the job left behind survived"
    (ev,) = events_of(d, "cleanup")
    assert set(pids) <= set(ev["pids"]) | {pids[0]}  # the in-group one may go with the process group kill


@pytest.mark.timeout(30)
def test_a_job_that_never_beats_is_never_hung_and_sigterm_during_backoff_stops(tmp_path, procs):
    d = tmp_path / "ckpt"
    p = procs.run(d, "--hang-timeout", "0.3", "--json", command=[PY, "-c", "import time; time.sleep(1.0)"])
    rc, out, err = finish(p)
    assert rc == 0 and summary_of(out)["hangs"] == 0, err
    p = procs.run(d, "--backoff", "30", "--backoff-max", "30", "--json", command=[PY, "-c", "raise SystemExit(4)"])
    t_end = time.monotonic() + 20
    while not events_of(d, "restart") and time.monotonic() < t_end:
        time.sleep(0.02)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p)
    assert rc == 4 and time.monotonic() - t0 < 3
    assert "SIGTERM received while no job was running; not starting it again" in err
    assert summary_of(out)["starts"] == 1


# ------------------------------------------------------------------------------------------------ pre-checks


def _run_cli(*args: str, env: Optional[dict] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "resumekit", "run", *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.timeout(30)
def test_precheck_directory_under_a_regular_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    r = _run_cli("--dir", str(f / "ckpt"), "--", PY, "-c", "pass")
    assert r.returncode == 1
    assert f"resumekit run: cannot create checkpoint directory {f / 'ckpt'}: Not a directory; choose a writable " \
           "--dir or fix its permissions" in r.stderr
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
    assert str(e.value) == (f"checkpoint directory {tmp_path} is not writable (Permission denied); "
                            "choose a writable --dir or fix its permissions")
    sup = Supervisor(SupervisorOptions(command=[PY, "-c", "pass"], directory=str(tmp_path / "d"), quiet=True,
                                       events=str(tmp_path / "ev.jsonl")))
    assert sup.run() == 1
    assert sup.summary.outcome == "failed" and "is not writable (Permission denied)" in sup.summary.reason
    assert not list((tmp_path / "d").iterdir())  # the probe file was not left behind


@pytest.mark.timeout(30)
def test_precheck_not_enough_free_space(tmp_path):
    r = _run_cli("--dir", str(tmp_path), "--min-free", "1000000TiB", "--", PY, "-c", "pass")
    assert r.returncode == 1
    line = [ln for ln in r.stderr.splitlines() if "not enough free space" in ln][0]
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
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "1"}
    r = _run_cli("--dir", "s3://bucket/x", "--events", str(tmp_path / "ev.jsonl"), "--max-restarts", "0",
                 "--", PY, "-c", "pass", env=env)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "cannot reach s3://bucket/x" in ln]
    assert lines and lines[0].startswith("resumekit run: cannot reach s3://bucket/x")
    (ev,) = [e for e in read_events(str(tmp_path / "ev.jsonl")) if e["event"] == "precheck_failed"]
    assert ev["check"] == "remote"


@pytest.mark.timeout(90)
def test_precheck_gpus_missing(tmp_path):
    pytest.importorskip("torch")
    r = _run_cli("--dir", str(tmp_path), "--gpus", "64", "--max-restarts", "0", "--", PY, "-c", "pass")
    assert r.returncode == 1
    fails = [ln for ln in r.stderr.splitlines() if ln.startswith("resumekit run: hardware check failed")]
    assert len(fails) == 1
    assert "--gpus 64 requested, " in fails[0] and "device(s) visible" in fails[0]
    assert "starts 0" in r.stderr


def test_a_failed_hardware_check_is_retried_within_the_restart_budget(tmp_path, monkeypatch):
    import resumekit.supervisor as sv

    calls = []

    def flaky(gpus, timeout):
        calls.append(gpus)
        if len(calls) < 3:  # ModelArts re-issues such a job: the supervisor retries it itself
            raise PrecheckError("hardware", "hardware check failed: cuda:0 cannot run a kernel (ECC)", retry=True)
        return {"kind": "cuda", "count": gpus, "need": gpus, "bad": []}

    monkeypatch.setattr(sv, "check_hardware", flaky)
    opts = dict(command=[PY, "-c", "pass"], directory=str(tmp_path), gpus=2, backoff=0.01, quiet=True)
    sup = Supervisor(SupervisorOptions(max_restarts=5, **opts))
    assert sup.run() == 0
    assert calls == [2, 2, 2] and sup.summary.precheck_retries == 2 and sup.summary.starts == 1
    assert [e["check"] for e in events_of(tmp_path, "precheck_failed")] == ["hardware", "hardware"]
    calls.clear()
    sup = Supervisor(SupervisorOptions(max_restarts=1, **opts))
    assert sup.run() == 1
    assert sup.summary.outcome == "gave-up" and "restart budget (1) used up" in sup.summary.reason


@pytest.mark.timeout(30)
def test_precheck_invalid_explicit_resume_and_missing_command(tmp_path):
    bad = tmp_path / "step_000000007"
    bad.mkdir()
    r = _run_cli("--dir", str(tmp_path), "--resume", str(bad), "--", PY, "-c", "pass")
    assert r.returncode == 1
    assert (f"resumekit run: --resume {bad} is not a valid checkpoint: manifest.json is missing (the save never "
            "finished); pass a valid one, or --resume auto") in r.stderr
    r = _run_cli("--dir", str(tmp_path / "d"), "--", "no-such-command-xyz")
    assert r.returncode == 127
    assert "cannot start 'no-such-command-xyz': No such file or directory; check the command and PATH" in r.stderr
    r = _run_cli("--dir", str(tmp_path))
    assert r.returncode == 2 and "Missing argument" in r.stderr


def test_config_without_yamlconfig_is_a_one_line_fatal_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "resumekit.yamlconfig", None)  # as before yamlconfig exists
    cfg = tmp_path / "train.yaml"
    cfg.write_text("output_dir: x\n")
    sup = Supervisor(SupervisorOptions(command=[PY, "-c", "pass"], directory=str(tmp_path / "d"), config=str(cfg),
                                       quiet=True))
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
    code = (f"import os; open({str(out)!r}, 'w').write(os.environ['RESUMEKIT_RESUME_FROM'] + '|' + "
            f"open({str(cfg)!r}).read())")
    sup = Supervisor(SupervisorOptions(command=[PY, "-c", code], config=str(cfg), layout="native", quiet=True))
    assert sup.run() == 0
    env_value, yaml_text = out.read_text().split("|", 1)
    assert env_value == str(d / "step_000000004")
    assert yaml_text == (f"### output\noutput_dir: {d}  # where checkpoints go\n"
                         f"resume_from_checkpoint: {d / 'step_000000004'}\n")
    (ev,) = events_of(d, "config_resolved")  # the root came from output_dir: the log is there too
    assert ev["resume_from"] == str(d / "step_000000004")


# ------------------------------------------------------------------------------------------------ hand-off


def test_environment_hand_off_modelarts_counters_and_tracker_repair(tmp_path, monkeypatch):
    from resumekit.layouts import NativeLayout, register
    from resumekit.layouts import _REGISTRY

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
        keys = ["RESUMEKIT_RESUME_FROM", "RESUMEKIT_RESTART_COUNT", "RESUMEKIT_DIR", "RESUMEKIT_HEARTBEAT",
                "RESUMEKIT_EVENTS"]
        code = f"import os, json; json.dump({{k: os.environ.get(k) for k in {keys!r}}}, open({str(out)!r}, 'w'))"
        monkeypatch.setenv("MA_PROC_START_CNT", "2")
        monkeypatch.setenv("MA_SCHEDULE_CNT", "1")
        sup = Supervisor(SupervisorOptions(command=[PY, "-c", code], directory=str(d), layout="test-tracked",
                                           quiet=True))
        assert sup.run() == 0
    finally:
        _REGISTRY.pop("test-tracked", None)
    env = json.loads(out.read_text())
    assert env == {"RESUMEKIT_RESUME_FROM": str(d / "step_000000004"), "RESUMEKIT_RESTART_COUNT": "0",
                   "RESUMEKIT_DIR": str(d), "RESUMEKIT_HEARTBEAT": str(d / ".heartbeat"),
                   "RESUMEKIT_EVENTS": str(d / "events.jsonl")}
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
    code = f"import os; open({str(out)!r}, 'w').write(os.environ['RESUMEKIT_RESUME_FROM'])"
    assert Supervisor(SupervisorOptions(command=[PY, "-c", code], directory=str(d), quiet=True)).run() == 0
    assert out.read_text() == str(d / "step_000000004")
    (skip,) = events_of(d, "skip_invalid")
    assert skip["step"] == 8 and "checksum mismatch" in skip["reason"]
    assert Supervisor(SupervisorOptions(command=[PY, "-c", code], directory=str(d), quiet=True,
                                        resume="never")).run() == 0
    assert out.read_text() == ""


# ------------------------------------------------------------------------------------------------ pure logic


@given(restart=st.integers(1, 200), base=st.floats(0, 100), cap=st.floats(0, 1000), jitter=st.floats(0, 1),
       rand=st.floats(0, 1, exclude_max=True))
def test_backoff_is_bounded_by_the_cap_and_the_jitter(restart, base, cap, jitter, rand):
    d = min(cap, base * 2 ** min(restart - 1, 63))
    delay = backoff_delay(restart, base, cap, jitter, rand)
    assert (1 - jitter) * d - 1e-9 <= delay <= d + 1e-9
    assert 0 <= delay <= cap + 1e-9


def test_backoff_doubles_without_jitter():
    assert [backoff_delay(r, 1.0, 10.0, 0.0, 0.7) for r in range(0, 7)] == [0, 1, 2, 4, 8, 10, 10]
    assert backoff_delay(3, 1.0, 60.0, 0.5, 0.999999) == pytest.approx(2.0, rel=1e-5)


def test_exit_codes_and_failures():
    assert exit_code_of(0) == 0 and exit_code_of(3) == 3 and exit_code_of(-9) == 137 and exit_code_of(-15) == 143
    assert not is_failure(0) and not is_failure(0, signal.SIGTERM)
    assert is_failure(1) and is_failure(-9) and is_failure(-15)
    assert not is_failure(-15, signal.SIGTERM) and not is_failure(143, signal.SIGTERM)  # died of the forwarded one
    assert is_failure(-9, signal.SIGTERM) and is_failure(1, signal.SIGTERM)  # grace kill, or a crash while saving


def test_crash_loop_rule():
    # newest valid before/after, step resumed from, last step reported
    assert made_progress(10, 15, 10, None)  # a new checkpoint appeared
    assert made_progress(10, 10, 10, 11)  # trained past the step it resumed from
    assert made_progress(None, 5, None, None)
    assert not made_progress(10, 10, 10, 10) and not made_progress(10, 10, 10, None)
    assert not made_progress(None, None, None, None)
    streak = 0
    for failed, progressed in [(True, True), (True, False), (True, False), (True, False)]:
        streak = next_streak(streak, failed, progressed)
    assert streak == 3 and is_crash_loop(streak, 3) and not is_crash_loop(2, 3)
    assert next_streak(2, failed=False, progressed=False) == 0


def _att(i, resume, last, start, end, rc=-9, **kw):
    return AttemptRecord(index=i, resume_step=resume, last_step=last, start=start, end=end, returncode=rc,
                         failure=rc != 0, **kw)


def test_summary_arithmetic_on_a_known_run():
    attempts = [_att(1, None, 30, 0.0, 10.0, startup_s=1.0),
                _att(2, 20, 55, 11.0, 20.0, backoff_s=0.5, precheck_s=0.25, startup_s=0.75),
                _att(3, 50, 100, 21.0, 32.0, rc=0, backoff_s=0.5, precheck_s=0.25, startup_s=1.0)]
    assert lost_steps_of(attempts) == [10, 5]
    s = summarize(attempts, exit_code=0, outcome="success", wall_s=40.0, save_blocking_s=2.0)
    assert (s.starts, s.restarts, s.failures, s.killed_by_signal, s.lost_steps) == (3, 2, 2, 2, 15)
    assert s.backoff_s == 1.0 and s.startup_s == 1.75 and s.precheck_s == 0.5 and s.restart_s == 3.25
    # 30 + 35 + 50 steps trained in 9 + 8.25 + 10 s of training time: each redone step cost 27.25/115 s
    assert s.redone_s == pytest.approx(15 * 27.25 / 115)
    assert s.effective_ratio == pytest.approx(1 - (3.25 + 15 * 27.25 / 115 + 2.0) / 40.0)
    assert "lost steps 15" in s.format_text()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.none(), st.integers(0, 10**6)), st.one_of(st.none(), st.integers(0, 10**6)),
                          st.floats(0, 1e4), st.floats(0, 1e4), st.integers(-15, 3), st.floats(0, 100)),
                min_size=0, max_size=12),
       st.floats(0, 1e6), st.floats(0, 1e3))
def test_summary_is_always_sane(rows, wall, saves):
    attempts = [_att(i + 1, r, l, a, a + dur, rc=rc, backoff_s=b) for i, (r, l, a, dur, rc, b) in enumerate(rows)]
    s = summarize(attempts, exit_code=0, outcome="x", wall_s=wall, save_blocking_s=saves)
    assert 0.0 <= s.effective_ratio <= 1.0
    assert s.lost_steps >= 0 and s.restarts == max(0, len(attempts) - 1)
    assert s.failures == sum(a.returncode != 0 for a in attempts)
    json.dumps(s.as_dict())


def test_parse_size():
    assert parse_size("1024") == 1024 and parse_size("2K") == 2048 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("10GB") == 10 * 10**9 and parse_size("500M") == 500 * 2**20 and parse_size("1 TiB") == 2**40
    for bad in ("", "ten", "5Q", "1.2.3G", "-1G", "5i"):
        with pytest.raises(ConfigError, match="cannot read size"):
            parse_size(bad)


@pytest.mark.parametrize("kwargs, field", [
    ({"command": []}, "command"), ({"command": "python x.py"}, "command"), ({"max_restarts": -1}, "max_restarts"),
    ({"crash_loop": 0}, "crash_loop"), ({"hang_timeout": 0}, "hang_timeout"), ({"grace": -1}, "grace"),
    ({"jitter": 2}, "jitter"), ({"backoff": 5, "backoff_max": 1}, "backoff_max"), ({"layout": "nope"}, "layout"),
    ({"min_free": -5}, "min_free"), ({"gpus": 1.5}, "gpus"),
])
def test_options_are_validated_with_the_field_named(kwargs, field):
    kw = {"command": ["true"], **kwargs}
    with pytest.raises(ConfigError, match=field if field != "layout" else "unknown layout 'nope'"):
        SupervisorOptions(**kw)


def test_quarantine_renames_never_deletes_and_native_discovery_ignores_it(tmp_path):
    from resumekit.layouts import NativeLayout
    from resumekit.storage import open_storage

    ckptjob.save_checkpoint(str(tmp_path), {"step": 5, "w": 0.0, "b": 0.0, "h": 0})
    ckptjob.save_checkpoint(str(tmp_path), {"step": 10, "w": 0.0, "b": 0.0, "h": 0})
    storage = open_storage(str(tmp_path))
    lay = NativeLayout()
    best, _ = lay.latest(storage)
    new = quarantine(storage, best, now=0)
    again = quarantine(storage, lay.latest(storage)[0], now=0)
    assert new.startswith("quarantined-step_000000010-") and again.startswith("quarantined-step_000000005-")
    assert (tmp_path / new / "manifest.json").is_file() and (tmp_path / again / "state.json").is_file()
    assert lay.latest(storage) == (None, [])


@pytest.mark.parametrize("with_psutil", [True, False])
def test_descendants_found_with_and_without_psutil(monkeypatch, with_psutil):
    if not with_psutil:
        monkeypatch.setitem(sys.modules, "psutil", None)
    p = subprocess.Popen([PY, "-c", "import subprocess, sys, time; "
                                    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
                                    "start_new_session=True); print(c.pid, flush=True); time.sleep(60)"],
                         stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        grandchild = int(p.stdout.readline())
        assert descendants(p.pid) == [grandchild]
    finally:
        for pid in (grandchild, p.pid):
            os.kill(pid, signal.SIGKILL)
        p.wait()


def test_supervisor_imports_no_torch(tmp_path):
    code = "import resumekit.supervisor, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # Nor does a whole supervised run (layouts, storage, events are loaded on the way).
    code = ("import sys; from resumekit.supervisor import Supervisor, SupervisorOptions; "
            f"code = Supervisor(SupervisorOptions(command=[sys.executable, '-c', 'pass'], directory={str(tmp_path)!r}, "
            "quiet=True)).run(); assert code == 0; assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
