"""What sits on a save's path: retention runs after the commit on its own thread (gc.RetentionWorker), so a slow
deletion never delays the next save; and the scaling and step-overhead benchmarks' small modes run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from resumekit import CheckpointManager
from resumekit.events import read_events
from resumekit.storage.local import LocalStorage

SLOW = 2.0  # seconds one deletion takes below


@pytest.fixture
def slow_delete(monkeypatch):
    real = LocalStorage.remove_tree
    started, finished = threading.Event(), threading.Event()

    def remove_tree(self, rel):
        started.set()
        time.sleep(SLOW)  # a large file on a slow or network file system
        real(self, rel)
        finished.set()

    monkeypatch.setattr(LocalStorage, "remove_tree", remove_tree)
    return started, finished


@pytest.mark.parametrize("async_save", [False, True])
def test_a_slow_deletion_does_not_delay_the_next_save(tmp_path, slow_delete, async_save):
    d = str(tmp_path)
    state = {"w": torch.randn(1000)}
    mgr = CheckpointManager(d, keep_last=1, async_save=async_save, handle_sigterm=False)
    mgr.save(1, state)
    started, finished = slow_delete
    mgr.save(2, state)  # committed, then step 1's deletion starts in the background
    assert started.wait(10)
    mgr.save(3, state)  # ready at once: the deletion of step 1 is still sleeping
    if async_save:
        mgr._persister.wait()  # durable too (the persist itself, not retention)
    # Saved and durable while the deletion still runs (not a wall-clock bound: a loaded machine's fsync may take a
    # good part of a second, which said nothing about waiting for the deletion).
    assert not finished.is_set()
    mgr.close()  # waits for retention before the lease goes
    assert [c.step for c in CheckpointManager(d, read_only=True).checkpoints()] == [3]
    deleted = [e["step"] for e in read_events(os.path.join(d, "events.jsonl")) if e["event"] == "retention_delete"]
    assert sorted(deleted) == [1, 2]


def test_retention_errors_surface_at_the_next_save(tmp_path, monkeypatch):
    import resumekit.gc as gc_mod

    def broken(*a, **kw):
        raise RuntimeError("retention bug")

    monkeypatch.setattr(gc_mod, "apply_retention", broken)
    mgr = CheckpointManager(str(tmp_path), keep_last=1, handle_sigterm=False)
    mgr.save(1, {"w": torch.ones(3)})
    mgr._retention.wait(10)
    with pytest.raises(RuntimeError, match="retention bug"):
        mgr.save(2, {"w": torch.ones(3)})
    mgr.close()


def test_bench_scaling_quick_runs(tmp_path):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, os.path.join(here, "benchmarks", "bench_scaling.py"), "--quick", "--dir", str(tmp_path)]
        + ["--rounds", "2", "--sizes", "16,32"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["bench"] == "scaling" and len(res["points"]) >= 2
    # Tiny sizes on a shared machine: the figures are noise, the run and its keys are what is checked here.
    for k in ("blocking_s_per_gib", "persist_s_per_gib", "restore_s_per_gib", "scaling_max_deviation"):
        assert isinstance(res[k], float)
    assert isinstance(res["restore_fresh_s_per_gib"], float) and res["rounds"] == 2
    for q in res["points"]:  # each time is the best of its rounds, every round's figure kept beside it
        for k in ("blocking_s", "persist_s", "restore_warm_s", "restore_fresh_s"):
            assert len(q[f"{k}_rounds"]) == 2 and q[k] == round(min(q[f"{k}_rounds"]), 4)
    assert res["restored_bitwise"] is True and res["io"] in ("direct", "buffered")
    assert os.path.exists(os.path.join(str(tmp_path), "scaling.png"))


def test_bench_step_overhead_interleaves_its_modes_step_by_step(tmp_path):
    """The step-overhead bench's tiny mode: every mode runs its planned steps and saves once per period, the
    per-period spread and the excess per position in the period are reported (the figures themselves are noise at
    this size)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(here, "benchmarks", "bench_step_overhead.py"), "--model-mb", "4"]
    cmd += ["--mode", "accel", "--compare-sync", "--periods", "3", "--sync-periods", "2", "--every", "4"]
    cmd += ["--batch", "32"]
    out = subprocess.run([*cmd, "--dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["bench"] == "step_overhead" and res["periods"] == 3 and res["threads"] == 1
    assert res["saves_timed"] == 3 and res["sync_periods"] == 2
    # Planned: periods x 4 steps; a mode busy at the end steps on (at most one period more).
    steps = res["steps_timed"]
    assert steps["base"] == 12 and 12 <= steps["async"] <= 16 and 8 <= steps["sync"] <= 12
    for key in ("step_overhead", "step_overhead_sync"):
        low, high = res[f"{key}_range"]
        assert low <= high and isinstance(res[key], float)
    assert res["save_blocking_s"] > 0 and res["save_persist_s"] > 0
    assert len(res["step_excess_s_by_position"]) == 4  # one per position in the save period
    assert res["sync_save_blocking_s"] > res["save_blocking_s"]  # a 48 MiB write + fsync per save vs a copy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_the_persist_thread_yields_the_cpu_only_when_asked_and_the_process_keeps_its_priority(monkeypatch):
    from resumekit.snapshot import BackgroundPersister

    def persist_nice() -> int:
        seen = []
        p = BackgroundPersister()
        p.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        p.wait()
        return seen[0]

    base = os.getpriority(os.PRIO_PROCESS, 0)
    monkeypatch.delenv("RESUMEKIT_PERSIST_NICE", raising=False)
    assert persist_nice() == base  # off by default
    monkeypatch.setenv("RESUMEKIT_PERSIST_NICE", "10")
    assert persist_nice() == min(19, base + 10)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the training thread: unchanged
