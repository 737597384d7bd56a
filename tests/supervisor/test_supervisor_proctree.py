"""``resumekit.supervisor.proctree``: process trees through psutil."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from supervisor_jobs import PY

from resumekit.supervisor import descendants
from resumekit.supervisor.proctree import kill_tree, pid_alive, reap, send_signal, set_subreaper, signal_name

# A parent that starts a child in a new session (it leaves the parent's process group, as helpers that call
# setsid do), prints the child's pid and sleeps.
_PARENT_OF_DETACHED = (
    "import subprocess, sys, time; "
    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "start_new_session=True); print(c.pid, flush=True); time.sleep(60)"
)


def test_descendants_find_a_detached_grandchild():
    # psutil is a hard dependency now: the /proc fallback this test also ran without psutil is gone.
    p = subprocess.Popen([PY, "-c", _PARENT_OF_DETACHED], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        grandchild = int(p.stdout.readline())
        assert descendants(p.pid) == [grandchild]
    finally:
        for pid in (grandchild, p.pid):
            os.kill(pid, signal.SIGKILL)
        p.wait()


def test_kill_tree_kills_the_group_and_a_detached_grandchild_and_keeps_the_exit_status():
    p = subprocess.Popen([PY, "-c", _PARENT_OF_DETACHED], stdout=subprocess.PIPE, text=True, start_new_session=True)
    grandchild = int(p.stdout.readline())
    try:
        assert kill_tree(p.pid, timeout=10) == [p.pid, grandchild]
        assert not pid_alive(grandchild)
        # kill_tree never reaps the root: the Popen that owns it still gets its real exit status.
        assert p.wait(timeout=10) == -signal.SIGKILL
    finally:
        for pid in (grandchild, p.pid):
            send_signal(pid, signal.SIGKILL)
        p.wait()


def test_a_zombie_counts_as_dead_and_reap_collects_it():
    p = subprocess.Popen([PY, "-c", "pass"])
    deadline = time.monotonic() + 30
    while pid_alive(p.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not pid_alive(p.pid)  # exited, not yet waited for: a zombie
    reap([p.pid])
    with pytest.raises(ChildProcessError):
        os.waitpid(p.pid, os.WNOHANG)
    assert not pid_alive(p.pid)


def test_signals_to_gone_processes_and_signal_names():
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    assert send_signal(p.pid, 0) is False
    assert send_signal(os.getpid(), 0) is True
    assert pid_alive(os.getpid())
    assert signal_name(signal.SIGKILL) == "SIGKILL" and signal_name(99) == "signal 99"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux only")
def test_subreaper_can_be_switched_on_and_off():
    assert set_subreaper(True) is True
    assert set_subreaper(False) is True
