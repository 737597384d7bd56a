"""Sharded (DCP) checkpoints with an object store (``s3://``, ``obs://``; moto) as the durable root and node-local
tiers (issue 17): :mod:`resumekit.distributed.remote_commit` and the remote path of
:mod:`resumekit.checkpointers.dcp` / :mod:`resumekit.checkpointers.dcp_tiers`.

1. A world of one: the rank stages in its node tier and uploads its own files (async: on the persist thread); the
   stage becomes the tier copy; a restore reads the tier; a node whose tier lacks the step downloads it first (only
   its ranks' files at the saved world size, the whole step at another).
2. Failures: an upload cut by the network (fault proxy) commits nothing and names the rank; what a failed or killed
   upload leaves (``step_N/`` without its manifest) is never proposed and is removed by the next writer; no node
   tier is a one-line ConfigError.
3. ``resumekit run --dir s3://... --local-tier DIR``: the supervisor's pre-download (a whole copy, no ``node.json``)
   counts in the node tier's inventory, so the job reads it without downloading again; a node tier's own partial
   copy of the newest step is neither reported invalid nor downloaded again.
4. Under ``torchrun`` (gloo, FSDP2, two simulated nodes each with its own tier): a SIGKILL of the whole tree while
   the ranks upload step 16; on the restart node A holds 12 in its tier (one bit of it damaged), node B only 8, the
   s3 root has 12: both resume 12 (B downloads it, A fetches its damaged copy again), the partial 16 is never
   chosen, the end state is bitwise the straight run's. With
   ``RESUMEKIT_SOAK=1`` also: the s3 root lacks 12 -> both resume 8.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import agreed_events, assert_same, make_training, restore_through_tier, state_tensors, train_steps
from resumekit import CheckpointManager, ConfigError
from resumekit.distributed.nodetier import LOCAL, NODE_FILE, SHARED
from resumekit.events import read_events
from resumekit.format import step_dirname
from test_node_tiers import straight_two_nodes, tagged_env  # noqa: F401 - the two-node job's fixtures

SOAK = bool(os.environ.get("RESUMEKIT_SOAK"))


def torch_gloo() -> bool:
    import torch

    return torch.distributed.is_gloo_available()


def test_world_of_one_saves_to_s3_through_the_node_tier(s3_bucket, tmp_path):
    root, tier = s3_bucket.uri("run"), tmp_path / "tier"
    a = make_training()
    # async: the uploads run on the background persist thread, as the local persist does
    mgr = CheckpointManager(root, every_steps=2, keep_last=3, distributed=True, local_tier=str(tier), async_save=True)
    train_steps(a, 6, mgr)
    mgr.close()
    keys = s3_bucket.keys("run/step_")
    for s in (2, 4, 6):
        name = step_dirname(s)
        assert f"run/{name}/manifest.json" in keys and f"run/{name}/__0_0.distcp" in keys
        # the tier copy is the stage directory, committed with the remote manifest byte for byte
        assert (tier / name / "manifest.json").read_bytes() == s3_bucket.get(f"run/{name}/manifest.json")
        assert json.loads((tier / name / NODE_FILE).read_text())["world_size"] == 1
    assert not [n for n in os.listdir(tier) if n.startswith(".tmp-")]
    doc = json.loads(s3_bucket.get(f"run/{step_dirname(6)}/distributed.json"))
    assert "__0_0.distcp" in doc["reader_files"]["0"]

    start, b = restore_through_tier(root, tier)
    assert start == 6
    assert_same(state_tensors(a), state_tensors(b))
    ev = agreed_events(tier)[-1]
    assert (ev["step"], ev["read"], ev["downloaded"]) == (6, LOCAL, False)

    # another node (an empty tier) gets the step downloaded by its tier leader, then reads it locally
    other = tmp_path / "other"
    start, c = restore_through_tier(root, other)
    assert start == 6
    assert_same(state_tensors(a), state_tensors(c))
    ev = agreed_events(other)[-1]
    assert (ev["read"], ev["reads"], ev["downloaded"]) == (LOCAL, [SHARED], True)
    assert json.loads((other / step_dirname(6) / NODE_FILE).read_text())["ranks"]["0"]

    # at another world size a node fetches the whole step (DCP reshards from it): a full copy serves every rank
    from resumekit.distributed.nodetier import NodeTier
    from resumekit.distributed.remote_commit import fetch_step
    from resumekit.storage import open_storage

    third = NodeTier(str(tmp_path / "third"))
    assert fetch_step(open_storage(root), third, step_dirname(6), None, [0, 1], world=2) == "full"
    assert not (tmp_path / "third" / step_dirname(6) / NODE_FILE).exists()
    assert third.needs(step_dirname(6), 1, 2) == sorted(
        json.loads(s3_bucket.get(f"run/{step_dirname(6)}/manifest.json"))["files"]
    )
    assert sorted(third.inventory(1, 2)) == [6]


def test_an_object_store_root_needs_a_node_tier(s3_bucket, monkeypatch):
    monkeypatch.delenv("RESUMEKIT_LOCAL_TIER", raising=False)
    with pytest.raises(ConfigError, match="local_tier=DIR") as e:
        CheckpointManager(s3_bucket.uri("run"), distributed=True)
    assert "\n" not in str(e.value)


def test_a_failed_upload_commits_nothing_and_names_the_rank(s3_bucket, fault_proxy, tmp_path, monkeypatch):
    from resumekit import CheckpointWriteError

    root, tier = s3_bucket.uri("run"), tmp_path / "tier"
    a = make_training(width=5000)  # a DCP shard of ~0.3 MB, the rank files a few kB
    mgr = CheckpointManager(root, every_steps=2, distributed=True, local_tier=str(tier))
    train_steps(a, 2, mgr)
    mgr.close()
    # Requests pass, but a connection is cut after 100 kB sent: the shard's upload fails past its retries.
    proxy = fault_proxy(lambda n: ("up", 100_000))
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    monkeypatch.setenv("RESUMEKIT_S3_RETRIES", "3")
    mgr = CheckpointManager(root, distributed=True, local_tier=str(tier))
    with pytest.raises(CheckpointWriteError) as e:
        mgr.save(4, a, block=True)
    msg = str(e.value)
    assert msg.startswith(f"saving step 4 to {root}/{step_dirname(4)} failed on rank 0 of 1: ")
    assert "failed after 3 attempts" in msg and "Nothing was committed on any rank" in msg
    mgr.close()
    assert f"run/{step_dirname(4)}/manifest.json" not in s3_bucket.keys(f"run/{step_dirname(4)}/")
    assert sorted(n for n in os.listdir(tier) if n.startswith(("step_", ".tmp-"))) == [step_dirname(2)]
    # the link is back: the next start resumes 2 and removes whatever the failed upload left under step 4
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.server.endpoint)
    mgr = CheckpointManager(root, distributed=True, local_tier=str(tier))
    b = make_training(width=5000)
    assert mgr.restore(b) == 2
    mgr.close()
    assert not s3_bucket.keys(f"run/{step_dirname(4)}/")
    assert_same(state_tensors(a), state_tensors(b))


def test_a_partial_prefix_is_never_proposed_and_is_removed(s3_bucket, tmp_path):
    # obs:// (Huawei OBS's spelling) is the same code path as s3://; moto answers both here
    root, tier = f"obs://{s3_bucket.name}/run", tmp_path / "tier"
    a = make_training()
    mgr = CheckpointManager(root, every_steps=2, distributed=True, local_tier=str(tier))
    train_steps(a, 4, mgr)
    mgr.close()
    # what a kill mid-upload leaves: step 6's data objects, no manifest (and the stage dir in the tier)
    for key in s3_bucket.keys(f"run/{step_dirname(4)}/"):
        if not key.endswith("manifest.json"):
            s3_bucket.put(key.replace(step_dirname(4), step_dirname(6)), s3_bucket.get(key))
    (tier / ".tmp-step_000000006-dead").mkdir()
    mgr = CheckpointManager(root, distributed=True, local_tier=str(tier), read_only=True)
    assert [c.step for c in mgr.checkpointer.candidates()] == [4, 2]  # a reader: never proposed, nothing removed
    mgr.close()
    assert s3_bucket.keys(f"run/{step_dirname(6)}/")
    start, b = restore_through_tier(root, tier)
    assert start == 4 and not s3_bucket.keys(f"run/{step_dirname(6)}/")  # the writer removed it
    assert_same(state_tensors(a), state_tensors(b))
    skipped = [e for e in read_events(str(tier / "events.jsonl")) if e["event"] == "skip_invalid"]
    assert not skipped


# ------------------------------------------------------------------------------------------------ under torchrun
def _copy_prefix(bucket, src, dst, skip=()):
    """A server-side copy of one run prefix to another, leaving out the steps in ``skip``."""
    for key in bucket.keys(f"{src}/"):
        if not any(f"/{step_dirname(s)}/" in key for s in skip):
            bucket.client.copy_object(
                Bucket=bucket.name, Key=dst + key[len(src) :], CopySource={"Bucket": bucket.name, "Key": key}
            )


def _kill_tree(token):
    """SIGKILL every process of the job (agent and workers) at once, as a lost node."""
    import signal

    from test_node_tiers import _tagged_pids

    for pid in _tagged_pids(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run_events(out):
    path = os.path.join(str(out), "events.jsonl")
    return read_events(path) if os.path.exists(path) else []


@pytest.mark.skipif(not torch_gloo(), reason="needs torch.distributed with gloo")
@pytest.mark.timeout(300)
def test_two_nodes_over_s3_agree_on_the_step_and_survive_a_kill_mid_upload(
    s3_bucket,
    moto_server,
    tmp_path,
    tagged_env,  # noqa: F811 - test_node_tiers' fixture
    straight_two_nodes,  # noqa: F811 - test_node_tiers' fixture
):
    import subprocess
    import time

    from test_node_tiers import TAG, _finals, _torchrun, _torchrun_cmd

    env = dict(tagged_env, **moto_server.env())
    # The straight run's end state (it does not depend on the root: a shared directory, run once per session).
    want = _finals(straight_two_nodes / "shared")

    # A SIGKILL of the whole tree (agent and both ranks) while the ranks upload step 16.
    d = tmp_path / "killed"
    (d / "out").mkdir(parents=True)
    s12, s16 = step_dirname(12), step_dirname(16)
    slow = dict(env, RESUMEKIT_TEST_SAVE_PAUSE="0.35")
    with open(d / "out/torchrun.log", "ab") as log:
        proc = subprocess.Popen(
            _torchrun_cmd(s3_bucket.uri("killed"), d / "tiers", out=d / "out"),
            env=slow,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        prefix = f"killed/{s16}/"
        while not s3_bucket.keys(prefix):
            assert proc.poll() is None and time.monotonic() < deadline, "step 16 was never uploaded"
            time.sleep(0.05)
        _kill_tree(env[TAG])
        proc.wait(timeout=30)
    partial = s3_bucket.keys(prefix)
    assert partial and f"{prefix}manifest.json" not in partial  # killed mid-upload: no commit
    assert any(n.startswith(".tmp-") for r in range(2) for n in os.listdir(d / f"tiers/node{r}"))

    # Acceptance 2 over s3 on the restart: node 0 holds 12 in its tier, node 1 only 8 (the test removes its 12);
    # the s3 root has 12 -> both resume 12, node 1 after its tier leader downloaded it. The partial 16 is never
    # chosen, and the end state is bitwise the straight run's. Node 0's copy of 12 is damaged too (one bit of its
    # shard): node 0's leader fetches it again while node 1's downloads it, and the step is still the agreed one.
    shutil.rmtree(d / "tiers/node1" / s12)
    shard = d / "tiers/node0" / s12 / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    _torchrun(
        dict(env, RESUMEKIT_EVENTS=str(d / "out/events.jsonl")), s3_bucket.uri("killed"), d / "tiers", out=d / "out"
    )
    _check_agreed(d, 12, downloaded=[True, True])
    refetched = [agreed_events(d / f"tiers/node{r}")[0]["refetched"] for r in range(2)]
    assert refetched[1] is None and refetched[0]["from"] == f"{s3_bucket.uri('killed')}/{s12}"
    assert "__0_0.distcp checksum mismatch" in refetched[0]["damaged"]
    events = _run_events(d / "out")
    assert not [e for e in events if e["event"] == "skip_invalid"]  # the partial step was never proposed
    assert [e["step"] for e in events if e["event"] == "restore"] == [12]
    assert _finals(d / "out") == want
    # the restart committed 16 again; no stage directory is left in any tier
    assert f"{prefix}manifest.json" in s3_bucket.keys(prefix)
    assert not [n for r in range(2) for n in os.listdir(d / f"tiers/node{r}") if n.startswith(".tmp-")]

    if not SOAK:
        return
    # The s3 root without 12: both resume 8 from their tiers (the same plan as with a shared directory, which
    # tests/test_node_tiers.py runs by default).
    straight = tmp_path / "straight"
    (straight / "out").mkdir(parents=True)
    _torchrun(env, s3_bucket.uri("straight"), straight / "tiers", out=straight / "out")  # saves 4, 8, 12, 16
    assert _finals(straight / "out") == want
    d = tmp_path / "lost12"
    (d / "out").mkdir(parents=True)
    shutil.copytree(straight / "tiers", d / "tiers")
    for p in (d / "tiers/node0" / s16, d / "tiers/node1" / s16, d / "tiers/node1" / s12):
        shutil.rmtree(p)
    for r in range(2):
        (d / f"tiers/node{r}/events.jsonl").unlink(missing_ok=True)
    _copy_prefix(s3_bucket, "straight", "lost12", skip=(12, 16))
    _torchrun(
        dict(env, RESUMEKIT_EVENTS=str(d / "out/events.jsonl")), s3_bucket.uri("lost12"), d / "tiers", out=d / "out"
    )
    _check_agreed(d, 8, downloaded=[False, False])
    assert _finals(d / "out") == want


def _check_agreed(d, expect, downloaded):
    """Both ranks resumed ``expect``, each node tier's log has one ``resume_agreed`` naming it, read locally."""
    starts = [json.load(open(d / f"out/start_rank{r}.json"))["step"] for r in range(2)]
    assert starts == [expect, expect]
    evs = [agreed_events(d / f"tiers/node{r}") for r in range(2)]
    assert [len(e) for e in evs] == [1, 1] and {e["step"] for e in evs[0] + evs[1]} == {expect}
    assert evs[0][0]["inventories"][0][-1] == 12 and 12 not in evs[0][0]["inventories"][1]
    assert [e[0]["downloaded"] for e in evs] == downloaded and {e[0]["read"] for e in evs} == {LOCAL}


