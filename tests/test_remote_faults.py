"""Faults on the way to an object store: SIGKILL of the saving/uploading process at random instants, and a TCP
proxy that drops connections mid-transfer. The invariants: a step with a manifest always verifies, the remote's
newest valid checkpoint always loads and never goes backwards, and transfers either complete through retries or
fail with a clear error leaving nothing half-written that counts."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time

import pytest

from conftest import PYTHON, REPO, assert_same, make_training, state_tensors, train_steps
from resumekit import CheckpointManager, CheckpointWriteError
from resumekit.format import MANIFEST, step_dirname
from resumekit.layouts.native import NativeLayout
from resumekit.storage.remote import RemoteStorage
from resumekit.storage.tiered import TieredStorage
from s3_fixtures import flaky

sys.path.insert(0, os.path.join(REPO, "tests", "jobs"))
from remote_saver import PAYLOAD, payload

JOB = os.path.join(REPO, "tests", "jobs", "remote_saver.py")
SIZE = 6 << 20  # two multipart parts of 5 MiB: a kill can land between parts, before complete, before the manifest


def check_remote(bucket, uri: str, newest_before):
    """Every step with a manifest verifies in full; the newest valid one loads and is not older than before."""
    st = RemoteStorage(uri)
    lay = NativeLayout()
    valid, unfinished = [], 0
    for info in lay.list(st):
        checked = lay.validate(st, info, full=True)
        if st.exists(f"{info.name}/{MANIFEST}"):
            assert checked.valid, f"{info.name} has a manifest but does not verify: {checked.reason}"
            valid.append(info.step)
        else:
            unfinished += 1
    unfinished += len(bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads") or [])
    newest = max(valid) if valid else None
    if newest_before is not None:
        assert newest is not None and newest >= newest_before, "the remote's newest valid checkpoint went back"
    if newest is not None:
        assert st.read_bytes(f"{step_dirname(newest)}/{PAYLOAD}") == payload(newest, SIZE)
    return newest, unfinished


@pytest.mark.parametrize("mode", ["direct", "tiered"])
def test_sigkill_at_random_instants_never_leaves_a_partial_step(mode, s3_bucket, tmp_path):
    uri, local = s3_bucket.uri("run"), str(tmp_path / "fast")
    newest, interrupted, saved = None, 0, 0
    for seed in range(6):  # 6 seeds per mode, 12 kill instants in all; each run resumes after the previous kill
        rng = random.Random(1000 * seed + (mode == "tiered"))
        proc = subprocess.Popen(
            [PYTHON, JOB, mode, uri, local, str(SIZE)], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
        )
        ready = proc.stdout.readline()
        assert ready.startswith("ready "), ready
        # Up to 1.5 s: on a loaded machine a fresh process needed ~1 s for its first upload (client set-up, listing,
        # two parts), and a run in which no kill ever lands after an upload tests nothing.
        time.sleep(rng.uniform(0.05, 1.5))
        proc.kill()
        out = proc.communicate()[0]
        saved += out.count("saved ")
        newest, unfinished = check_remote(s3_bucket, uri, newest)
        interrupted += unfinished > 0
    assert saved >= 3 and newest is not None
    assert interrupted >= 1, "no kill landed mid-save: the test did not test anything"
    if mode == "tiered":
        # The next start re-uploads what the last kill interrupted: afterwards both tiers agree on the newest.
        tier = TieredStorage(uri, local)
        tier.resync()
        tier.close()
        lay = NativeLayout()
        local_best, _ = lay.latest(tier.local, full=True)
        remote_best, _ = lay.latest(tier.remote, full=True)
        assert remote_best.step == local_best.step >= newest


# -- dropped connections ---------------------------------------------------------------------------------------


def big_training():
    """~15 MiB of state (model + AdamW moments): multipart uploads and many ranged reads."""
    return make_training(width=200_000)


def test_dropped_connections_are_retried_on_upload_and_download(s3_bucket, fault_proxy, monkeypatch, tmp_path):
    proxy = fault_proxy(flaky(seed=3, p=0.3, max_bytes=4 << 20))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("RESUMEKIT_S3_RETRIES", "12")
    st = big_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), every_steps=1)
    train_steps(st, 3, mgr)
    mgr.close()
    fresh = big_training()
    mgr = CheckpointManager(s3_bucket.uri("run"))  # direct restore: ranged reads through the proxy
    assert mgr.restore(fresh) == 3
    mgr.close()
    assert_same(state_tensors(st), state_tensors(fresh))
    fresh = big_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=str(tmp_path / "fast"))  # pre-download
    assert mgr.restore(fresh) == 3
    mgr.close()
    assert_same(state_tensors(st), state_tensors(fresh))
    assert proxy.cuts >= 3, f"the proxy cut only {proxy.cuts} of {proxy.connections} connections"


def test_a_dead_link_fails_clearly_and_commits_nothing(s3_bucket, fault_proxy, monkeypatch):
    st = big_training()
    mgr = CheckpointManager(s3_bucket.uri("run"))
    mgr.save(1, st)
    mgr.close()
    # Small requests pass, anything over 100 kB is cut: listings work, data never gets through.
    proxy = fault_proxy(lambda n: ("up", 100_000))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("RESUMEKIT_S3_RETRIES", "3")
    mgr = CheckpointManager(s3_bucket.uri("run"))
    with pytest.raises(CheckpointWriteError) as ei:
        mgr.save(2, st)
    msg = str(ei.value)
    assert msg.startswith(f"saving step 2 to {s3_bucket.uri('run')}/{step_dirname(2)} failed: ")
    assert "failed after 3 attempts" in msg and "The previous checkpoint is untouched." in msg
    mgr.close()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.server.endpoint)
    remote = RemoteStorage(s3_bucket.uri("run"))
    best, _ = NativeLayout().latest(remote, full=True)
    assert best.step == 1
    assert not remote.exists(f"{step_dirname(2)}/{MANIFEST}")


def test_tiered_upload_errors_surface_and_the_next_start_uploads_again(s3_bucket, fault_proxy, monkeypatch, tmp_path):
    local = str(tmp_path / "fast")
    proxy = fault_proxy(lambda n: ("up", 100_000))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("RESUMEKIT_S3_RETRIES", "2")
    st = big_training()
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=local)
    assert mgr.restore(st) == 0
    mgr.save(1, st)  # commits locally: training goes on
    with pytest.raises(
        CheckpointWriteError,
        match=r"uploading .*step_000000001 to s3://.*failed: .*failed after "
        r"2 attempts.*The local checkpoint is kept",
    ):
        mgr.wait()
    mgr.save(2, st)
    with pytest.raises(CheckpointWriteError, match=r"uploading"):
        mgr.close()
    assert sorted(os.listdir(local)) == ["events.jsonl", step_dirname(1), step_dirname(2)]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.server.endpoint)  # the link is back
    mgr = CheckpointManager(s3_bucket.uri("run"), local_tier=local)
    assert mgr.restore(make_training(width=200_000)) == 2
    mgr.close()
    remote = RemoteStorage(s3_bucket.uri("run"))
    lay = NativeLayout()
    assert sorted(i.step for i in lay.list(remote) if lay.validate(remote, i).valid) == [1, 2]
    shutil.rmtree(local)
