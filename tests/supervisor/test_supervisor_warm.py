"""``resumekit.supervisor.standby``: warm restart with real processes: a warm attempt is indistinguishable from a
cold one, exit codes and tracebacks propagate, a standby never outlives the supervisor, and a standby that cannot
start gives way to a cold start."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resumekit.events import read_events
from resumekit.supervisor import SupervisorOptions
from resumekit.supervisor.proctree import kill_tree, pid_alive
from resumekit.supervisor.standby import console_script_entry, env_change, parse_python_command, warm_entry

PY = sys.executable
JOBS = Path(__file__).resolve().parent.parent / "jobs"
PROBE_FILES = ("warmprobe.py", "warmprobe_mod.py", "warmprobe_noise.py")


def _events(d: Path, name: str | None = None) -> list[dict]:
    return [e for e in read_events(str(d / "events.jsonl")) if name is None or e.get("event") == name]


def _supervise(cwd: Path, d: Path, *args: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
    cmd = [PY, "-m", "resumekit", "run", "--dir", str(d), "--backoff", "0.05", "--json", *args, "--", *command]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=dict(os.environ, **(env or {})),
    )


@pytest.fixture
def sups():
    started: list[subprocess.Popen] = []
    dirs: list[Path] = []
    yield started, dirs
    for p in started:
        if p.poll() is None:
            kill_tree(p.pid)
            p.wait()
    for d in dirs:  # jobs and standbys are in sessions of their own
        for e in _events(d) if (d / "events.jsonl").exists() else []:
            if e.get("event") in ("start", "warm_standby") and isinstance(e.get("pid"), int):
                try:
                    os.killpg(e["pid"], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _probe_tree(tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    for name in PROBE_FILES:
        shutil.copy(JOBS / name, code / name)
    return code


#: starts slowly, beats, waits until the standby behind it is ready or failed, fails once, then succeeds
FAIL_ONCE = """
import json, os, sys, time
hb, n = os.environ["RESUMEKIT_HEARTBEAT"], int(os.environ["RESUMEKIT_RESTART_COUNT"])
time.sleep(1.2)  # a start-up worth a standby (see standby_worthwhile)
open(hb, "w").write(json.dumps({"step": n + 1, "pid": os.getpid()}))
deadline = time.time() + 60
while n == 0 and time.time() < deadline and '"status": "failed"' not in open(os.environ["RESUMEKIT_EVENTS"]).read():
    time.sleep(0.05)
