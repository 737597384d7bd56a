"""CheckpointManager behaviour and every fault of the core issue: each asserts the fallback or the error text."""

import errno
import json
import logging
import os
import shutil
import subprocess
import time

import pytest
import torch

from conftest import assert_same, make_training, state_tensors, train_steps
from resumekit import CheckpointManager, CheckpointWriteError, StateMismatchError, UnsupportedStateError
from resumekit.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from resumekit.format import TENSORS_FILE, TREE_FILE, step_dirname


def saved_run(d, steps=12, every=4, **kw):
    st = make_training()
    mgr = CheckpointManager(str(d), every_steps=every, **kw)
    assert mgr.restore(st) == 0
    train_steps(st, steps, mgr)
    mgr.close()
    return st


def test_save_restore_roundtrip_everything(tmp_path):
    st = saved_run(tmp_path)
    fresh = make_training(seed=5)
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.restore(fresh) == 12
    assert_same(state_tensors(st), state_tensors(fresh))
    assert fresh["epoch"] == st["epoch"]
    mgr.close()


def test_restart_is_bitwise_identical_in_process(tmp_path):
    straight = make_training()
    train_steps(straight, 20)
    a = make_training()
    mgr = CheckpointManager(str(tmp_path), every_steps=7)
    train_steps(a, 10, mgr)  # crash after step 10: the last save was step 7, mid-epoch (8 batches/epoch)
    mgr.close()
    b = make_training()
    torch.manual_seed(1234)  # a restarted process has its RNG elsewhere; restore must put it back
    with torch.no_grad():
        for p in b["model"].parameters():
            p.add_(1.0)
    mgr = CheckpointManager(str(tmp_path), every_steps=7)
    start = mgr.restore(b)
    assert start == 7
    train_steps(b, 20, mgr, start=start)
    mgr.close()
    assert_same(state_tensors(straight), state_tensors(b))


def test_step_numbers_sort_as_integers(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path))
    for s in (9, 10, 100, 99):
        mgr.save(s, st)
    assert [c.step for c in mgr.checkpoints()] == [9, 10, 99, 100]
    assert CheckpointManager(str(tmp_path)).restore(make_training()) == 100


def newest(d):
    return sorted(p for p in os.listdir(d) if p.startswith("step_"))[-1]


def _truncate(p):
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 7)


def _flip(p):
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize(
    "fault,fname,reason",
    [
        ("truncate", TENSORS_FILE, "truncated"),
        ("flip", TENSORS_FILE, "checksum mismatch"),
        ("flip", TREE_FILE, "checksum mismatch"),
        ("delete", TENSORS_FILE, "is missing"),
        ("delete", "manifest.json", "manifest.json is missing"),
        ("garbage_manifest", "manifest.json", "not valid JSON"),
    ],
)
def test_corrupt_newest_falls_back_and_says_why(tmp_path, caplog, fault, fname, reason):
    saved_run(tmp_path, steps=12, every=4)
    bad = tmp_path / step_dirname(12) / fname
    if fault == "truncate":
        _truncate(bad)
    elif fault == "flip":
        _flip(bad)
    elif fault == "delete":
        bad.unlink()
    else:
        bad.write_text("{oops")
    fresh = make_training()
    mgr = CheckpointManager(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="resumekit"):
        assert mgr.restore(fresh) == 8
    assert reason in caplog.text and step_dirname(12) in caplog.text
    assert mgr.skipped[0].step == 12 and reason in mgr.skipped[0].reason
    events = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert any(e["event"] == "skip_invalid" and e["step"] == 12 for e in events)
    # the state really is step 8's: compare with a fresh straight run of 8 steps
    ref = make_training()
    train_steps(ref, 8)
    assert_same(state_tensors(ref)["model"], state_tensors(fresh)["model"])


def test_corrupt_step_is_replaced_when_reached_again(tmp_path):
    saved_run(tmp_path, steps=12, every=4)
    _flip(tmp_path / step_dirname(12) / TENSORS_FILE)
    st = make_training()
    mgr = CheckpointManager(str(tmp_path), every_steps=4)
    start = mgr.restore(st)
    train_steps(st, 12, mgr, start=start)
    mgr.close()
    assert all(c.valid for c in CheckpointManager(str(tmp_path)).checkpoints(full=True))


