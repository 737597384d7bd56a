"""Sharded checkpoints through torch.distributed.checkpoint (issue 7).

In-process tests (a world of one, no process group) cover the format, the loading-safety rules and the CLI; the
rest runs ``tests/jobs/dist_train.py`` under ``torchrun --nproc-per-node 2`` with the gloo backend on CPU:

1. DDP and FSDP2 jobs SIGKILLed (one worker, random steps, mid-save included) and restarted by torchrun's elastic
   agent end bitwise equal to a straight 2-process run;
2. an FSDP2 checkpoint written by 2 ranks restores on 1 and on 2 ranks, continuing the same global sample order;
3. a save failing on one rank commits nothing and raises on every rank, naming the rank;
4. SIGTERM to one rank: every rank saves the same step and exits 0;
5. ``resumekit demo --nproc 2`` passes.

Every torchrun gets a free rendezvous port and a unique environment tag; after each test every process carrying
the tag is SIGKILLed and the test fails if one was still alive.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch

from conftest import REPO, assert_same, make_training, state_tensors, train_steps
from resumekit import CheckpointManager, CorruptCheckpointError
from resumekit.data import ResumableSampler
from resumekit.demo.distributed import (
    batch_sequences,
    compare_final,
    run_torchrun_with_kills,
    torchrun_cmd,
    torchrun_env,
)
from resumekit.distributed import DCP_METADATA, MetadataUnpickler, read_sharded
from resumekit.format import MANIFEST, Manifest, new_hasher, step_dirname

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

JOB = os.path.join(REPO, "tests", "jobs", "dist_train.py")
TAG = "RESUMEKIT_DIST_TEST_TAG"
RUN_TIMEOUT = 120


# ------------------------------------------------------------------------------------------------- helpers
def _tagged_pids(token: str):
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if f"{TAG}={token}".encode() in f.read().split(b"\0"):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


@pytest.fixture
def tagged_env():
    """An environment for torchrun whose processes can all be found (and killed) after the test."""
    token = uuid.uuid4().hex
    env = torchrun_env()
    env[TAG] = token
    for k in ("RESUMEKIT_RESUME_FROM", "RESUMEKIT_HEARTBEAT", "RESUMEKIT_EVENTS", "RESUMEKIT_DIR"):
        env.pop(k, None)
    yield env
    time.sleep(0.2)
    survivors = _tagged_pids(token)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, f"processes survived the test: {survivors}"


def torchrun(env, directory, *args, nproc=2, max_restarts=0, check=True):
    """Run the test job under torchrun; returns the CompletedProcess (output in ``directory``/torchrun.log)."""
    os.makedirs(directory, exist_ok=True)
    log_path = os.path.join(directory, "torchrun.log")
    cmd = torchrun_cmd(nproc, [JOB, "--dir", str(directory), *map(str, args)], max_restarts=max_restarts)
    with open(log_path, "ab") as log:
        try:
            r = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"torchrun did not finish in {RUN_TIMEOUT}s; see {log_path}")
    if check and r.returncode != 0:
        with open(log_path, errors="replace") as f:
            pytest.fail(f"torchrun exited {r.returncode}:\n{f.read()[-6000:]}")
    return r


def final_fingerprints(directory, nproc=2):
    return [json.load(open(os.path.join(directory, f"final_rank{r}.json"))) for r in range(nproc)]


def step_dirs(directory):
    return sorted(n for n in os.listdir(directory) if n.startswith("step_"))


# ------------------------------------------------------------------------------------------ a world of one
def test_single_process_roundtrip_is_bitwise_and_cli_accepts_it(tmp_path):
    straight = make_training()
    train_steps(straight, 20)
    a = make_training()
    mgr = CheckpointManager(str(tmp_path), every_steps=7, distributed=True)
    assert mgr.restore(a) == 0
    train_steps(a, 10, mgr)
    mgr.close()
    man = json.loads((tmp_path / step_dirname(7) / MANIFEST).read_text())
    assert {
        DCP_METADATA,
        "__0_0.distcp",
        "distributed.json",
        "rank_00000/state.json",
        "rank_00000/tensors.safetensors",
    } <= set(man["files"])
    b = make_training()
    torch.manual_seed(1234)  # a restarted process has its RNG and weights elsewhere; restore must put them back
    with torch.no_grad():
        for p in b["model"].parameters():
            p.add_(1.0)
    mgr = CheckpointManager(str(tmp_path), every_steps=7, distributed=True)
    start = mgr.restore(b)
    assert start == 7
    train_steps(b, 20, mgr, start=start)
    mgr.close()
    assert_same(state_tensors(straight), state_tensors(b))

    cli = [sys.executable, "-m", "resumekit"]
    out = subprocess.run(cli + ["ls", str(tmp_path), "--full", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [(c["step"], c["valid"]) for c in json.loads(out.stdout)] == [(7, True), (14, True)]
    latest = subprocess.run(cli + ["latest", str(tmp_path)], capture_output=True, text=True)
    assert latest.stdout.strip() == str(tmp_path / step_dirname(14))
    shard = tmp_path / step_dirname(14) / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    bad = subprocess.run(cli + ["verify", str(tmp_path / step_dirname(14))], capture_output=True, text=True)
    assert bad.returncode == 1 and "__0_0.distcp checksum mismatch" in bad.stdout + bad.stderr
    # ... and restore skips it for the previous one, saying why
    mgr = CheckpointManager(str(tmp_path), distributed=True)
    assert mgr.restore(make_training()) == 7
    assert "__0_0.distcp checksum mismatch" in mgr.skipped[0].reason


def test_single_process_init_from_only_and_strict(tmp_path):
    from resumekit import StateMismatchError

    base = make_training()
    train_steps(base, 6)
    CheckpointManager(str(tmp_path / "base"), distributed=True).save(6, base)
    ft = make_training(seed=3)
    mgr = CheckpointManager(
        str(tmp_path / "ft"), distributed=True, init_from=str(tmp_path / "base"), init_keys=["model"]
    )
    assert mgr.restore(ft) == 0
    assert_same(base["model"].state_dict(), ft["model"].state_dict())
    assert ft["optim"].state_dict()["state"] == {}  # only the model came from the base run
    grown = make_training()
    grown["extra"] = torch.nn.Linear(2, 2)
    with pytest.raises(StateMismatchError, match=r"has no entry for \['extra'\]"):
        CheckpointManager(str(tmp_path / "base"), distributed=True).restore(grown)
    assert CheckpointManager(str(tmp_path / "base"), distributed=True).restore(grown, strict=False) == 6
    assert_same(base["optim"].state_dict(), grown["optim"].state_dict())


def _rewrite(ckpt, rel, data):
    """Replace a file and update the manifest to match: what an attacker with write access can do."""
    (ckpt / rel).write_bytes(data)
    mpath = ckpt / MANIFEST
    man = Manifest.from_json(mpath.read_bytes(), str(ckpt))
    h = new_hasher()
    h.update(data)
    man.files[rel].size, man.files[rel].xxh3 = len(data), h.hexdigest()
    mpath.write_bytes(man.to_json())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_forged_metadata_never_runs_code(tmp_path):
    st = make_training()
    mgr = CheckpointManager(str(tmp_path / "run"), distributed=True)
    train_steps(st, 3)
    mgr.save(3, st)
    ckpt = tmp_path / "run" / step_dirname(3)
    marker = tmp_path / "pwned"
    _rewrite(ckpt, DCP_METADATA, pickle.dumps(_Payload(marker)))
    with pytest.raises(CorruptCheckpointError, match=r"refers to posix\.system.*refusing to load it"):
        CheckpointManager(str(tmp_path / "run"), distributed=True).restore(make_training(), resume=str(ckpt))
    mgr = CheckpointManager(str(tmp_path / "run"), distributed=True)
    assert mgr.restore(make_training()) == 0  # auto: skipped with the reason, nothing else to resume
    assert "refers to posix.system" in mgr.skipped[0].reason
    assert not marker.exists()


def test_metadata_bytes_items_and_foreign_paths_are_refused(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    st = make_training()
    train_steps(st, 3)
    CheckpointManager(str(tmp_path), distributed=True).save(3, st)
    ckpt = tmp_path / step_dirname(3)
    good = (ckpt / DCP_METADATA).read_bytes()
    md = MetadataUnpickler(good, str(ckpt)).load()
    key = next(k for k in md.state_dict_metadata if k.startswith("model/"))

    md.state_dict_metadata[key] = BytesStorageMetadata()  # DCP would torch.load(weights_only=False) it
    _rewrite(ckpt, DCP_METADATA, pickle.dumps(md))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    with pytest.raises(CorruptCheckpointError, match=f"stores '{key}' as pickled bytes"):
        CheckpointManager(str(tmp_path), distributed=True).restore(make_training(), resume=str(ckpt))
    assert all(k.get("weights_only") is True for k in calls)

    md = MetadataUnpickler(good, str(ckpt)).load()
    info = next(iter(md.storage_data.values()))
    info.relative_path = "../../../etc/passwd"
    _rewrite(ckpt, DCP_METADATA, pickle.dumps(md))
    with pytest.raises(CorruptCheckpointError, match=r"unsafe path '\.\./\.\./\.\./etc/passwd'"):
        CheckpointManager(str(tmp_path), distributed=True).restore(make_training(), resume=str(ckpt))


def test_read_sharded_returns_whole_tensors_and_rank_trees(tmp_path):
    st = make_training()
    train_steps(st, 4)
    CheckpointManager(str(tmp_path), distributed=True).save(4, st)
    man, tensors, trees = read_sharded(str(tmp_path / step_dirname(4)))
    assert man.step == 4 and list(trees) == [0]
    assert torch.equal(tensors["model/0.weight"], st["model"].state_dict()["0.weight"])
    assert trees[0]["state"]["loader"] == st["loader"].state_dict()


# ----------------------------------------------------------------------------------------- under torchrun
@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted 2-process runs, one per parallelism, computed once."""
    cache = {}

    def get(parallel, *extra):
        key = (parallel,) + extra
        if key not in cache:
            d = tmp_path_factory.mktemp(f"straight_{parallel}")
            token = uuid.uuid4().hex
            env = dict(torchrun_env(), **{TAG: token})
            try:
                torchrun(env, d, "--parallel", parallel, "--steps", 30, "--every", 4, *extra)
            finally:
                for pid in _tagged_pids(token):
                    os.kill(pid, signal.SIGKILL)
            cache[key] = str(d)
        return cache[key]

    return get


