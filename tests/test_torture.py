"""Kill-during-save torture: SIGKILL a process at random instants of a save loop, 50+ times.

After every kill: the newest valid checkpoint (checksums verified) loads, its contents are exactly what that
step wrote, no committed checkpoint was lost, and no checkpoint that fails to load is ever chosen.
"""

import multiprocessing as mp
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "jobs"))

from torture_child import expected_value, save_loop

from resumekit.checkpointers.native import read_checkpoint
from resumekit.format import parse_step_dirname
from resumekit.layouts.native import NativeLayout
from resumekit.storage import open_storage


def _ctx():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "resumekit.manager", "torture_child"])
    return ctx


def _check(directory, previous_best):
    import torch

    st = open_storage(directory, create=False)
    layout = NativeLayout()
    best, _skipped = layout.latest(st, full=True)
    assert best is not None, "a kill lost every checkpoint"
    assert best.step >= previous_best, f"committed step {previous_best} was lost (now {best.step})"
    _, tree = read_checkpoint(st, best.name)
    w = tree["state"]["weights"]
    assert all(torch.all(t == expected_value(best.step)) for t in w.values())
    assert tree["state"]["meta"]["step"] == best.step
    # every checkpoint that has a manifest must verify: the commit protocol never publishes a partial one
    for info in layout.list(st):
        if st.exists(f"{info.name}/manifest.json"):
            assert layout.validate(st, info, full=True).valid, info
    return best.step


@pytest.mark.parametrize("async_save,kills", [(False, 50), (True, 15)])
def test_kill_during_save_torture(tmp_path, async_save, kills):
    ctx = _ctx()
    rng = random.Random(1234 + kills)
    d = str(tmp_path)
    best = 0
    mid_save = 0
    for _ in range(kills):
        tmp_before = {n for n in os.listdir(d) if n.startswith(".tmp-")}
        ready = ctx.Event()
        p = ctx.Process(target=save_loop, args=(d, best, ready, async_save), daemon=True)
        p.start()
        assert ready.wait(60), "child did not start"
        import time

        if best == 0:
            # Only a committed checkpoint can be lost: the first child commits one before the kills begin (its first
            # save, fsyncs included, took longer than the first random delay on a busy disk once).
            deadline = time.monotonic() + 60
            while not any(parse_step_dirname(n) is not None for n in os.listdir(d)) and time.monotonic() < deadline:
                time.sleep(0.005)
        # random instant: often inside a save since the loop does little else
        time.sleep(rng.uniform(0.0, 0.25))
        p.kill()
        p.join()
        assert p.exitcode == -9
        mid_save += bool({n for n in os.listdir(d) if n.startswith(".tmp-")} - tmp_before)
        best = _check(d, best)
    assert best > 0
    assert mid_save >= kills // 5, f"only {mid_save}/{kills} kills landed during a save"
    print(f"{kills} kills, {mid_save} during a save, newest valid step {best}")