sys.exit(3 if n == 0 else 0)
"""


def _tracebacks(err: str) -> list[str]:
    return re.findall(r"Traceback \(most recent call last\):\n(?:  .*\n)+\S.*", err)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["script", "module"])
def test_a_warm_attempt_is_indistinguishable_from_a_cold_one(tmp_path, sups, mode):
    code = _probe_tree(tmp_path)
    d, out = tmp_path / "ckpt", tmp_path / "probe.jsonl"
    if mode == "script":  # started from elsewhere, through a relative path, with interpreter flags
        cwd, command = tmp_path, [PY, "-u", "-X", "dev", "code/warmprobe.py", "--arg", "1"]
    else:
        cwd, command = code, [PY, "-m", "warmprobe", "--arg", "1"]
    preload = ["--preload", "warmprobe_mod", "--preload", "warmprobe_noise", "--preload", "not_installed_xyz"]
    last = 2 if mode == "script" else 1  # a chain of two warm attempts once
    env = {"WARMPROBE_OUT": str(out), "WARMPROBE_X": "x", "WARMPROBE_LAST": str(last)}
    p = _supervise(cwd, d, *preload, command=command, env=env)
    sups[0].append(p)
    sups[1].append(d)
    _, err = p.communicate(timeout=150)
    assert p.returncode == 0, err[-3000:]
    starts = _events(d, "start")
    assert [s["warm"] for s in starts] == [False] + [True] * last, err[-3000:]
    assert [e["returncode"] for e in _events(d, "exit")] == [1] * last + [0]
    standbys = {e["pid"] for e in _events(d, "warm_standby")}
    assert not [pid for pid in standbys if pid_alive(pid)]  # the one behind the last attempt went with the run
    ready = [e for e in _events(d, "warm_standby") if e["status"] == "ready"]
    assert ready and ready[0]["skipped"] == ["not_installed_xyz"] and "warmprobe_noise" in ready[0]["loaded"]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    main = [r for r in recs if "name" in r]
    assert [r["attempt"] for r in main] == list(range(last + 1))
    cold, warm = main[0], main[1:]
    for r in warm:
        diff = {k: (cold[k], r[k]) for k in cold if k != "attempt" and cold[k] != r[k]}
        assert diff == {}, diff
    assert cold["name"] == "__main__" and cold["main_is_me"] and not cold["random_leaked"]
    assert not cold["numpy_leaked"] and cold["torch_fresh"] and cold["mod_seen"]["x"] == "x"
    assert "WARMPROBE_LEAK" not in cold["env"] and "--leak" not in cold["argv"]
    # The non-daemon thread and the atexit hook ran after the uncaught exception, cold and warm alike.
    ends = sorted((r["attempt"], "thread" in r) for r in recs if "name" not in r)
    assert ends == [(i, t) for i in range(last + 1) for t in (False, True)]
    tbs = _tracebacks(err)
    assert len(tbs) == last and len(set(tbs)) == 1 and "ValueError: probe failure" in tbs[0], err[-3000:]
    assert "<string>" not in tbs[-1]
    assert "warm restart on" in err and ", warm)" in err


@pytest.mark.timeout(120)
def test_a_standby_never_outlives_the_supervisor(tmp_path, sups):
    job = tmp_path / "sleeper.py"
    job.write_text(
        "import json, os, time\n"
        "hb = os.environ['RESUMEKIT_HEARTBEAT']\n"
        "time.sleep(1.2)\n"
        "open(hb, 'w').write(json.dumps({'step': 1, 'pid': os.getpid()}))\n"
        "time.sleep(120)\n"
    )
    # The worst case: SIGKILL, so no finally runs (a normal end is checked by the test above).
    d = tmp_path / "ckpt"
    p = _supervise(tmp_path, d, command=[PY, str(job)])
    sups[0].append(p)
    sups[1].append(d)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and p.poll() is None:
        evs = _events(d, "warm_standby") if (d / "events.jsonl").exists() else []
        if evs and evs[-1]["status"] != "spawned":
            break
        time.sleep(0.05)
    standby = next(e for e in _events(d, "warm_standby") if e["status"] == "ready")["pid"]
    job_pid = _events(d, "start")[0]["pid"]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.monotonic() + 10
    while pid_alive(standby) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(standby), "the standby survived a SIGKILL of its supervisor"
    assert pid_alive(job_pid)  # the job itself is left as a fresh start would be (the test cleans it up)
    kill_tree(job_pid)


@pytest.mark.timeout(120)
def test_a_standby_that_cannot_import_gives_way_to_a_cold_start(tmp_path, sups):
    (tmp_path / "warmprobe_broken.py").write_text("raise RuntimeError('broken at import')\n")
    (tmp_path / "job.py").write_text(FAIL_ONCE)
    d = tmp_path / "ckpt"
    p = _supervise(tmp_path, d, "--preload", "warmprobe_broken", command=[PY, "job.py"])
    sups[0].append(p)
    sups[1].append(d)
    _, err = p.communicate(timeout=110)
    assert p.returncode == 0, err[-3000:]
    assert [s["warm"] for s in _events(d, "start")] == [False, False]
    failed = [e for e in _events(d, "warm_standby") if e["status"] == "failed"]
    assert len(failed) == 1 and "RuntimeError: broken at import" in failed[0]["reason"]
    assert err.count("warm restart off:") == 1


@pytest.mark.timeout(60)
def test_no_warm_and_other_commands_start_cold(tmp_path, sups):
    d = tmp_path / "ckpt"
    p = _supervise(tmp_path, d, "--no-warm", command=[PY, "-c", "pass"])
    sups[0].append(p)
    sups[1].append(d)
    _, err = p.communicate(timeout=50)
    assert p.returncode == 0 and "warm restart off (--no-warm)" in err
    assert _events(d, "supervisor_start")[0]["warm"] is False and not _events(d, "warm_standby")


def test_which_commands_run_warm(tmp_path):
    e, why = parse_python_command(["python3", "-u", "-X", "dev", "-Wignore", "train.py", "--lr", "1"])
    assert e is not None and e.mode == "script" and e.interpreter == ("python3", "-u", "-X", "dev", "-Wignore")
    assert e.args == ("--lr", "1") and e.target == "train.py"
    spec = e.spec(str(tmp_path))
    assert spec["argv"] == ["train.py", "--lr", "1"] and spec["target"] == str(tmp_path / "train.py")
    e, _ = parse_python_command(["/usr/bin/python3.11", "-m", "pkg.train", "x"])
    assert (
        e is not None and e.mode == "module" and e.spec("/w")["argv"] == ["-m", "x"] and e.spec("/w")["path0"] == "/w"
    )
    for cmd, reason in [
        (["python", "-c", "pass"], "interpreter option -c"),
        (["python", "-I", "t.py"], "interpreter option -I"),
        (["python", "-"], "interpreter option -"),
        (["python"], "no script"),
        (["bash", "run.sh"], "not a Python interpreter"),
    ]:
        e, why = parse_python_command(cmd)
        assert e is None and reason in why, (cmd, why)
    script = tmp_path / "launcher"
    script.write_text(f"#!{PY}\nimport sys\n")
    script.chmod(0o755)
    e, _ = console_script_entry(["launcher", "--n", "2"], str(tmp_path))
    assert e is not None and e.interpreter == (PY,) and e.target == str(script) and e.args == ("--n", "2")
    assert e.orig_argv == (PY, str(script), "--n", "2")
    script.write_text("#!/usr/bin/env python3\n")
    assert console_script_entry(["launcher"], str(tmp_path))[0] is None
    e, why = warm_entry(["launcher"], str(tmp_path))
    assert e is None and "not a Python interpreter" in why
    torchrun = shutil.which("torchrun", path=os.path.dirname(PY))
    if torchrun:
        e, _ = warm_entry(["torchrun", "--nproc-per-node", "2", "t.py"], os.path.dirname(PY))
        assert e is not None and "workers start cold" in e.note
    e, _ = parse_python_command(["python", "-m", "torch.distributed.run", "--nproc-per-node", "2", "t.py"])
    assert e is not None and "workers start cold" in e.note


def test_only_the_restart_hand_off_may_change_between_a_standby_and_its_attempt():
    assert env_change({"A": "1", "RESUMEKIT_X": "1"}, {"A": "1", "RESUMEKIT_X": "2", "RESUMEKIT_Y": "3"}) == []
    assert env_change({"A": "1", "B": "2"}, {"A": "2", "C": "3"}) == ["A", "B", "C"]


@pytest.mark.parametrize(
    "kw,field",
    [
        ({"preload": "transformers"}, "preload"),
        ({"preload": ["bad name"]}, "preload"),
        ({"warm": 1}, "warm"),
        ({"warm_delay": -1}, "warm_delay"),
        ({"progress_jitter": 61}, "progress_jitter"),
    ],
)
def test_warm_options_are_checked(kw, field):
    from resumekit.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        SupervisorOptions(command=["python", "t.py"], **kw)
    assert SupervisorOptions(command=["python", "t.py"], preload=["a.b", "a.b", "c"]).preload == ["a.b", "c"]


@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.environ.get("RESUMEKIT_SOAK"), reason="soak (~1.5 min on 2 cores): set RESUMEKIT_SOAK=1")
def test_torchrun_2_ranks_killed_whole_tree_resume_bitwise_with_a_warm_agent(tmp_path, sups):
    """`resumekit run -- python -m torch.distributed.run` (gloo, 2 ranks): the whole tree SIGKILLed twice, the
    restarts' agents run warm (their workers start cold), the end is bitwise the straight run's."""
    torch = pytest.importorskip("torch")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from resumekit.demo.distributed import batch_sequences, compare_final, torchrun_cmd, torchrun_env

    job = str(JOBS / "dist_train.py")
    steps, every = 60, 1  # a save every step, each paused 0.3 s (killed run only): attempts outlast a standby's start
    env = torchrun_env()
    for k in ("RESUMEKIT_RESUME_FROM", "RESUMEKIT_HEARTBEAT", "RESUMEKIT_EVENTS", "RESUMEKIT_DIR"):
        env.pop(k, None)
    straight = tmp_path / "straight"
    straight.mkdir()
    args = ["--parallel", "ddp", "--steps", str(steps), "--every", str(every)]
    r = subprocess.run(
        torchrun_cmd(2, [job, "--dir", str(straight), *args]),
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        start_new_session=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "killed"
    p = subprocess.Popen(
        [PY, "-m", "resumekit", "run", "--dir", str(d), "--backoff", "0.05", "--json", "--"]
        + torchrun_cmd(2, [job, "--dir", str(d), *args]),
        env=dict(env, RESUMEKIT_TEST_SAVE_PAUSE="0.3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    sups[0].append(p)
    sups[1].append(d)
    kills = 0
    deadline = time.monotonic() + 200
    while kills < 2 and p.poll() is None and time.monotonic() < deadline:
        starts = _events(d, "start") if (d / "events.jsonl").exists() else []
        if len(starts) != kills + 1:
            time.sleep(0.05)
            continue
        agent = starts[-1]["pid"]
        # Kill once both ranks of this attempt trained past their resume point and its standby is ready (so the
        # restart's agent is warm).
        ready = [e for e in _events(d, "warm_standby") if e["status"] in ("ready", "failed")]
        if len(ready) > kills and _steps_since(d, agent) >= 2:
            kill_tree(agent)
            kills += 1
        time.sleep(0.05)
    _, err = p.communicate(timeout=max(10, deadline - time.monotonic()))
    assert p.returncode == 0, err[-4000:]
    assert kills == 2
    starts = _events(d, "start")
    assert [s["warm"] for s in starts] == [False, True, True], err[-4000:]
    assert "its workers start cold" in err and starts[1]["warm_wait_s"] is not None
    assert compare_final(str(straight), str(d), steps) == []
    assert batch_sequences(str(d), key="idx") == batch_sequences(str(straight), key="idx")


def _steps_since(d: Path, agent: int) -> int:
    """Steps every rank reported in the attempt whose torchrun agent is ``agent`` (its workers are its children)."""
    counts = []
    for f in d.glob("progress_rank*.jsonl"):
        n = 0
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if _parent(rec.get("pid")) == agent:
                n += 1
        counts.append(n)
    return min(counts) if len(counts) == 2 else 0


def _parent(pid: object) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