@pytest.mark.timeout(240)
@pytest.mark.parametrize("parallel,extra,kill_seed", [("ddp", (), 11), ("fsdp", ("--async",), 12)])
def test_killed_workers_resume_bitwise(straight_runs, tmp_path, tagged_env, parallel, extra, kill_seed):
    straight = straight_runs(parallel, *extra)
    d = str(tmp_path)
    job = torchrun_cmd(
        2, [JOB, "--dir", d, "--parallel", parallel, "--steps", 30, "--every", 4, *extra], max_restarts=3
    )
    stats = run_torchrun_with_kills(
        [str(c) for c in job],
        d,
        nproc=2,
        crashes=3,
        rng=random.Random(kill_seed),
        env=dict(tagged_env, RESUMEKIT_TEST_SAVE_PAUSE="0.05"),
        log_path=os.path.join(d, "torchrun.log"),
        timeout=180,
        last_step=30,
    )
    log = open(os.path.join(d, "torchrun.log"), errors="replace").read()
    assert stats.exit_code == 0, log[-6000:]
    assert stats.kills == 3 and stats.kills_mid_save >= 1, stats.attempts
    assert {a["killed_rank"] for a in stats.attempts} <= {0, 1}
    assert compare_final(straight, d, 30) == []
    assert final_fingerprints(d) == final_fingerprints(straight)
    seq = batch_sequences(d, key="idx")
    assert seq == batch_sequences(straight, key="idx") and all(len(v) == 30 for v in seq.values())
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]


