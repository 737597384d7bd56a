"""Tiered mode: local commit + background upload, pre-download on restore and before ``resumekit run`` starts a job,
retention across tiers. The shared behaviour is in test_storage_suite.py; this file covers what only tiers have."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hs

from conftest import PYTHON, assert_same, make_training, state_tensors, train_steps
from resumekit import CheckpointManager
from resumekit.errors import CorruptCheckpointError
from resumekit.events import read_events
from resumekit.format import TENSORS_FILE, step_dirname
from resumekit.layouts.native import NativeLayout
from resumekit.policy import RetentionPolicy
from resumekit.storage import open_storage
from resumekit.storage import tiered as tiered_mod
from resumekit.storage.tiered import newest_valid, plan_uploads, step_dirs, steps_to_resync, valid_manifest
from resumekit.storage.transfer import copy_step, read_manifest_bytes

# -- pure decisions --------------------------------------------------------------------------------------------


def test_plan_uploads_skips_what_remote_retention_would_delete():
    keep2 = RetentionPolicy(keep_last=2)
    assert plan_uploads([10, 20, 30, 40], [5], keep2) == ([30, 40], [10, 20])
    assert plan_uploads([10, 20, 30, 40], [5], RetentionPolicy(keep_last=1, keep_every=20)) == ([20, 40], [10, 30])
    assert plan_uploads([10, 20], [5], None) == ([10, 20], [])
    assert plan_uploads([], [5], keep2) == ([], [])


@settings(max_examples=200, deadline=None)
@given(
    pending=hs.sets(hs.integers(0, 60), max_size=8),
    remote=hs.sets(hs.integers(0, 60), max_size=8),
    last=hs.integers(1, 4),
    every=hs.one_of(hs.none(), hs.integers(1, 10)),
)
def test_plan_uploads_always_uploads_the_newest_and_loses_nothing_kept(pending, remote, last, every):
    policy = RetentionPolicy(keep_last=last, keep_every=every)
    up, skip = plan_uploads(sorted(pending), sorted(remote), policy)
    assert sorted(up + skip) == sorted(pending) and not set(up) & set(skip)
    if pending:
        assert max(pending) in up
    kept = (pending | remote) - set(policy.to_delete(sorted(pending | remote)))
    assert (kept & pending) <= set(up)


def test_steps_to_resync():
    assert steps_to_resync([4, 8, 12, 16], 8) == [12, 16]
    assert steps_to_resync([4, 8], None) == [4, 8]
    assert steps_to_resync([4, 8], 12) == []


# -- one tier's steps, and copying one between tiers (local directories) ---------------------------------------


def _commit_step(storage, step, payload=b"payload", manifest_step=None):
    from resumekit.format import FileEntry, Manifest, new_hasher

    h = new_hasher()
    h.update(payload)
    txn = storage.begin(step_dirname(step))
    with txn.open_write("data.bin") as f:
        f.write(payload)
    man = Manifest(
        step=step if manifest_step is None else manifest_step,
        files={"data.bin": FileEntry(len(payload), h.hexdigest())},
        metadata={"loss": 1.0},
    )
    raw = man.to_json()
    txn.commit(raw)
    return raw


def test_steps_of_a_tier_and_the_newest_valid_one(tmp_path):
    st = open_storage(str(tmp_path / "tier"))
    assert step_dirs(st) == [] and newest_valid(st) is None
    for s in (4, 8, 12):
        _commit_step(st, s)
    (tmp_path / "tier" / "step_000000016").mkdir()  # a save that never finished
    (tmp_path / "tier" / ".tmp-step_000000020-x").mkdir()
    (tmp_path / "tier" / "events.jsonl").write_text("")
    assert sorted(step_dirs(st)) == [
        (4, step_dirname(4)),
        (8, step_dirname(8)),
        (12, step_dirname(12)),
        (16, step_dirname(16)),
    ]
    assert newest_valid(st) == (12, step_dirname(12))
    assert valid_manifest(st, step_dirname(16)) is None
    assert valid_manifest(st, step_dirname(8)).metadata == {"loss": 1.0}
    data = tmp_path / "tier" / step_dirname(12) / "data.bin"
    data.write_bytes(b"PAYLOAD")  # same size, other bytes: only a full check sees it
    assert newest_valid(st) == (12, step_dirname(12))
    assert newest_valid(st, full=True) == (8, step_dirname(8))


def test_copy_step_commits_the_same_manifest_bytes_and_refuses_a_damaged_source(tmp_path):
    src, dst = open_storage(str(tmp_path / "a")), open_storage(str(tmp_path / "b"))
    raw = _commit_step(src, 3)
    assert read_manifest_bytes(src, step_dirname(3))[0] == raw
    man = copy_step(src, dst, step_dirname(3))
    assert man.step == 3 and (tmp_path / "b" / step_dirname(3) / "manifest.json").read_bytes() == raw
    _commit_step(src, 5, manifest_step=6)
    with pytest.raises(CorruptCheckpointError, match=r"manifest says step 6 but the directory is step 5"):
        read_manifest_bytes(src, step_dirname(5))
    _commit_step(src, 7)
    (tmp_path / "a" / step_dirname(7) / "data.bin").write_bytes(b"payloadX")
    with pytest.raises(CorruptCheckpointError, match=r"data.bin has more than 8 bytes, manifest says 7"):
        copy_step(src, dst, step_dirname(7))
    assert step_dirs(dst) == [(3, step_dirname(3))]  # nothing of step 7 was committed


# -- against the moto server -----------------------------------------------------------------------------------


def valid_steps(storage):
    lay = NativeLayout()
    return sorted(i.step for i in lay.list(storage) if lay.validate(storage, i, full=True).valid)


def test_bitwise_resume_through_the_remote_tier(s3_bucket, tmp_path):
    """Train N straight vs. k steps with tiered saves, lose the local tier, resume from the remote, go on to N."""
    fast = str(tmp_path / "fast")
    straight = make_training()
    train_steps(straight, 20)
    a = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=fast, every_steps=5, async_save=True)
    assert mgr.restore(a) == 0
    train_steps(a, 13, mgr)  # dies after step 13: the newest save is step 10
    mgr.close()
    shutil.rmtree(fast)
    os.makedirs(fast)
    mgr_old = CheckpointManager(str(tmp_path / "elsewhere"))  # an older local step must not win over the remote
    mgr_old.save(5, make_training())
    mgr_old.close()
    shutil.copytree(str(tmp_path / "elsewhere" / step_dirname(5)), os.path.join(fast, step_dirname(5)))
    b = make_training()
    torch.manual_seed(4321)
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=fast, every_steps=5)
    start = mgr.restore(b)
    assert start == 10 and mgr.restored_from.path == os.path.join(fast, step_dirname(10))
    train_steps(b, 20, mgr, start=start)
    mgr.close()
    assert_same(state_tensors(straight), state_tensors(b))
    events = read_events(os.path.join(fast, "events.jsonl"))
    (dl,) = [e for e in events if e["event"] == "download"]
    assert dl["step"] == 10 and dl["path"] == s3_bucket.uri("run") + "/" + step_dirname(10)
    assert [e["step"] for e in events if e["event"] == "upload"] == [15, 20]
    assert valid_steps(open_storage(s3_bucket.uri("run"))) == [5, 10, 15, 20]


def test_a_damaged_local_copy_is_fetched_again_from_the_remote(s3_bucket, tmp_path):
    fast = tmp_path / "fast"
    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=str(fast), every_steps=4)
    train_steps(st, 8, mgr)
    mgr.close()
    p = fast / step_dirname(8) / TENSORS_FILE
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 1
    p.write_bytes(bytes(data))
    fresh = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=str(fast))
    assert mgr.restore(fresh) == 8
    mgr.close()
    assert [(s.step, "checksum mismatch" in s.reason) for s in mgr.skipped] == [(8, True)]
    assert_same(state_tensors(st), state_tensors(fresh))
    assert valid_steps(open_storage(str(fast))) == [4, 8]  # the local copy was replaced by the verified one


def test_local_retention_waits_for_the_upload_and_skips_superseded_steps(s3_bucket, tmp_path, monkeypatch):
    fast = tmp_path / "fast"
    gate = threading.Event()
    real = tiered_mod.copy_step

    def slow_upload(src, dst, name, **kw):
        if not dst.is_local:
            assert gate.wait(30)
        return real(src, dst, name, **kw)

    monkeypatch.setattr(tiered_mod, "copy_step", slow_upload)
    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=str(fast), keep_last=1)
    mgr.save(1, st)  # its upload is now stuck at the gate
    mgr.save(2, st)
    mgr.save(3, st)
    # Retention (keep_last=1) asked to delete steps 1 and 2 locally; 1 is uploading and 2 is queued: both stay.
    assert valid_steps(open_storage(str(fast))) == [1, 2, 3]
    assert mgr.tier.uploading == [step_dirname(1), step_dirname(2), step_dirname(3)]
    gate.set()
    mgr.close()
    assert valid_steps(open_storage(str(fast))) == [3]
    assert valid_steps(open_storage(s3_bucket.uri("run"))) == [3]
    events = read_events(str(fast / "events.jsonl"))
    assert [e["step"] for e in events if e["event"] == "upload"] == [1, 3]
    assert [(e["step"], e["reason"].split(":")[0]) for e in events if e["event"] == "upload_skipped"] == [
        (2, "superseded")
    ]
    assert {(e["step"], e.get("tier")) for e in events if e["event"] == "retention_delete"} >= {
        (1, "remote"),
        (1, "local"),
        (2, "local"),
    }


def test_resumekit_run_predownloads_before_the_job_starts(s3_bucket, tmp_path):
    from resumekit.supervisor import Supervisor, SupervisorOptions

    st = make_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), every_steps=4)
    train_steps(st, 12, mgr)
    mgr.close()
    fast, out = tmp_path / "fast", tmp_path / "env.json"
    code = (
        "import json, os; json.dump({k: os.environ.get(k) for k in ('RESUMEKIT_RESUME_FROM', "
        f"'RESUMEKIT_LOCAL_TIER', 'RESUMEKIT_DIR', 'RESUMEKIT_EVENTS')}}, open({str(out)!r}, 'w'))"
    )
    sup = Supervisor(
        SupervisorOptions(
            command=[PYTHON, "-c", code],
            directory=s3_bucket.uri("run"),
            local_tier=str(fast),
            max_restarts=0,
            quiet=True,
        )
    )
    assert sup.run() == 0
    env = json.loads(out.read_text())
    assert env == {
        "RESUMEKIT_RESUME_FROM": str(fast / step_dirname(12)),
        "RESUMEKIT_LOCAL_TIER": str(fast),
        "RESUMEKIT_DIR": s3_bucket.uri("run"),
        "RESUMEKIT_EVENTS": str(fast / "events.jsonl"),
    }
    assert valid_steps(open_storage(str(fast))) == [12]
    (dl,) = [e for e in read_events(str(fast / "events.jsonl")) if e["event"] == "download"]
    assert dl["step"] == 12 and dl["source"] == "supervisor"
    # The job, resuming from the hand-off, gets exactly the state that was saved.
    fresh = make_training()
    os.environ["RESUMEKIT_RESUME_FROM"] = env["RESUMEKIT_RESUME_FROM"]
    try:
        mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=str(fast))
        assert mgr.restore(fresh) == 12
        mgr.close()
    finally:
        del os.environ["RESUMEKIT_RESUME_FROM"]
    assert_same(state_tensors(st), state_tensors(fresh))
    # A remote newest that fails verification while it downloads is skipped; the one before it is used.
    key = f"run/{step_dirname(12)}/{TENSORS_FILE}"
    data = bytearray(s3_bucket.get(key))
    data[len(data) // 2] ^= 1
    s3_bucket.put(key, bytes(data))
    shutil.rmtree(fast)
    sup = Supervisor(
        SupervisorOptions(
            command=[PYTHON, "-c", code],
            directory=s3_bucket.uri("run"),
            local_tier=str(fast),
            max_restarts=0,
            quiet=True,
        )
    )
    assert sup.run() == 0
    assert json.loads(out.read_text())["RESUMEKIT_RESUME_FROM"] == str(fast / step_dirname(8))
    (skip,) = [e for e in read_events(str(fast / "events.jsonl")) if e["event"] == "skip_invalid"]
    assert skip["step"] == 12 and "checksum mismatch" in skip["reason"]


def test_local_tier_must_differ_from_the_root(tmp_path):
    with pytest.raises(ValueError, match=r"the local tier .* is the remote root itself"):
        CheckpointManager(str(tmp_path), local_tier=str(tmp_path))


def test_progress_bars_only_for_big_transfers_on_a_terminal(monkeypatch):
    import io
    import sys

    from resumekit.storage.transfer import _NoBar, progress_bar

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(1 << 40, "upload"), _NoBar)  # a log file or CI: quiet
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(progress_bar(1 << 10, "upload"), _NoBar)  # too small to be worth a bar
    bar = progress_bar(1 << 40, "upload")
    assert not isinstance(bar, _NoBar)
    bar.update(1 << 20)
    bar.close()
    assert "upload" in sys.stderr.getvalue()


@pytest.mark.parametrize("kind", ["tmpfs", "disk"])
def test_restore_prefers_the_fastest_valid_tier_and_names_it(tmp_path, kind):
    """A local tier in /dev/shm (or a plain directory) in front of a durable directory: the restore reads the local
    copy when it is valid and as new as the remote one, else downloads the remote one, and its event says which."""
    import uuid

    if kind == "tmpfs" and not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    fast = f"/dev/shm/resumekit-test-{uuid.uuid4().hex[:12]}" if kind == "tmpfs" else str(tmp_path / "fast")
    durable = str(tmp_path / "durable")
    try:
        st = make_training()
        mgr = CheckpointManager(durable, local_tier=fast, every_steps=4)
        assert mgr.tier is not None and mgr.tier.in_memory is (kind == "tmpfs")
        train_steps(st, 8, mgr)
        mgr.close()

        def restore() -> dict:
            m = CheckpointManager(durable, local_tier=fast)
            assert m.restore(make_training()) == 8
            m.close()
            return [e for e in read_events(os.path.join(fast, "events.jsonl")) if e["event"] == "restore"][-1]

        ev = restore()
        assert (ev["tier"], ev["tier_in_memory"], ev["path"]) == ("local", kind == "tmpfs", f"{fast}/{step_dirname(8)}")
        if kind == "tmpfs":  # no keep_last: every save stays in RAM, which the restore says at once
            assert ev["tier_space"].startswith(
                f"local tier {fast} is tmpfs and keeps every checkpoint: each save adds "
            )
        else:
            assert "tier_space" not in ev
        p = os.path.join(fast, step_dirname(8), TENSORS_FILE)
        with open(p, "r+b") as f:
            f.seek(-100, os.SEEK_END)  # in the tensor data
            b = f.read(1)
            f.seek(-100, os.SEEK_END)
            f.write(bytes([b[0] ^ 1]))
        ev = restore()
        assert ev["tier"] == "remote" and ev["verified"] == "hashed"
        assert [s["reason"] for s in ev["skipped"]] == [
            f"{TENSORS_FILE} checksum mismatch: the file was altered or damaged"
        ]
    finally:
        shutil.rmtree(fast, ignore_errors=True)
