"""One behavioural suite, four backends: a local directory, ``s3://`` direct, tiered local + ``s3://``, and
``obs://`` direct (Huawei Cloud's spelling of the same protocol, configured through the OBS variables).

Every test here runs against all of them through the ``backend`` fixture; what differs between them (where the
bytes are, how to damage them) lives in :class:`Backend`, never in the tests. The object-store backends use moto
by default, or the endpoint named by ``RESUMEKIT_TEST_S3_ENDPOINT`` (see tests/s3_fixtures.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from conftest import assert_same, make_training, state_tensors, train_steps
from resumekit import CheckpointManager
from resumekit.cli import main
from resumekit.events import ENV_RESUME_FROM
from resumekit.format import MANIFEST, TENSORS_FILE, TREE_FILE, step_dirname
from resumekit.storage import Storage, open_storage


class Backend:
    """Where a run's checkpoints live, and how to reach and damage them."""

    def __init__(self, kind: str, tmp_path, bucket=None):
        self.kind = kind
        self.bucket = bucket
        self.local_tier = str(tmp_path / "fast") if kind == "tiered" else None
        self.uri = str(tmp_path / "ckpt") if kind == "local" else bucket.uri("run")
        if kind == "obs":
            self.uri = "obs://" + self.uri[len("s3://") :]

    def manager(self, **kw) -> CheckpointManager:
        if self.local_tier:
            kw.setdefault("local_tier", self.local_tier)
        return CheckpointManager(self.uri, **kw)

    def tiers(self) -> list[Storage]:
        """Every storage holding a copy: the remote is the durable one, so it comes first."""
        out = [open_storage(self.uri, create=False)]
        if self.local_tier:
            out.append(open_storage(self.local_tier, create=False))
        return out

    def steps(self, storage: Storage) -> list[int]:
        from resumekit.layouts.native import NativeLayout

        lay = NativeLayout()
        return sorted(i.step for i in lay.list(storage) if lay.validate(storage, i, full=True).valid)

    def damage(self, step: int, fname: str, fault: str) -> None:
        """Damage ``fname`` of ``step`` in every tier (so no tier can stand in for the other)."""
        for st in self.tiers():
            rel = f"{step_dirname(step)}/{fname}"
            if fault == "delete":
                if st.is_local:
                    os.unlink(st.local_path(rel))
                else:
                    self.bucket.delete(st.key(rel))
                continue
            data = bytearray(st.read_bytes(rel))
            if fault == "truncate":
                data = data[:-7]
            elif fault == "flip":
                data[len(data) // 2] ^= 0x40
            else:
                data = bytearray(b"{oops")
            st.write_bytes_atomic(rel, bytes(data))

    def wipe_local(self) -> None:
        if self.local_tier:
            shutil.rmtree(self.local_tier)


@pytest.fixture(params=["local", "s3", "tiered", "obs"])
def backend(request, tmp_path):
    if request.param == "local":
        return Backend("local", tmp_path)
    bucket = request.getfixturevalue("s3_bucket")
    if request.param == "obs":
        # What a ModelArts job has: the OBS endpoint and keys in OBS variables, no AWS_* ones.
        mp = request.getfixturevalue("monkeypatch")
        mp.setenv("OBS_ENDPOINT", os.environ["AWS_ENDPOINT_URL"])
        mp.setenv("OBS_ACCESS_KEY_ID", os.environ["AWS_ACCESS_KEY_ID"])
        mp.setenv("OBS_SECRET_ACCESS_KEY", os.environ["AWS_SECRET_ACCESS_KEY"])
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.delenv(k)
    return Backend(request.param, tmp_path, bucket)


def saved_run(backend: Backend, steps: int = 12, every: int = 4, **kw):
    st = make_training()
    mgr = backend.manager(every_steps=every, **kw)
    assert mgr.restore(st) == 0
    train_steps(st, steps, mgr)
    mgr.close()
    return st


def cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ----------------------------------------------------------------------------------------------------------------


def test_roundtrip_restores_everything(backend):
    st = saved_run(backend)
    for tier in backend.tiers():
        assert backend.steps(tier) == [4, 8, 12]
    backend.wipe_local()  # tiered: the remote alone must be enough
    fresh = make_training(seed=5)
    mgr = backend.manager()
    assert mgr.restore(fresh) == 12
    assert_same(state_tensors(st), state_tensors(fresh))
    mgr.close()


def test_async_save_roundtrip(backend):
    st = saved_run(backend, async_save=True)
    backend.wipe_local()
    fresh = make_training(seed=5)
    mgr = backend.manager()
    assert mgr.restore(fresh) == 12
    assert_same(state_tensors(st), state_tensors(fresh))
    mgr.close()


def test_interrupted_run_resumes_bitwise(backend):
    straight = make_training()
    train_steps(straight, 20)
    a = make_training()
    mgr = backend.manager(every_steps=7)
    train_steps(a, 10, mgr)  # "crash" after step 10; the last save was step 7
    mgr.close()
    backend.wipe_local()
    b = make_training()  # same program (data set), but a restarted process's RNG is elsewhere:
    torch.manual_seed(1234)
    mgr = backend.manager(every_steps=7)
    start = mgr.restore(b)
    assert start == 7
    train_steps(b, 20, mgr, start=start)
    mgr.close()
    assert_same(state_tensors(straight), state_tensors(b))


def test_newest_is_chosen_by_integer_step(backend):
    st = make_training()
    mgr = backend.manager()
    for s in (9, 10, 100, 99):
        mgr.save(s, st)
    mgr.close()
    for tier in backend.tiers():
        assert backend.steps(tier) == [9, 10, 99, 100]
    mgr = backend.manager()
    assert mgr.restore(make_training()) == 100
    mgr.close()


@pytest.mark.parametrize(
    "fault,fname,reason",
    [
        ("truncate", TENSORS_FILE, "truncated"),
        ("flip", TENSORS_FILE, "checksum mismatch"),
        ("flip", TREE_FILE, "checksum mismatch"),
        ("delete", TENSORS_FILE, "is missing"),
        ("delete", MANIFEST, "manifest.json is missing"),
        ("garbage", MANIFEST, "not valid JSON"),
    ],
)
def test_corrupt_newest_is_skipped_with_reason(backend, caplog, fault, fname, reason):
    saved_run(backend)
    backend.damage(12, fname, fault)
    fresh = make_training()
    mgr = backend.manager()
    with caplog.at_level(logging.WARNING, logger="resumekit"):
        assert mgr.restore(fresh) == 8
    mgr.close()
    assert reason in caplog.text and step_dirname(12) in caplog.text
    assert mgr.skipped and all(s.step == 12 and reason in s.reason for s in mgr.skipped)
    ref = make_training()
    train_steps(ref, 8)
    assert_same(state_tensors(ref), state_tensors(fresh))


def test_retention_keeps_the_newest_n_in_every_tier(backend):
    saved_run(backend, steps=20, every=4, keep_last=2)
    for tier in backend.tiers():
        assert backend.steps(tier) == [16, 20], tier.uri


def test_resume_modes(backend, monkeypatch):
    saved_run(backend)
    mgr = backend.manager(resume="never")
    assert mgr.restore(make_training()) == 0
    mgr.close()
    remote = backend.tiers()[0]
    explicit = remote.join(step_dirname(8))
    mgr = backend.manager()
    assert mgr.restore(make_training(), resume=explicit) == 8
    mgr.close()
    monkeypatch.setenv(ENV_RESUME_FROM, remote.join(step_dirname(4)))
    mgr = backend.manager()
    assert mgr.restore(make_training()) == 4
    mgr.close()


def test_cli_ls_latest_verify_gc(backend):
    saved_run(backend)
    uri = backend.uri  # the durable root: what an operator inspects
    remote = backend.tiers()[0]
    r = cli("ls", uri, "--json")
    assert r.exit_code == 0, r.output
    assert [(x["step"], x["valid"]) for x in json.loads(r.output)] == [(4, True), (8, True), (12, True)]
    r = cli("latest", uri)
    assert r.exit_code == 0 and r.output.strip() == remote.join(step_dirname(12))
    assert cli("verify", remote.join(step_dirname(8))).exit_code == 0
    backend.damage(8, TENSORS_FILE, "flip")
    r = cli("verify", remote.join(step_dirname(8)), "--json")
    assert r.exit_code == 1 and "checksum mismatch" in json.loads(r.output)["reason"]
    r = cli("verify", remote.join(step_dirname(8)), "--quick")  # sizes only: the flip is invisible
    assert r.exit_code == 0
    # An abandoned save: a tmp dir locally, a step dir without its manifest on an object store.
    stale = step_dirname(16)
    if remote.is_local:
        stale = f".tmp-{stale}-abc"
        os.makedirs(remote.local_path(stale))
    else:
        backend.bucket.put(remote.key(f"{stale}/{TENSORS_FILE}"), b"partial")
    r = cli("gc", uri, "--keep-last", "1", "--json")  # the abandoned save is too young to be called so: kept
    out = json.loads(r.output)
    assert sorted(os.path.basename(p) for p in out["removed"]) == [step_dirname(4), step_dirname(8)]
    assert remote.exists(stale) and not remote.exists(step_dirname(4))
    r = cli("gc", uri, "--keep-last", "1", "--tmp-age", "0", "--json")
    assert os.path.basename(json.loads(r.output)["removed"][0]) == stale
    assert not remote.exists(stale)
    r = cli("ls", uri, "--json")
    assert [(x["step"], x["valid"]) for x in json.loads(r.output)] == [(12, True)]