@pytest.mark.timeout(180)
def test_fsdp_checkpoint_of_2_ranks_restores_on_1_and_2(straight_runs, tmp_path, tagged_env):
    src = os.path.join(straight_runs("fsdp", "--async"), step_dirname(28))
    d = tmp_path / "run"
    d.mkdir()
    shutil.copytree(src, d / step_dirname(28))
    for n in (1, 2):
        torchrun(
            tagged_env,
            d,
            "--parallel",
            "fsdp",
            "--restore-only",
            "--peek",
            2 if n == 2 else 4,
            "--tag",
            f"w{n}",
            nproc=n,
        )
    one = json.load(open(d / "restored_w1_rank0.json"))
    two = [json.load(open(d / f"restored_w2_rank{r}.json")) for r in range(2)]
    assert one["step"] == two[0]["step"] == two[1]["step"] == 28 and one["world"] == 1
    assert one["full"] == two[0]["full"] == two[1]["full"]  # the same unsharded model and optimizer
    assert one["sched"] == two[0]["sched"] and one["loader"] == two[0]["loader"] == two[1]["loader"]
    # The global order continues: 28 steps x 8 samples = 224 = epoch 2 at position 32 (96 samples per epoch).
    sampler = ResumableSampler(96, seed=3)
    assert (one["loader"]["epoch"], one["loader"]["position"]) == (2, 32)
    expected = sampler.order(2)[32:48].tolist()
    assert [i for batch in one["next"] for i in batch] == expected  # one rank: the next 16 samples in global order
    for r in range(2):  # two ranks: rank r takes global positions r, r+2, ...; 2 batches of 4 = 16 samples
        assert [i for batch in two[r]["next"] for i in batch] == expected[r::2]
    # no sample skipped or repeated: what the 2-rank run consumed in epoch 2, then the 1-rank continuation
    seen = batch_sequences(straight_runs("fsdp", "--async"), key="idx")
    consumed = [i for r in range(2) for s, idx in seen[r].items() if 24 < s <= 28 for i in idx]
    assert sorted(consumed) == sorted(sampler.order(2)[:32].tolist())
    assert not set(consumed) & set(expected)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """One FSDP2 job whose rank 1 fails the saves of steps 4 (in DCP's shard write) and 8 (writing its rank
    files) with ENOSPC, then gets SIGTERM at step 10 (one launch serves the next two tests)."""
    d = tmp_path_factory.mktemp("faulty")
    token = uuid.uuid4().hex
    env = dict(torchrun_env(), **{TAG: token})
    try:
        r = torchrun(
            env,
            d,
            "--parallel",
            "fsdp",
            "--steps",
            40,
            "--every",
            4,
            "--fail-rank",
            1,
            "--fail",
            "4:dcp",
            "--fail",
            "8:files",
            "--term-rank",
            1,
            "--term-step",
            10,
            check=False,
        )
    finally:
        survivors = _tagged_pids(token)
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"processes survived: {survivors}"
    return d, r.returncode