def test_manifest_with_unsafe_path_is_rejected(tmp_path):
    saved_run(tmp_path, steps=8, every=4)
    mpath = tmp_path / step_dirname(8) / "manifest.json"
    doc = json.loads(mpath.read_text())
    doc["files"]["../../../etc/passwd"] = {"size": 1, "xxh3": "0"}
    mpath.write_text(json.dumps(doc))
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.restore(make_training()) == 4
    assert "unsafe path" in mgr.skipped[0].reason
    doc["files"] = {"/etc/passwd": {"size": 1, "xxh3": "0"}}
    mpath.write_text(json.dumps(doc))
    mgr = CheckpointManager(str(tmp_path))
    mgr.restore(make_training())
    assert "absolute path" in mgr.skipped[0].reason


def test_mismatched_model_names_keys(tmp_path):
    saved_run(tmp_path, steps=4, every=4)
    st = make_training(width=32)
    with pytest.raises(StateMismatchError, match=r"state\['model'\].*shape mismatch 0.weight"):
        CheckpointManager(str(tmp_path)).restore(st)
    st = make_training()
    st["model"] = torch.nn.Sequential(torch.nn.Linear(4, 16))
    with pytest.raises(StateMismatchError, match=r"unexpected keys \['2.bias', '2.weight'\]"):
        CheckpointManager(str(tmp_path)).restore(st)
    st = make_training()
    st["new_thing"] = torch.nn.Linear(1, 1)
    with pytest.raises(StateMismatchError, match=r"no entry for \['new_thing'\]"):
        CheckpointManager(str(tmp_path)).restore(st)


def test_unsupported_object_error_at_save(tmp_path):
    st = make_training()
    st["extras"] = {"fn": lambda x: x}
    with pytest.raises(UnsupportedStateError, match=r"state\['extras'\]\['fn'\]"):
        CheckpointManager(str(tmp_path)).save(1, st)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("step_")]


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointWriteError, match=r"cannot create checkpoint directory .*file/ckpt"):
        CheckpointManager(str(blocker / "ckpt"))


def test_permission_denied_during_save_keeps_previous(tmp_path, monkeypatch):
    saved_run(tmp_path, steps=4, every=4)
    from resumekit.storage import local

    def refuse(self, path):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(local._DurableFile, "__init__", refuse)
    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(CheckpointWriteError, match="permission denied: make the checkpoint directory writable"):
        mgr.save(8, make_training())
    monkeypatch.undo()
    assert [c.step for c in CheckpointManager(str(tmp_path)).checkpoints(full=True) if c.valid] == [4]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 3 MiB tmpfs when we may mount one (root), else a write patched to fail with ENOSPC at 3 MiB."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode == 0:
        yield str(mnt), None
        subprocess.run(["umount", "-l", str(mnt)])
    else:
        yield str(mnt), 3 << 20


def test_disk_full_keeps_previous_checkpoint(tiny_fs, monkeypatch):
    d, limit = tiny_fs
    if limit is not None:
        from resumekit.storage import local

        written = {"n": 0}
        orig = local._DurableFile.write

        def write(self, data):
            written["n"] += len(data)
            if written["n"] > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return orig(self, data)

        monkeypatch.setattr(local._DurableFile, "write", write)
    small = make_training()
    mgr = CheckpointManager(d)
    mgr.save(1, small)
    big = make_training()
    big["activations"] = torch.ones(1 << 20)  # 4 MiB > the 3 MiB file system
    with pytest.raises(CheckpointWriteError, match=r"the disk is full.*previous checkpoint is untouched"):
        CheckpointManager(d).save(2, big)
    assert [c.step for c in CheckpointManager(d).checkpoints(full=True) if c.valid] == [1]
    assert not [p for p in os.listdir(d) if p.startswith(".tmp-")]
    assert CheckpointManager(d).restore(make_training()) == 1


def test_retention_keeps_newest_and_rules(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path), every_steps=2, keep_last=2, keep_every=6)
    train_steps(st, 16, mgr)
    mgr.close()
    assert [c.step for c in mgr.checkpoints()] == [6, 12, 14, 16]


def test_retention_keep_best(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path), keep_last=1, keep_best=1, best_metric="loss")
    for step, loss in [(1, 0.9), (2, 0.1), (3, 0.5), (4, 0.7)]:
        mgr.save(step, st, metrics={"loss": loss})
    assert [c.step for c in mgr.checkpoints()] == [2, 4]