# ------------------------------------------------------------------------------------------------ under the supervisor
def test_the_supervisors_predownload_counts_in_the_node_tier(s3_bucket, moto_server, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    root, tier, out = s3_bucket.uri("run"), tmp_path / "tier", tmp_path / "start.txt"
    a = make_training()
    mgr = CheckpointManager(root, every_steps=2, distributed=True, local_tier=str(tmp_path / "elsewhere"))
    train_steps(a, 4, mgr)
    mgr.close()
    env = dict(os.environ, **moto_server.env())
    for k in (
        "RESUMEKIT_RESUME_FROM",
        "RESUMEKIT_HEARTBEAT",
        "RESUMEKIT_EVENTS",
        "RESUMEKIT_DIR",
        "RESUMEKIT_LOCAL_TIER",
    ):
        env.pop(k, None)
    job = [sys.executable, os.path.join(REPO, "tests", "jobs", "dcp_remote_job.py")]

    def run(cmd):
        sup = [sys.executable, "-m", "resumekit", "run", "--no-warm", "--dir", root, "--local-tier", str(tier), "--"]
        r = subprocess.run(sup + cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r, read_events(str(tier / "events.jsonl"))

    # first start: the supervisor downloads step 4 (a whole copy, no node.json); the job reads it, fetching nothing
    _, events = run(job + ["6", str(out)])
    assert int(out.read_text()) == 4
    assert [e["step"] for e in events if e["event"] == "download"] == [4]
    assert not (tier / step_dirname(4) / NODE_FILE).exists()
    ev = [e for e in events if e["event"] == "resume_agreed"]
    assert len(ev) == 1 and (ev[0]["step"], ev[0]["read"], ev[0]["downloaded"]) == (4, LOCAL, False)
    assert ev[0]["inventories"] == [[4]]
    # the supervisor hashed the copy while downloading it: its token (RESUMEKIT_VERIFIED) spares the job a second pass
    assert ev[0]["hashed_bytes"] == 0

    # The tier's step 6 is this node's copy (node.json), made partial here as a node of a larger job holds it: the
    # supervisor neither reports it invalid nor downloads the whole step again, and hands it to the job (which
    # fetches what its ranks lack, as test_world_of_one_saves_to_s3_through_the_node_tier shows). A job that only
    # prints the hand-off: nothing to import.
    os.remove(tier / step_dirname(6) / "rank_00000" / "state.json")
    n = len(events)
    r, events = run([sys.executable, "-c", "import os; print(os.environ['RESUMEKIT_RESUME_FROM'])"])
    assert r.stdout.strip().splitlines()[-1] == str(tier / step_dirname(6))
    assert not [e for e in events[n:] if e["event"] in ("download", "skip_invalid")]