def test_save_failing_on_one_rank_commits_nothing_and_names_it(faulty_run):
    d, _ = faulty_run
    assert 4 not in _committed(d) and 8 not in _committed(d)
    assert not [n for n in os.listdir(d) if n.startswith(".tmp-")]
    for step in (4, 8):
        texts = [(d / f"error_rank{r}_step{step}.txt").read_text() for r in range(2)]
        assert texts[0] == texts[1]  # the same error on the rank that failed and on the one that did not
        assert f"saving step {step} to {d / step_dirname(step)} failed on rank 1 of 2: " in texts[0]
        assert "No space left on device (injected)" in texts[0] and "the disk is full" in texts[0]
        assert "Nothing was committed on any rank" in texts[0]


def test_sigterm_to_one_rank_saves_the_same_step_everywhere(faulty_run):
    d, returncode = faulty_run
    assert returncode == 0, (d / "torchrun.log").read_text()[-4000:]
    assert _committed(d) == [10]
    man, _, trees = read_sharded(str(d / step_dirname(10)))
    assert man.step == 10 and sorted(trees) == [0, 1]
    assert {max(v) for v in batch_sequences(str(d), key="idx").values()} == {10}  # both ranks stopped at 10
    events = [json.loads(line) for line in open(d / "events.jsonl")]
    assert [e["step"] for e in events if e["event"] == "preempted"] == [10]


def _committed(d):
    return [int(n.split("_")[1]) for n in step_dirs(d)]


@pytest.mark.timeout(240)
def test_demo_nproc_2_passes(tmp_path, tagged_env):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "resumekit",
            "demo",
            "--nproc",
            "2",
            "--dir",
            str(tmp_path),
            "--crashes",
            "1",
            "--steps",
            "30",
            "--seed",
            "5",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=tagged_env,
        timeout=220,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["identical"] and out["nproc"] == 2 and out["kills"] == 1 and out["kills_mid_save"] == 1
    assert out["exit_code"] == 0 and out["differing_keys"] == []