def test_stale_tmp_dirs_ignored_and_cleaned(tmp_path):
    saved_run(tmp_path, steps=4, every=4)
    stale = tmp_path / ".tmp-step_000000008-deadbeef"
    stale.mkdir()
    (stale / TENSORS_FILE).write_bytes(b"half")
    mgr = CheckpointManager(str(tmp_path))
    assert [c.step for c in mgr.checkpoints()] == [4]
    assert mgr.restore(make_training()) == 4
    assert not stale.exists()


def test_resume_modes(tmp_path, monkeypatch):
    saved_run(tmp_path, steps=12, every=4)
    assert CheckpointManager(str(tmp_path), resume="never").restore(make_training()) == 0
    assert CheckpointManager(str(tmp_path), resume=str(tmp_path / step_dirname(4))).restore(make_training()) == 4
    monkeypatch.setenv("RESUMEKIT_RESUME_FROM", str(tmp_path / step_dirname(8)))
    assert CheckpointManager(str(tmp_path)).restore(make_training()) == 8
    monkeypatch.setenv("RESUMEKIT_RESUME_FROM", str(tmp_path / "step_000000999"))
    assert CheckpointManager(str(tmp_path)).restore(make_training()) == 12
    _flip(tmp_path / step_dirname(4) / TENSORS_FILE)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        CheckpointManager(str(tmp_path), resume=str(tmp_path / step_dirname(4))).restore(make_training())
    with pytest.raises(ConfigError):
        CheckpointManager(str(tmp_path), resume="")


def test_incremental_training_loads_only_chosen_entries(tmp_path):
    base = tmp_path / "pretrain"
    pre = saved_run(base, steps=8, every=8)
    ft_dir = tmp_path / "finetune"
    st = make_training(seed=3)
    opt_before = st["optim"].state_dict()
    mgr = CheckpointManager(str(ft_dir), init_from=str(base), init_keys=["model"])
    assert mgr.restore(st) == 0
    assert_same(pre["model"].state_dict(), st["model"].state_dict())
    assert st["optim"].state_dict()["state"] == opt_before["state"] == {}
    # Once the fine-tune run has its own checkpoint, it resumes that, not the base.
    train_steps(st, 2)
    mgr.save(2, st)
    mgr.close()
    assert CheckpointManager(str(ft_dir), init_from=str(base), init_keys=["model"]).restore(make_training()) == 2
    # restore(only=...) does the same for an explicit path
    st2 = make_training(seed=4)
    assert CheckpointManager(str(ft_dir)).restore(st2, resume=str(base), only=["model"]) == 8
    with pytest.raises(StateMismatchError, match="no such entries"):
        CheckpointManager(str(ft_dir)).restore(make_training(), resume=str(base), only=["nope"])


def test_explicit_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no valid resumekit checkpoint"):
        CheckpointManager(str(tmp_path / "a"), resume=str(tmp_path / "b")).restore(make_training())


def test_already_committed_step_not_rewritten(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.save(3, st) is not None
    assert mgr.save(3, st) is None


# ---------------------------------------------------------------------------------------------------- async
def _files(d, step):
    p = os.path.join(d, step_dirname(step))
    return {f: open(os.path.join(p, f), "rb").read() for f in (TENSORS_FILE, TREE_FILE)}


def test_async_checkpoint_is_byte_identical_to_sync(tmp_path):
    st = make_training()
    train_steps(st, 5)
    import random

    import numpy as np

    for mode in ("sync", "async"):
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)
        mgr = CheckpointManager(str(tmp_path / mode), async_save=(mode == "async"))
        mgr.save(5, st)
        mgr.close()
    assert _files(tmp_path / "sync", 5) == _files(tmp_path / "async", 5)


def test_mutation_after_async_save_does_not_leak(tmp_path, monkeypatch):
    from resumekit.checkpointers import native as checkpoint

    gate = __import__("threading").Event()
    orig = checkpoint.write_tensors

    def slow_write(f, tensors, h):
        gate.wait(10)
        return orig(f, tensors, h)

    monkeypatch.setattr(checkpoint, "write_tensors", slow_write)
    st = make_training()
    expected = {k: v.clone() for k, v in st["model"].state_dict().items()}
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    mgr.save(1, st)
    with torch.no_grad():
        for p in st["model"].parameters():
            p.add_(100.0)
    gate.set()
    mgr.close()
    back = make_training(seed=7)
    CheckpointManager(str(tmp_path)).restore(back)
    assert_same(expected, back["model"].state_dict())


