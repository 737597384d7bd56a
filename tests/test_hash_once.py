"""Read and hash once: the supervisor's full verification hands the job a token (``RESUMEKIT_VERIFIED``) so the
job's restore does not hash the same bytes again, and nothing corrupt is loaded anyway.

The end-to-end tests run ``resumekit run`` on a real torch job that is SIGKILLed after a save and restored by the
next attempt; every process counts the bytes it feeds to xxh3 (tests/hashcount/sitecustomize.py). The unit tests
damage a checkpoint between the supervisor's verification and the job's read, and forge tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from resumekit import CheckpointManager
from resumekit.checkpointers.native import read_checkpoint
from resumekit.errors import CorruptCheckpointError
from resumekit.events import read_events
from resumekit.format import MANIFEST, TENSORS_FILE, TREE_FILE, step_dirname
from resumekit.storage import verified
from resumekit.storage.local import LocalStorage
from resumekit.storage.verified import (
    ENV_VERIFIED,
    MAX_TOKEN_BYTES,
    VerifiedToken,
    issue_token,
    manifest_digest,
    settle_fresh,
    settled,
)
from resumekit.verify import FileIdentity, Hashed, check_checkpoint, record_hashed

HERE = Path(__file__).resolve().parent
JOB = str(HERE / "jobs" / "hashonce_job.py")
HASHCOUNT = str(HERE / "hashcount")


def _save(root: Path, step: int = 3) -> tuple[LocalStorage, str]:
    torch.manual_seed(1)
    model = torch.nn.Linear(64, 64)
    mgr = CheckpointManager(str(root))
    mgr.save(step, {"model": model}, block=True)
    mgr.close()
    return LocalStorage(str(root)), step_dirname(step)


def _supervisor_token(storage: LocalStorage, name: str) -> str:
    """What ``resumekit run`` does before a start: verify in full while recording, then issue the token."""
    with record_hashed() as hashed:
        check_checkpoint(storage, name, full=True)
    token = issue_token(storage, name, hashed)
    assert token is not None
    return token


def _ckpt_bytes(storage: LocalStorage, name: str) -> int:
    return sum(ent.size for ent in check_checkpoint(storage, name, full=False).files.values())


def _flip(path: str, offset: int = -20) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        pos = os.fstat(fd).st_size + offset if offset < 0 else offset
        b = os.pread(fd, 1, pos)
        os.pwrite(fd, bytes([b[0] ^ 0x01]), pos)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ the job's read
def test_token_skips_hashing_and_loads_the_same(tmp_path, monkeypatch):
    storage, name = _save(tmp_path)
    stats: dict = {}
    _, plain = read_checkpoint(storage, name, stats=stats)
    assert stats == {"verified": "hashed", "hashed_bytes": _ckpt_bytes(storage, name)}
    monkeypatch.setenv(ENV_VERIFIED, _supervisor_token(storage, name))
    stats = {}
    _, tree = read_checkpoint(storage, name, stats=stats)
    assert stats == {"verified": "token", "hashed_bytes": 0}
    assert json.dumps(tree, default=str) == json.dumps(plain, default=str)
    for mapped in (False, True):
        stats = {}
        read_checkpoint(storage, name, mapped=mapped, stats=stats)
        assert stats["verified"] == "token"


@pytest.mark.parametrize("rel", [TENSORS_FILE, TREE_FILE])
@pytest.mark.parametrize("mapped", [True, False])
def test_bit_flip_after_the_supervisor_verified_is_still_caught(tmp_path, monkeypatch, rel, mapped):
    storage, name = _save(tmp_path)
    monkeypatch.setenv(ENV_VERIFIED, _supervisor_token(storage, name))
    _flip(os.path.join(storage.local_path(name), rel))  # a write: ctime changes, so the identity does
    with pytest.raises(CorruptCheckpointError, match=f"{rel} checksum mismatch"):
        read_checkpoint(storage, name, mapped=mapped)


def test_truncation_and_replacement_after_the_supervisor_verified_are_caught(tmp_path, monkeypatch):
    storage, name = _save(tmp_path)
    monkeypatch.setenv(ENV_VERIFIED, _supervisor_token(storage, name))
    path = os.path.join(storage.local_path(name), TENSORS_FILE)
    data = Path(path).read_bytes()
    # Replaced by another file of the same size (a new inode, as a copy or a re-save would make it).
    damaged = bytearray(data)
    damaged[-5] ^= 0xFF
    tmp = path + ".new"
    Path(tmp).write_bytes(bytes(damaged))
    os.replace(tmp, path)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        read_checkpoint(storage, name)
    os.truncate(path, len(data) - 1)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        read_checkpoint(storage, name)


def _forged(token: str, **change) -> str:
    doc = json.loads(token)
    doc.update(change)
    return json.dumps(doc)


@pytest.mark.parametrize(
    "forge",
    [
        "other-dir",
        "other-manifest",
        "other-inode",
        "other-ctime",
        "not-json",
        "wrong-version",
        "bad-types",
        "oversized",
        "missing-file",
    ],
)
def test_a_forged_or_mismatched_token_means_full_hashing(tmp_path, monkeypatch, forge):
    storage, name = _save(tmp_path)
    good = _supervisor_token(storage, name)
    doc = json.loads(good)
    tensors = doc["files"][TENSORS_FILE]
    bad = {
        "other-dir": lambda: _forged(good, path=str(tmp_path / "elsewhere")),
        "other-manifest": lambda: _forged(good, manifest_sha256=manifest_digest(b"{}")),
        "other-inode": lambda: _forged(
            good, files={**doc["files"], TENSORS_FILE: [*tensors[:2], tensors[2] + 1, *tensors[3:]]}
        ),
        "other-ctime": lambda: _forged(good, files={**doc["files"], TENSORS_FILE: [*tensors[:4], tensors[4] - 1]}),
        "not-json": lambda: good[:-3],
        "wrong-version": lambda: _forged(good, v=2),
        "bad-types": lambda: _forged(good, files={TENSORS_FILE: ["1", 2, 3, 4, 5]}),
        "oversized": lambda: good + " " * MAX_TOKEN_BYTES,
        "missing-file": lambda: _forged(good, files={TREE_FILE: doc["files"][TREE_FILE]}),
    }[forge]()
    monkeypatch.setenv(ENV_VERIFIED, bad)
    stats: dict = {}
    read_checkpoint(storage, name, stats=stats)
    assert stats["verified"] == "hashed"
    assert stats["hashed_bytes"] >= os.path.getsize(os.path.join(storage.local_path(name), TENSORS_FILE))
    # ... and damage under a forged token is caught.
    _flip(os.path.join(storage.local_path(name), TENSORS_FILE))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        read_checkpoint(storage, name)


def test_a_token_for_one_checkpoint_does_not_cover_another(tmp_path, monkeypatch):
    storage, name = _save(tmp_path, 3)
    _, other = _save(tmp_path, 4)
    monkeypatch.setenv(ENV_VERIFIED, _supervisor_token(storage, name))
    stats: dict = {}
    read_checkpoint(storage, other, stats=stats)
    assert stats["verified"] == "hashed"


def test_no_token_without_full_evidence(tmp_path):
    storage, name = _save(tmp_path)
    # Nothing hashed (a quick check only): no token.
    with record_hashed() as hashed:
        check_checkpoint(storage, name, full=False)
    assert issue_token(storage, name, hashed) is None
    # Hashed, then the manifest was replaced by another valid one: the recorded digests no longer match it.
    with record_hashed() as hashed:
        check_checkpoint(storage, name, full=True)
    man_path = os.path.join(storage.local_path(name), MANIFEST)
    doc = json.loads(Path(man_path).read_text())
    doc["files"][TREE_FILE]["xxh3"] = "0" * 16
    Path(man_path).write_text(json.dumps(doc))
    assert issue_token(storage, name, hashed) is None


def test_a_checkpoint_written_a_moment_ago_is_vouched_for_after_the_settle_margin(tmp_path, monkeypatch):
    monkeypatch.setattr(verified, "SETTLE_NS", 500_000_000)  # wide, so "a moment ago" holds on a loaded machine
    storage, name = _save(tmp_path)
    with record_hashed() as hashed:
        check_checkpoint(storage, name, full=True)
    assert issue_token(storage, name, hashed, wait=False) is None  # within the margin: not yet
    t0 = time.monotonic()
    assert issue_token(storage, name, hashed) is not None  # waits it out, then checks the identity again
    assert time.monotonic() - t0 < 1.5
    # Rewritten with the same bytes within the margin (the first recording above): no token at all, the job hashes.
    _flip(os.path.join(storage.local_path(name), TREE_FILE), 0)
    _flip(os.path.join(storage.local_path(name), TREE_FILE), 0)
    assert issue_token(storage, name, hashed) is None


def test_settle_margin():
    ident = FileIdentity(10, 1, 2, 5_000_000_000_123, 5_000_000_000_123)
    assert settled(ident, 5_000_000_000_123 + 30_000_000)
    assert not settled(ident, 5_000_000_000_123 + 10_000_000)  # changed within two ticks: not vouched for as it is
    whole = FileIdentity(10, 1, 2, 5_000_000_000, 5_000_000_000)  # a file system with whole-second stamps
    assert not settled(whole, 5_000_000_000 + 1_500_000_000)
    assert settled(whole, 5_000_000_000 + 2_500_000_000)


def test_settle_fresh_drops_only_the_records_it_cannot_wait_for():
    now = time.time_ns()

    def rec(stamp: int) -> Hashed:
        return Hashed(FileIdentity(10, 1, 2, stamp, stamp), "d" * 16, now)

    fresh = {
        "ok": rec(now - 1_000_123),  # written a moment ago: waited out, kept
        "soon": rec(now + 5_000_123),  # a few ms ahead (within the margin): kept, waited for
        "future": rec(now + 3_600 * 10**9 + 123),  # another clock, an hour ahead: dropped (its file is hashed)
        "coarse": rec((now // 10**9 - 1) * 10**9),  # whole seconds: dropped
    }
    t0 = time.monotonic()
    assert set(settle_fresh(fresh)) == {"ok", "soon"}
    assert time.time_ns() > now + 5_000_123 + verified.SETTLE_NS  # the kept stamps were waited out
    assert time.monotonic() - t0 < 1.0  # the future stamp is not waited for


def test_token_round_trip_and_bounds(tmp_path):
    tok = VerifiedToken(str(tmp_path), "a" * 64, {TENSORS_FILE: FileIdentity(1, 2, 3, 4, 5)}, 12.5)
    text = tok.to_env()
    assert text is not None and VerifiedToken.from_env(text) == tok
    many = {f"f{i}": FileIdentity(1, 2, 3, 4, 5) for i in range(600)}
    assert VerifiedToken(str(tmp_path), "a" * 64, many, 1.0).to_env() is None
    deep = "[" * 100_000
    assert VerifiedToken.from_env(deep) is None


# ------------------------------------------------------------------------------------------ end to end, counted
def _run(tmp_path: Path, directory: Path, *extra: str, env: dict | None = None) -> tuple[list[dict], Path]:
    log = tmp_path / "hashes.jsonl"
    full_env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([HASHCOUNT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        RESUMEKIT_TEST_HASH_LOG=str(log),
        HASHONCE_OUT=str(tmp_path),
        **(env or {}),
    )
    full_env.pop(ENV_VERIFIED, None)
    cmd = [
        sys.executable,
        "-m",
        "resumekit",
        "run",
        "--dir",
        str(directory),
        *extra,
        "--max-restarts",
        "2",
        "--backoff",
        "0",
    ]
    cmd += ["--", sys.executable, JOB]
    p = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((tmp_path / "restored.json").read_text())["step"] == 3
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return lines, tmp_path


def _restore_event(events_path: Path) -> dict:
    evs = [e for e in read_events(str(events_path)) if e.get("event") == "restore" and e.get("step")]
    assert len(evs) == 1, evs
    return evs[0]


def test_resumekit_run_hashes_each_checkpoint_byte_once_per_restart(tmp_path):
    """Acceptance: the supervisor verifies in full, the restarted job restores without hashing again."""
    ckpt = tmp_path / "ckpt"
    lines, _ = _run(tmp_path, ckpt)
    storage = LocalStorage(str(ckpt))
    total = _ckpt_bytes(storage, step_dirname(3))
    sup = [line for line in lines if line["attempt"] is None]
    job = [line for line in lines if line["attempt"] is not None]
    assert [line["bytes"] for line in sup] == [total], lines  # the supervisor: every byte once
    assert sum(line["bytes"] for line in job) == 0, lines  # the restarted job: none again
    ev = _restore_event(ckpt / "events.jsonl")
    assert ev["verified"] == "token" and ev["hashed_bytes"] == 0


@pytest.mark.parametrize("tier_kind,drop", [("tmpfs", False), ("tmpfs", True)])
def test_local_tier_restore_hashes_once_and_names_the_tier(tmp_path, tier_kind, drop):
    """With a local tier in /dev/shm (test_tiered covers a plain directory) the job restores from the tier, which
    the supervisor verified (or, when the tier lost its copy, downloaded from the durable copy, hashing it on the
    way), and the restore event says so."""
    if tier_kind == "tmpfs":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm")
        tier = Path("/dev/shm") / f"resumekit-test-{uuid.uuid4().hex[:12]}"
    else:
        tier = tmp_path / "tier"
    try:
        durable = tmp_path / "durable"
        env = {"HASHONCE_DROP_TIER": "1"} if drop else {}
        lines, _ = _run(tmp_path, durable, "--local-tier", str(tier), env=env)
        total = _ckpt_bytes(LocalStorage(str(tier)), step_dirname(3))
        sup = [line for line in lines if line["attempt"] is None]
        job = [line for line in lines if line["attempt"] is not None]
        assert sum(line["bytes"] for line in sup) == total, lines
        assert sum(line["bytes"] for line in job) == 0, lines
        ev = _restore_event(durable / "events.jsonl")  # the job logs where the supervisor does (RESUMEKIT_EVENTS)
        assert ev["tier"] == "local" and ev["verified"] == "token"
        assert ev["tier_in_memory"] is (tier_kind == "tmpfs")
        assert ev["path"] == str(tier / step_dirname(3))
        check_checkpoint(LocalStorage(str(durable)), step_dirname(3), full=True)  # the durable copy is there too
        downloads = [e for e in read_events(str(durable / "events.jsonl")) if e.get("event") == "download"]
        assert len(downloads) == int(drop)
    finally:
        subprocess.run(["rm", "-rf", str(tier)], check=False)
