"""Shared helpers of the supervisor tests: start ``resumekit run`` on tests/jobs/ckptjob.py and read what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from resumekit.events import read_events

JOBS = Path(__file__).resolve().parent.parent / "jobs"
JOB = str(JOBS / "ckptjob.py")
PY = sys.executable
sys.path.insert(0, str(JOBS))
import ckptjob  # noqa: E402


class Procs:
    """Starts ``resumekit run`` in its own session and makes sure nothing it started survives the test."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []
        self.dirs: list[Path] = []

    def run(
        self,
        directory: Path,
        *args: str,
        job: list[str] | None = None,
        env: dict | None = None,
        command: list[str] | None = None,
    ) -> subprocess.Popen:
        self.dirs.append(directory)
        cmd = [PY, "-m", "resumekit", "run", "--dir", str(directory), *args, "--"]
        cmd += command if command is not None else [PY, JOB, *(job or [])]
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=dict(os.environ, **(env or {})),
        )
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
    """A :class:`Procs` whose processes are all killed after the test (import it into the test module: a second
    conftest.py would shadow tests/conftest.py, which other tests import by name)."""
    p = Procs()
    yield p
    p.cleanup()


def events_of(directory: Path, name: str | None = None) -> list[dict[str, Any]]:
    evs = read_events(str(directory / "events.jsonl"))
    return [e for e in evs if name is None or e.get("event") == name]


def final_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / ckptjob.FINAL_FILE).read_text())


def read_beat(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / ".heartbeat").read_text())
    except (OSError, ValueError):
        return {}


def finish(p: subprocess.Popen, timeout: float = 60) -> tuple:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def summary_of(out: str) -> dict[str, Any]:
    return json.loads(out.strip().splitlines()[-1])


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, "-m", "resumekit", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


__all__ = [
    "JOB",
    "JOBS",
    "PY",
    "Procs",
    "ckptjob",
    "events_of",
    "final_state",
    "finish",
    "procs",
    "read_beat",
    "run_cli",
    "summary_of",
]
