"""A node tier's damaged copy is fetched again, a download is hashed once, the tier follows ``keep_last``
(issue 17, the gaps left in the sharded node-tier and object-store path).

World-of-one restores with real files and a moto S3 root (the behaviour is per node; tests/test_dcp_remote.py runs
the cross-rank case under ``torchrun``, one node repairing its copy while the other downloads):

1. A tier copy found damaged when the rank verifies it (a bit flip in a copy already there, a truncation or a bit
   flip after the restore downloaded it) is discarded and fetched again from the shared root, verified while it
   streams; the step is not skipped, and ``resume_agreed`` names the damage and where the copy came from. Only
   when the shared root's copy is bad too is the step skipped (every rank: one verdict).
2. Bytes a restore just downloaded (verified while streaming) are not hashed again by its verification pass, and a
   sharded restore honours the supervisor's ``RESUMEKIT_VERIFIED`` token; counted with a counting xxh3.
3. The node tier keeps ``tier_keep(keep_last)`` steps whether it comes from ``local_tier=`` or from
   ``RESUMEKIT_LOCAL_TIER``.
4. The remote storage's public sized listing.
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import agreed_events, assert_same, make_training, restore_through_tier, state_tensors, train_steps
from resumekit import CheckpointManager, ConfigError
from resumekit.checkpointers import dcp_tiers
from resumekit.distributed.nodetier import LOCAL, tier_keep
from resumekit.events import read_events
from resumekit.format import step_dirname

S4 = step_dirname(4)
SHARD = "__0_0.distcp"


def _flip(path, at=None):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2 if at is None else at] ^= 1
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(bytes(data))


def _saved(root, tier, steps=4):
    a = make_training()
    mgr = CheckpointManager(root, every_steps=2, keep_last=3, distributed=True, local_tier=str(tier))
    train_steps(a, steps, mgr)
    mgr.close()
    return a


def _damage_after_fetch(monkeypatch, damage):
    """The first fetch into a tier is damaged right after it committed (``damage(path of the shard)``)."""
    real = dcp_tiers.fetch_step
    calls = []

    def fetch(remote, tier, name, digest, group, world):
        kind = real(remote, tier, name, digest, group, world)
        calls.append(name)
        if len(calls) == 1:
            damage(os.path.join(tier.root, name, SHARD))
        return kind

    monkeypatch.setattr(dcp_tiers, "fetch_step", fetch)
    return calls


# ------------------------------------------------------------------------------------------------ 1. re-fetch
def test_a_damaged_tier_copy_is_fetched_again_from_s3(s3_bucket, tmp_path, monkeypatch):
    root, tier = s3_bucket.uri("run"), tmp_path / "tier"
    monkeypatch.setenv("RESUMEKIT_EVENTS", str(tmp_path / "events.jsonl"))  # the run's log (an s3 root has none)
    a = _saved(root, tier)
    good = (tier / S4 / SHARD).read_bytes()

    # damage already there when the job starts (the copy the save left): discarded, fetched again, read locally
    _flip(tier / S4 / SHARD)
    start, b = restore_through_tier(root, tier)
    ev = agreed_events(tier)[-1]
    assert start == 4 and (ev["read"], ev["reads"], ev["downloaded"]) == (LOCAL, [LOCAL], True)
    assert ev["refetched"]["from"] == f"{root}/{S4}"
    assert f"{SHARD} checksum mismatch" in ev["refetched"]["damaged"]
    assert (tier / S4 / SHARD).read_bytes() == good
    (done,) = [e for e in read_events(str(tier / "events.jsonl")) if e["event"] == "tier_refetch"]
    assert (done["step"], done["ok"], done["fetched_from"], done["error"]) == (4, True, f"{root}/{S4}", None)
    assert_same(state_tensors(a), state_tensors(b))
    assert not [e for e in read_events(str(tmp_path / "events.jsonl")) if e["event"] == "skip_invalid"]

    # damage after the restore downloaded the step into an empty tier: a truncation, then a bit flip (a moment
    # later: a write in the very timestamp tick of the download's last write is what no identity check sees)
    for name, damage in (
        ("truncated", lambda p: os.truncate(p, os.path.getsize(p) - 7)),
        ("flipped", lambda p: (time.sleep(0.05), _flip(p))),
    ):
        other = tmp_path / name
        calls = _damage_after_fetch(monkeypatch, damage)
        start, c = restore_through_tier(root, other)
        assert start == 4 and calls == [S4, S4], name
        ev = agreed_events(other)[-1]
        assert (ev["read"], ev["downloaded"], ev["refetched"]["from"]) == (LOCAL, True, f"{root}/{S4}")
        assert ("bytes, manifest says" if name == "truncated" else "checksum mismatch") in ev["refetched"]["damaged"]
        assert_same(state_tensors(a), state_tensors(c))


def test_when_the_shared_copy_is_bad_too_the_step_is_skipped(s3_bucket, tmp_path, monkeypatch):
    root, tier = s3_bucket.uri("run"), tmp_path / "tier"
    monkeypatch.setenv("RESUMEKIT_EVENTS", str(tmp_path / "events.jsonl"))  # the run's log (an s3 root has none)
    _saved(root, tier)
    _flip(tier / S4 / SHARD)
    key = f"run/{S4}/{SHARD}"
    data = bytearray(s3_bucket.get(key))
    data[5] ^= 1
    s3_bucket.put(key, bytes(data))
    start, _ = restore_through_tier(root, tier)
    assert start == 2
    skipped = [e for e in read_events(str(tmp_path / "events.jsonl")) if e["event"] == "skip_invalid"]
    assert [e["step"] for e in skipped] == [4]
    reason = skipped[0]["reason"]
    assert f"{SHARD} checksum mismatch" in reason and f"fetching it again from {root}/{S4} failed too" in reason
    assert not (tier / S4).exists()  # the damaged copy was discarded, nothing damaged was committed in its place
    (tried,) = [e for e in read_events(str(tier / "events.jsonl")) if e["event"] == "tier_refetch"]
    assert tried["ok"] is False and f"{SHARD} checksum mismatch" in tried["error"]
    assert agreed_events(tier)[-1]["step"] == 2


# --------------------------------------------------------------------------------------------- 2. hash once
@pytest.fixture
def hashed_bytes(monkeypatch):
    """Every byte fed to xxh3 in this process from now on (the checksum of every checkpoint file)."""
    import xxhash

    real = xxhash.xxh3_64
    total = [0]

    class Counting:
        def __init__(self, *args):
            self._h = real(*args)
            total[0] += sum(memoryview(x).nbytes for x in args)

        def update(self, data):
            total[0] += memoryview(data).nbytes
            self._h.update(data)

        def hexdigest(self):
            return self._h.hexdigest()

    monkeypatch.setattr(xxhash, "xxh3_64", Counting)
    return total


def test_a_downloaded_step_is_hashed_once(s3_bucket, tmp_path, hashed_bytes):
    root = s3_bucket.uri("run")
    a = make_training(width=3000)  # a DCP shard of ~0.1 MB: most of the step
    mgr = CheckpointManager(root, every_steps=2, distributed=True, local_tier=str(tmp_path / "saver"))
    train_steps(a, 2, mgr)
    mgr.close()
    tier = tmp_path / "tier"  # another node: its tier lacks the step, its leader downloads it
    mgr = CheckpointManager(root, distributed=True, local_tier=str(tier))
    b = make_training(width=3000)
    hashed_bytes[0] = 0
    assert mgr.restore(b) == 2
    total = hashed_bytes[0]
    mgr.close()
    assert_same(state_tensors(a), state_tensors(b))
    d = tier / step_dirname(2)
    shard = (d / SHARD).stat().st_size
    small = sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and p.name != SHARD)
    # the shard once (while it streamed in); the small files (manifest, plan, rank files) a few times each
    assert shard <= total < shard + 6 * small, (total, shard, small)
    ev = agreed_events(tier)[-1]
    assert ev["downloaded"] is True and ev["hashed_bytes"] == 0


def test_a_sharded_restore_honours_the_supervisors_token(tmp_path, monkeypatch, hashed_bytes):
    from resumekit.storage.local import LocalStorage
    from resumekit.storage.verified import ENV_VERIFIED, issue_token
    from resumekit.verify import check_checkpoint, record_hashed

    root = tmp_path / "shared"
    a = make_training(width=3000)
    mgr = CheckpointManager(str(root), every_steps=2, distributed=True)
    train_steps(a, 2, mgr)
    mgr.close()
    storage, name = LocalStorage(str(root)), step_dirname(2)
    with record_hashed() as seen:  # what resumekit run does before a start
        check_checkpoint(storage, name, full=True)
    time.sleep(0.03)  # the settle margin (issue_token would wait it out itself)
    token = issue_token(storage, name, seen)
    assert token is not None

    def restore():
        hashed_bytes[0] = 0
        mgr = CheckpointManager(str(root), distributed=True)
        b = make_training(width=3000)
        assert mgr.restore(b) == 2
        mgr.close()
        assert_same(state_tensors(a), state_tensors(b))
        return hashed_bytes[0]

    plain = restore()
    monkeypatch.setenv(ENV_VERIFIED, token)
    vouched = restore()
    shard = (root / name / SHARD).stat().st_size
    assert plain - vouched >= shard, (plain, vouched, shard)


# --------------------------------------------------------------------------------------------- 3. retention
def test_tier_keep_follows_keep_last():
    assert [tier_keep(k) for k in (None, 1, 2, 3, 7)] == [2, 2, 2, 3, 7]
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ConfigError, match="keep_last must be a positive integer"):
            tier_keep(bad)


def test_a_node_tier_from_the_environment_keeps_keep_last_steps(s3_bucket, tmp_path, monkeypatch):
    # (a tier passed as local_tier= keeps them too: tests/test_node_tiers.py)
    root, tier = s3_bucket.uri("run"), tmp_path / "tier"
    monkeypatch.setenv("RESUMEKIT_LOCAL_TIER", str(tier))  # what resumekit run --local-tier exports
    mgr = CheckpointManager(root, every_steps=1, keep_last=3, distributed=True)
    assert mgr.checkpointer.node_tier.keep == 3
    train_steps(make_training(), 4, mgr)
    mgr.close()
    assert sorted(n for n in os.listdir(tier) if n.startswith("step_")) == [step_dirname(s) for s in (2, 3, 4)]


# --------------------------------------------------------------------------------------------- 4. listing
def test_remote_storage_lists_sizes(s3_bucket):
    from resumekit.storage import open_storage

    st = open_storage(s3_bucket.uri("run"))
    s3_bucket.put("run/step_1/a.bin", b"x" * 5)
    s3_bucket.put("run/step_1/rank_00000/b.json", b"{}")
    s3_bucket.put("run/step_1/", b"")  # a "directory marker" some tools create
    s3_bucket.put("run/step_10/c.bin", b"yyy")  # another step whose name starts alike
    assert st.list_sizes("step_1") == {"a.bin": 5, "rank_00000/b.json": 2}
    assert st.list_sizes("step_2") == {}
