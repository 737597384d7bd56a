"""Issue 12 beyond the attack corpus: the heartbeat during long saves, signals and exit codes, the restart budget,
the event log's cost, and what the CLI says when nothing is valid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import REPO, make_training
from resumekit import CheckpointManager
from resumekit.cli import main
from resumekit.events import EventLog, Heartbeat, note_progress
from resumekit.format import step_dirname
from resumekit.supervisor.decisions import preempted_exit_code, resets_budget
from resumekit.supervisor.monitor import catches_signal, dump_stacks

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "supervisor"))
from supervisor_jobs import PY, Procs, events_of, finish, read_beat, summary_of


@pytest.fixture
def sup():
    """Starts ``resumekit run``; everything it started is killed after the test."""
    p = Procs()
    yield p
    p.cleanup()


ENV = {"PYTHONPATH": os.path.join(REPO, "src") + os.pathsep + os.path.join(REPO, "tests")}


# -- the heartbeat while a save blocks (point 6) -------------------------------------------------------------------

SLOW_SAVE_JOB = """
import threading
stop = threading.Event()
def chatter():  # output while torch imports, before the first heartbeat: the job is alive
    while not stop.wait(0.2):
        print("starting", flush=True)
threading.Thread(target=chatter, daemon=True).start()
import os, time
handoff = dict(os.environ)
from conftest import make_training, train_steps  # it clears the supervisor's variables: put them back
os.environ.update(handoff)
from resumekit import CheckpointManager
st = make_training()
mgr = CheckpointManager(os.environ["RESUMEKIT_DIR"], every_steps=3, heartbeat_interval=0.1)
start = mgr.restore(st)
for step in range(start + 1, 5):
    train_steps(st, step, None, start=step - 1)
    mgr.maybe_save(step, st)  # step 3: a synchronous save that pauses between its files, far past --hang-timeout
    stop.set()
