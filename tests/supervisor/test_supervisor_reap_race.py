"""A child that :func:`~resumekit.supervisor.proctree.wait_gone` sees as a zombie is reaped before it returns, even
when it cannot be collected yet (issue 17: such a zombie, a killed rank, kept an object-store root's writer lease
"held" by its pid, and every restart of the job failed with ``LeaseHeldError``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from resumekit.supervisor import proctree

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc")


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _wait_state(pid: int, want: str) -> None:
    deadline = time.monotonic() + 30
    while _state(pid) != want:
        assert time.monotonic() < deadline, _state(pid)
        time.sleep(0.01)


def test_wait_gone_reaps_a_child_that_exited_after_the_reap(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    _wait_state(child.pid, "Z")  # exited, not reaped (nobody waited)
    # The exit lands "after" the first reap: the first reap finds nothing to collect.
    calls = []
    real = proctree.reap
    monkeypatch.setattr(proctree, "reap", lambda pids: calls.append(list(pids)) if not calls else real(pids))
    assert proctree.wait_gone([child.pid], timeout=2.0) == []
    assert _state(child.pid) is None  # reaped: no zombie left
    child.returncode = 0  # its status went to wait_gone; Popen must not wait for it again


def test_wait_gone_waits_for_a_zombie_leader_whose_threads_still_exit():
    # The main thread ends (the leader shows as a zombie at once); another thread ends the process 1 s later: until
    # then waitpid cannot collect it. A killed multi-threaded rank goes through the same state.
    code = (
        "import ctypes, os, threading, time\n"
        "threading.Thread(target=lambda: (time.sleep(1.0), os._exit(0))).start()\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    _wait_state(child.pid, "Z")
    assert not proctree.pid_alive(child.pid)
    assert proctree.wait_gone([child.pid], timeout=10.0) == []
    assert _state(child.pid) is None  # reaped once collectable, not left a zombie
    child.returncode = 0