def test_background_failure_surfaces_at_next_call_and_close(tmp_path, monkeypatch):
    from resumekit.storage import local

    st = make_training()
    mgr = CheckpointManager(str(tmp_path), async_save=True)
    mgr.save(1, st)
    mgr.wait()

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local._DurableFile, "write", full)
    mgr.save(2, st)  # returns after the snapshot; the failure happens in the background
    with pytest.raises(CheckpointWriteError, match="disk is full"):
        mgr.save(3, st)  # the next save call waits for the failed one and raises its error
    mgr.save(4, st)
    with pytest.raises(CheckpointWriteError, match="disk is full"):
        mgr.close()
    monkeypatch.undo()
    assert [c.step for c in CheckpointManager(str(tmp_path)).checkpoints(full=True)] == [1]


def test_background_failure_sets_exit_code(tmp_path):
    code = f"""
import errno, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from conftest import make_training
from resumekit import CheckpointManager
from resumekit.storage import local
st = make_training()
mgr = CheckpointManager({str(tmp_path)!r}, async_save=True)
def full(self, data):
    raise OSError(errno.ENOSPC, "No space left on device")
local._DurableFile.write = full
mgr.save(1, st)
print("loop ended without close()")
"""
    r = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    assert "background checkpoint save failed" in r.stderr and "disk is full" in r.stderr


def test_save_cost_reported(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path), async_save=True, every_steps=2)
    train_steps(st, 6, mgr)
    mgr.close()
    assert mgr.cost.saves == 3 and mgr.cost.blocking_s_mean > 0 and mgr.cost.persist_s_mean > 0
    ev = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    saves = [e for e in ev if e["event"] == "save"]
    assert [e["step"] for e in saves] == [2, 4, 6] and all(e["blocking_s"] >= 0 for e in saves)


# ------------------------------------------------------------------------------------------------ preemption
def test_sigterm_saves_at_next_step_and_exits_zero(tmp_path):
    code = f"""
import os, signal, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from conftest import make_training, train_steps
from resumekit import CheckpointManager
st = make_training()
mgr = CheckpointManager({str(tmp_path)!r}, every_steps=1000)
class Hook:
    def __init__(self): self.n = 0
orig = mgr.maybe_save
def maybe_save(step, state, **kw):
    if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)
    return orig(step, state, **kw)
mgr.maybe_save = maybe_save
train_steps(st, 100, mgr)
print("not reached")
"""
    r = subprocess.run([__import__("sys").executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "not reached" not in r.stdout
    assert [c.step for c in CheckpointManager(str(tmp_path)).checkpoints(full=True)] == [5]
    ev = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert any(e["event"] == "preempted" and e["step"] == 5 for e in ev)


def test_torchdata_stateful_dataloader_resumes_mid_epoch(tmp_path):
    from torchdata.stateful_dataloader import StatefulDataLoader

    ds = list(range(40))

    def loader():
        return StatefulDataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))

    ref = [b.tolist() for b in loader()]
    a = loader()
    it = iter(a)
    got = [next(it).tolist() for _ in range(3)]
    mgr = CheckpointManager(str(tmp_path))
    mgr.save(3, {"data": a})
    b = loader()
    assert CheckpointManager(str(tmp_path)).restore({"data": b}) == 3
    got += [x.tolist() for x in b]
    assert got == ref


def test_saving_the_same_step_twice_async_writes_once(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path), async_save=True, every_steps=5)
    train_steps(st, 5, mgr)  # maybe_save(5) starts a background save
    assert mgr.save(5, st) is None  # the usual final save after the loop: waits, sees step 5 committed
    mgr.close()
    ev = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    assert [e["step"] for e in ev if e["event"] == "save"] == [5]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_fresh_run_replaces_an_old_runs_step(tmp_path):
    old = make_training(seed=1)
    CheckpointManager(str(tmp_path)).save(4, old)
    new = make_training(seed=2)
    mgr = CheckpointManager(str(tmp_path), resume="never")
    assert mgr.restore(new) == 0
    assert mgr.save(4, new) is not None  # not "already committed": that step belongs to another run
    back = make_training(seed=3)
    CheckpointManager(str(tmp_path)).restore(back)
    assert_same(new["model"].state_dict(), back["model"].state_dict())


