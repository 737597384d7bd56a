"""``resumekit.supervisor.monitor``: hangs, preemption, the grace period and leftovers, with real processes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from supervisor_jobs import (
    PY,
    ckptjob,
    events_of,
    final_state,
    finish,
    procs,  # noqa: F401 - a fixture, used as an argument
    read_beat,
    summary_of,
)

from resumekit.supervisor import pid_alive


@pytest.mark.timeout(60)
def test_hung_job_is_dumped_killed_with_its_detached_child_and_restarted(tmp_path, procs):
    d = tmp_path / "ckpt"
    timeout = 1.5
    p = procs.run(
        d,
        "--hang-timeout",
        str(timeout),
        "--backoff",
        "0.05",
        "--json",
        job=["--steps", "30", "--save-every", "5", "--step-time", "0.01", "--hang-at", "12"],
    )
    rc, out, err = finish(p)
    assert rc == 0, err
    child = int((d / ckptjob.CHILD_PIDFILE).read_text())
    assert not pid_alive(child), "the hung job's detached child survived"
    (hang,) = events_of(d, "hang")
    assert hang["step"] == 12
    assert timeout < hang["heartbeat_age_s"] <= timeout + 2
    kill = next(e for e in events_of(d, "kill") if e["reason"] == "hang")
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
    # Issue 12: a forwarded SIGTERM now ends `resumekit run` with 143 by default; this test is about the save.
    p = procs.run(d, "--grace", "5", "--preempt-exit-code", "0", "--json", job=job)
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
    rc, out, _err = finish(p)
    assert rc == 128 + signal.SIGKILL
    assert 0.5 <= time.monotonic() - t0 < 4
    assert [e["reason"] for e in events_of(d, "kill")] == ["grace period expired"]
    assert len(events_of(d, "start")) == 1
    assert summary_of(out)["outcome"] == "preempted"


@pytest.mark.timeout(30)
def test_leftover_processes_of_a_finished_job_are_killed(tmp_path, procs):
    d = tmp_path / "ckpt"
    pidfile = tmp_path / "bg.pid"
    script = (
        f"import subprocess, sys; "
        f"a = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"b = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        f"open({str(pidfile)!r}, 'w').write(f'{{a.pid}} {{b.pid}}')"
    )
    p = procs.run(d, command=[PY, "-c", script])
    rc, _out, err = finish(p)
    assert rc == 0, err
    pids = [int(x) for x in pidfile.read_text().split()]
    assert not any(pid_alive(x) for x in pids), "a process the job left behind survived"
    (ev,) = events_of(d, "cleanup")
    assert set(pids) <= set(ev["pids"]) | {pids[0]}  # the in-group one may go with the process group kill


@pytest.mark.timeout(30)
def test_a_job_that_never_beats_is_never_hung_and_sigterm_during_backoff_stops(tmp_path, procs):
    d = tmp_path / "ckpt"
    # Issue 11: a job without a heartbeat is watched through its output (it was never judged hung): this one
    # writes a line every 0.1 s, so it is alive.
    busy = "import time\nfor _ in range(10):\n    print('working', flush=True); time.sleep(0.1)"
    p = procs.run(d, "--hang-timeout", "0.3", "--json", command=[PY, "-c", busy])
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