mgr.close()
"""


@pytest.mark.timeout(120)
def test_a_sync_save_longer_than_the_hang_timeout_completes_under_resumekit_run(tmp_path, sup):
    d = tmp_path / "ckpt"
    env = dict(ENV, RESUMEKIT_TEST_SAVE_PAUSE="2.5")  # two pauses: the save blocks for 5 s
    args = ("--hang-timeout", "2", "--max-restarts", "0", "--json")
    p = sup.run(d, *args, command=[PY, "-c", SLOW_SAVE_JOB], env=env)
    rc, out, err = finish(p, timeout=100)
    assert rc == 0, err[-3000:]
    s = summary_of(out)
    assert s["hangs"] == 0 and s["starts"] == 1, s
    (save,) = [e for e in events_of(d, "save") if e.get("step") == 3]
    assert save["blocking_s"] > 2 * 2
    assert (d / step_dirname(3)).is_dir()


def test_the_ticker_beats_while_bytes_move_and_stops_after_the_stall_limit(tmp_path):
    path = tmp_path / ".heartbeat"
    hb = Heartbeat(str(path), interval=0.05)
    hb.beat(7, force=True)
    with hb.ticking("save", stall=1.0):
        for _ in range(8):  # a save making progress: beats throughout
            time.sleep(0.1)
            note_progress(1 << 20)
        assert time.time() - path.stat().st_mtime < 0.8
        doc = json.loads(path.read_text())
        assert doc["step"] == 7 and doc["busy"] == "save"
        time.sleep(2.5)  # stuck (no bytes for longer than the stall limit): the heartbeat goes stale
        assert time.time() - path.stat().st_mtime > 0.9


# -- signals and exit codes (point 7) ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_exit_status_after_a_forwarded_signal_is_128_plus_it_with_the_save_done(tmp_path, sup, sig, code):
    d = tmp_path / "ckpt"
    p = sup.run(d, "--grace", "10", "--json", job=["--steps", "100000", "--save-every", "1000", "--step-time", "0.01"])
    t_end = time.monotonic() + 30
    while (read_beat(d).get("step") or 0) < 5 and time.monotonic() < t_end:
        time.sleep(0.01)
    p.send_signal(sig)
    rc, out, err = finish(p)
    assert rc == code, err[-2000:]
    (pre,) = events_of(d, "preempted")
    assert [e["step"] for e in events_of(d, "save")] == [pre["step"]]  # the job saved where it stopped
    assert summary_of(out)["outcome"] == "preempted"


def test_preempted_exit_code_rule():
    assert preempted_exit_code(signal.SIGINT, 0, signal.SIGTERM) == 130
    assert preempted_exit_code(signal.SIGTERM, -signal.SIGTERM, signal.SIGTERM) == 143  # died of it: as asked
    assert preempted_exit_code(signal.SIGTERM, 0, signal.SIGTERM, override=0) == 0
    assert preempted_exit_code(signal.SIGTERM, 1, signal.SIGTERM) == 1  # failed on the way out: its own status
    assert preempted_exit_code(signal.SIGTERM, -signal.SIGKILL, signal.SIGTERM) == 137


def test_stack_dumps_chain_to_the_handler_already_there_and_are_announced(tmp_path, monkeypatch, capfd):
    seen = []
    before = signal.signal(signal.SIGUSR2, lambda *a: seen.append(1))  # e.g. SLURM's requeue, Lightning's
    try:
        monkeypatch.setenv("RESUMEKIT_HEARTBEAT", str(tmp_path / ".heartbeat"))
        mgr = CheckpointManager(str(tmp_path / "ck"), dump_signal="SIGUSR2")
        mgr.maybe_save(1, {"epoch": 1})
        assert json.loads((tmp_path / ".heartbeat").read_text())["dump_signal"] == signal.SIGUSR2
        assert catches_signal(os.getpid(), signal.SIGUSR2) is True
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.2)
        assert seen == [1]  # the previous handler still runs
        assert "most recent call first" in capfd.readouterr().err  # and every thread's stack was printed
        mgr.close()
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.1)
        assert seen == [1, 1]
    finally:
        signal.signal(signal.SIGUSR2, before)


@pytest.mark.timeout(30)
def test_no_stack_dump_signal_for_a_job_without_a_handler(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # as without py-spy
    p = subprocess.Popen([PY, "-c", "import time; print('up', flush=True); time.sleep(30)"], stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        assert catches_signal(p.pid, signal.SIGUSR1) is False
        path, how = dump_stacks(p.pid, [p.pid], out_path=str(tmp_path / "d"), settle_s=0.1, say=print, signum=10)
        assert path is None and how.startswith("none (the job registered no stack-dump handler")
        time.sleep(0.2)
        assert p.poll() is None  # SIGUSR1 would have killed it (exit 138)
    finally:
        p.kill()
        p.wait()


# -- the restart budget after progress (point 7) -------------------------------------------------------------------

PROGRESS_JOB = """
import os, sys
from resumekit.events import EventLog
n = int(os.environ["RESUMEKIT_RESTART_COUNT"])
log = EventLog.for_dir(os.environ["RESUMEKIT_DIR"])
log.emit("restore", step=10 * n, path=None)
log.emit("metrics", step=10 * n + 5)  # got somewhere every time
sys.exit(0 if n == 3 else 3)
"""


def test_resets_budget_rule():
    assert resets_budget(True, 700.0, 600.0) and not resets_budget(True, 10.0, 600.0)
    assert not resets_budget(False, 7000.0, 600.0)


@pytest.mark.timeout(60)
def test_backoff_and_budget_reset_after_a_window_of_progress(tmp_path, sup):
    args = ("--max-restarts", "1", "--backoff", "0.05", "--crash-loop", "10", "--json")
    p = sup.run(tmp_path / "a", *args, "--reset-after", "0", command=[PY, "-c", PROGRESS_JOB], env=ENV)
    rc, out, err = finish(p)
    assert rc == 0, err[-2000:]
    assert summary_of(out)["starts"] == 4 and len(events_of(tmp_path / "a", "budget_reset")) == 2
    delays = [e["delay_s"] for e in events_of(tmp_path / "a", "restart")]
    assert max(delays) <= 0.05  # the first restart's delay every time, never doubled
    p = sup.run(tmp_path / "b", *args, "--reset-after", "1000", command=[PY, "-c", PROGRESS_JOB], env=ENV)
    rc, out, err = finish(p)
    assert rc == 3 and summary_of(out)["starts"] == 2  # without the window: the budget of one restart runs out


# -- the event log (point 8) ---------------------------------------------------------------------------------------


def test_the_event_log_keeps_one_descriptor(tmp_path, monkeypatch):
    opened = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (opened.append(p), real(p, *a, **k))[1])
    log = EventLog(str(tmp_path / "events.jsonl"))
    for i in range(50):
        log.emit("metrics", step=i)
    log.close()
    assert opened == [str(tmp_path / "events.jsonl")]
    assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 50


def test_metrics_are_rate_limited_by_time(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "a"), metrics_interval=3600)
    for s in range(1, 11):
        mgr.maybe_save(s, {"epoch": s}, metrics={"loss": 1.0 / s})
    mgr.close()
    assert [e["step"] for e in map(json.loads, open(tmp_path / "a" / "events.jsonl")) if e["event"] == "metrics"] == [1]
    mgr = CheckpointManager(str(tmp_path / "b"), metrics_interval=0)
    for s in range(1, 11):
        mgr.maybe_save(s, {"epoch": s}, metrics={"loss": 1.0 / s})
    mgr.close()
    assert sum(e["event"] == "metrics" for e in map(json.loads, open(tmp_path / "b" / "events.jsonl"))) == 10


# -- the CLI ---------------------------------------------------------------------------------------------------------


def test_latest_says_whether_nothing_was_found_or_everything_was_invalid(tmp_path):
    r = CliRunner().invoke(main, ["latest", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr.strip().endswith("none found")
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(3, {"epoch": 1})
    mgr.close()
    os.remove(tmp_path / step_dirname(3) / "state.json")
    r = CliRunner().invoke(main, ["latest", str(tmp_path)])
    assert r.exit_code == 1 and r.stderr.strip().endswith("1 found, all invalid")


def test_read_only_manager_never_saves(tmp_path):
    mgr = CheckpointManager(str(tmp_path), read_only=True)
    assert mgr.restore(make_training()) == 0
    with pytest.raises(Exception, match="read_only=True"):
        mgr.save(1, {"epoch": 0})
    mgr.close()
    assert not os.path.exists(tmp_path / ".resumekit-lease")