def test_renamed_checkpoint_is_not_trusted(tmp_path):
    saved_run(tmp_path, steps=8, every=4)
    shutil.copytree(tmp_path / step_dirname(4), tmp_path / step_dirname(12))
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.restore(make_training()) == 8
    assert "manifest says step 4 but the directory is step 12" in mgr.skipped[0].reason


@pytest.mark.parametrize("bad", [1.5, "7", None])
def test_non_integer_step_is_a_clear_error(tmp_path, bad):
    with pytest.raises(ConfigError, match="step must be an integer"):
        CheckpointManager(str(tmp_path)).save(bad, make_training())


def test_numpy_step_and_reserved_metric_names(tmp_path):
    import numpy as np

    mgr = CheckpointManager(str(tmp_path), every_steps=2)
    assert mgr.maybe_save(np.int64(2), make_training(), metrics={"step": 1.0, "time": 2.0, "loss": 0.5})
    ev = [json.loads(line) for line in open(tmp_path / "events.jsonl")]
    m = next(e for e in ev if e["event"] == "metrics")
    assert m["step"] == 2 and m["metric_step"] == 1.0 and m["metric_time"] == 2.0 and m["loss"] == 0.5


def test_gc_protects_the_newest_fully_valid_checkpoint(tmp_path):
    from click.testing import CliRunner

    from resumekit.cli import main

    saved_run(tmp_path, steps=8, every=4)
    _flip(tmp_path / step_dirname(8) / TENSORS_FILE)  # same size: only checksums see it
    CliRunner().invoke(main, ["gc", str(tmp_path), "--keep-last", "1"], catch_exceptions=False)
    assert (tmp_path / step_dirname(4)).exists()
    assert CheckpointManager(str(tmp_path)).restore(make_training()) == 4


def test_supervisor_resume_never_is_honoured(tmp_path, monkeypatch):
    saved_run(tmp_path, steps=4, every=4)
    monkeypatch.setenv("RESUMEKIT_RESUME", "never")
    assert CheckpointManager(str(tmp_path)).restore(make_training()) == 0
    monkeypatch.setenv("RESUMEKIT_RESUME", "auto")
    assert CheckpointManager(str(tmp_path)).restore(make_training()) == 4


def test_job_init_restore_and_first_step_events_time_a_start(tmp_path):
    # Issue 14: the restart-latency breakdown reads the job's own timeline: job_init (the manager exists), a timed
    # restore (also with resume="never") and one first_step per process, before the rate-limited metrics.
    from resumekit.events import read_events

    for resume in ("auto", "never"):
        d = tmp_path / resume
        st = make_training()
        mgr = CheckpointManager(str(d), every_steps=4, resume=resume)
        assert mgr.restore(st) == 0
        train_steps(st, 6, mgr)
        mgr.close()
        evs = read_events(str(d / "events.jsonl"))
        names = [e["event"] for e in evs]
        assert names[:3] == ["job_init", "restore", "first_step"] and names.count("first_step") == 1
        restore, first = evs[1], evs[2]
        assert restore["seconds"] >= 0 and first["step"] == 1 and first["time"] >= restore["time"]


def test_busy_while_a_background_persist_or_retention_is_in_flight(tmp_path, monkeypatch):
    """``busy`` polls, never blocks: True from an async save until its persist and retention are done."""
    import threading

    st = make_training()
    mgr = CheckpointManager(str(tmp_path / "ck"), keep_last=1, async_save=True, handle_sigterm=False)
    assert not mgr.busy
    release = threading.Event()
    persist = mgr.checkpointer.persist

    def held(snap, *, background):
        assert release.wait(30)
        return persist(snap, background=background)

    monkeypatch.setattr(mgr.checkpointer, "persist", held)
    mgr.save(1, st)
    assert mgr.busy  # the persist waits for `release`
    release.set()
    mgr.wait()
    assert not mgr.busy
    # Retention (deleting step 1) held: the persist thread has ended, the manager is still busy.
    from resumekit import gc as rgc

    hold = threading.Event()
    apply = rgc.apply_retention

    def held_retention(*a, **kw):
        assert hold.wait(30)
        return apply(*a, **kw)

    monkeypatch.setattr(rgc, "apply_retention", held_retention)
    mgr.save(2, st)
    deadline = time.monotonic() + 30
    while mgr._persister.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mgr._persister.busy and mgr.busy
    hold.set()
    mgr.wait()
    assert not mgr.busy and [c.step for c in mgr.checkpoints()] == [2]
    mgr.close()
