"""Node-local tiers for sharded checkpoints and the agreement on the resume step (issue 17, acceptance 2).

1. :func:`plan_resume` (pure): the newest step every rank can read, each rank from its tier when its copy has the
   shared root's manifest; a step only some nodes hold is never proposed, a tier copy that differs from the shared
   step is never mixed with it.
2. A world of one: saves land in the shared root and a copy in the node tier; restore reads the tier copy, falls
   back to the shared root for a damaged copy, and uses a tier-only step when the shared root lost it.
3. ``torchrun --nproc-per-node 2`` (gloo, FSDP2), each rank its own tier (two simulated nodes): node 0 holds step
   12 locally, node 1 only step 8. Without 12 in the shared root both resume 8 from their tiers; with it (with
   ``RESUMEKIT_SOAK=1``; tests/test_dcp_remote.py runs it over s3 by default) both resume 12, node 1 from the shared
   root. Never a mix; the end state is bitwise the straight run's (made once per session, :func:`straight_two_nodes`);
   every rank logs one ``resume_agreed`` event naming the step in its node's log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import REPO, assert_same, make_training, state_tensors, train_steps
from resumekit import CheckpointManager
from resumekit.demo.distributed import torchrun_cmd, torchrun_env
from resumekit.distributed.nodetier import LOCAL, NODE_FILE, SHARED, AgreedStep, plan_resume, tier_groups
from resumekit.events import read_events
from resumekit.format import step_dirname

JOB = os.path.join(REPO, "tests", "jobs", "node_tier_train.py")
TAG = "RESUMEKIT_NODE_TIER_TEST_TAG"
SOAK = bool(os.environ.get("RESUMEKIT_SOAK"))


# ------------------------------------------------------------------------------------------------ pure plan
def test_plan_prefers_the_newest_step_readable_everywhere():
    # node A holds 12 and 8, node B only 8; the shared root holds 12 and 8
    shared = {8: "m8", 12: "m12"}
    plan = plan_resume(shared, [{8: "m8", 12: "m12"}, {8: "m8"}])
    assert plan[0] == AgreedStep(12, "m12", (LOCAL, SHARED))
    assert plan[1] == AgreedStep(8, "m8", (LOCAL, LOCAL))
    # without 12 in the shared root, 12 is held by one node only: never proposed
    plan = plan_resume({8: "m8"}, [{8: "m8", 12: "m12"}, {8: "m8"}])
    assert [a.step for a in plan] == [8]
    # held by every node with one manifest: readable from the tiers alone
    plan = plan_resume({8: "m8"}, [{8: "m8", 12: "m12"}, {12: "m12"}])
    assert plan[0] == AgreedStep(12, "m12", (LOCAL, LOCAL), in_shared=False)
    assert plan[1] == AgreedStep(8, "m8", (LOCAL, SHARED))


def test_plan_never_mixes_copies_of_different_saves():
    # node B's 12 is from an earlier save of step 12 (a rollback re-saved it): it reads the shared one
    assert plan_resume({12: "new"}, [{12: "new"}, {12: "old"}])[0].sources == (LOCAL, SHARED)
    # without the shared copy the two tier copies disagree: 12 is not readable everywhere
    assert plan_resume({}, [{12: "new"}, {12: "old"}]) == []
    # an unreadable shared manifest is still proposed (verification then skips it with the reason) ...
    assert plan_resume({12: None}, [{}, {}]) == [AgreedStep(12, None, (SHARED, SHARED))]
    # ... unless every node holds the step
    assert plan_resume({12: None}, [{12: "a"}, {12: "a"}]) == [AgreedStep(12, "a", (LOCAL, LOCAL), in_shared=False)]
    assert plan_resume({}, [{}, {}]) == []


_steps = st.dictionaries(st.integers(0, 6), st.sampled_from(["a", "b"]), max_size=5)


@given(
    shared=st.dictionaries(st.integers(0, 6), st.sampled_from(["a", "b", None]), max_size=5),
    local=st.lists(_steps, min_size=1, max_size=4),
)
def test_plan_proposes_only_steps_every_rank_reads_whole(shared, local):
    plan = plan_resume(shared, local)
    assert [a.step for a in plan] == sorted({a.step for a in plan}, reverse=True)
    for a in plan:
        for inv, src in zip(local, a.sources, strict=True):
            # each rank reads the agreed manifest: its tier copy only when it is that manifest
            assert (src == LOCAL and inv.get(a.step) == a.digest) or (src == SHARED and a.step in shared)
        assert a.in_shared == (shared.get(a.step) is not None) or a.digest is None
    # a step held by every node with one manifest, or in the shared root, is never left out
    for step in set(shared) | {s for inv in local for s in inv}:
        held = {inv.get(step) for inv in local}
        if step in shared or (len(held) == 1 and None not in held):
            assert step in {a.step for a in plan}


def test_a_node_tier_is_a_directory(tmp_path):
    from resumekit import ConfigError

    with pytest.raises(ConfigError, match="directory of this node"):
        CheckpointManager(str(tmp_path), distributed=True, local_tier="s3://bucket/tier")


def test_tier_groups_by_host_and_directory():
    ids = [("h1", "/t/a"), ("h1", "/t/a"), ("h2", "/t/a"), None]
    assert tier_groups(ids) == [[0, 1], [2]]


# ---------------------------------------------------------------------------------------------- a world of one
def _restore(root, tier, **kw):
    mgr = CheckpointManager(str(root), distributed=True, local_tier=str(tier), **kw)
    state = make_training()
    start = mgr.restore(state)
    mgr.close()
    return start, state


def _agreed(path):
    return [e for e in read_events(os.path.join(path, "events.jsonl")) if e["event"] == "resume_agreed"]


def test_world_of_one_keeps_steps_in_the_tier_and_reads_them(tmp_path):
    root, tier = tmp_path / "shared", tmp_path / "tier"
    straight = make_training()
    train_steps(straight, 6)
    a = make_training()
    mgr = CheckpointManager(str(root), every_steps=2, keep_last=3, distributed=True, local_tier=str(tier))
    train_steps(a, 6, mgr)
    mgr.close()
    # the tier keeps the newest max(2, keep_last) steps: a cache of the shared ones, with the same manifest
    assert sorted(os.listdir(tier)) == [step_dirname(2), step_dirname(4), step_dirname(6)]
    for s in (2, 4, 6):
        assert (tier / step_dirname(s) / "manifest.json").read_bytes() == (
            root / step_dirname(s) / "manifest.json"
        ).read_bytes()
    node = json.loads((tier / step_dirname(6) / NODE_FILE).read_text())
    assert node["world_size"] == 1 and "__0_0.distcp" in node["ranks"]["0"]

    start, b = _restore(root, tier)
    assert start == 6
    assert_same(state_tensors(a), state_tensors(b))
    ev = _agreed(str(tier))[-1]
    assert (ev["step"], ev["read"], ev["read_from"]) == (6, LOCAL, str(tier / step_dirname(6)))
    assert ev["source"] == "library" and ev["reads"] == [LOCAL] and ev["inventories"] == [[2, 4, 6]]
    assert _agreed(str(root))[-1]["step"] == 6

    # a damaged tier copy: the node's tier leader discards it and fetches it again from the shared directory
    shard = tier / step_dirname(6) / "__0_0.distcp"
    good = shard.read_bytes()
    _flip(shard)
    start, b = _restore(root, tier)
    ev = _agreed(str(tier))[-1]
    assert start == 6 and ev["read"] == LOCAL and ev["downloaded"] is True
    assert ev["refetched"]["from"] == str(root / step_dirname(6))
    assert "__0_0.distcp checksum mismatch" in ev["refetched"]["damaged"]
    assert shard.read_bytes() == good
    assert_same(state_tensors(a), state_tensors(b))

    # the shared root lost step 4 and 6: 6's tier copy is damaged (and cannot be fetched again), 4's is whole and
    # held by every (the one) node
    _flip(shard)
    shutil.rmtree(root / step_dirname(6))
    shutil.rmtree(root / step_dirname(4))
    start, c = _restore(root, tier)
    assert start == 4 and _agreed(str(tier))[-1]["read"] == LOCAL
    # and training on from it matches the straight run
    mgr = CheckpointManager(str(root), every_steps=2, distributed=True, local_tier=str(tier))
    train_steps(c, 6, mgr, start=4)
    mgr.close()
    assert_same(state_tensors(straight), state_tensors(c))


def _flip(path, at=None):
    """One bit flipped in place (same size): damage after the file was written."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 1
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------ under torchrun
def _tagged_pids(token):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if f"{TAG}={token}".encode() in f.read().split(b"\0"):
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _job_env(token):
    env = dict(torchrun_env(), **{TAG: token})
    for k in ("RESUMEKIT_RESUME_FROM", "RESUMEKIT_HEARTBEAT", "RESUMEKIT_EVENTS", "RESUMEKIT_DIR"):
        env.pop(k, None)
    return env


def _sweep(token):
    """SIGKILL what is left of a job; returns the pids that were left."""
    time.sleep(0.2)
    survivors = _tagged_pids(token)
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return survivors


@pytest.fixture
def tagged_env():
    token = uuid.uuid4().hex
    yield _job_env(token)
    survivors = _sweep(token)
    assert not survivors, f"processes survived the test: {survivors}"


_STRAIGHT: dict = {}


@pytest.fixture(scope="session")
def straight_two_nodes(tmp_path_factory):
    """One straight run of the two-node job (a shared directory; saves 4, 8, 12, 16; each tier keeps all four),
    made once per session: its end state is what every interrupted run of that job must reach (whatever its root),
    and its directories are the starting point of the agreement tests. (Other modules import this fixture, which
    makes it theirs: the run is remembered here so that it is made once all the same.)"""
    if "dir" not in _STRAIGHT:
        token = uuid.uuid4().hex
        d = tmp_path_factory.mktemp("straight")
        (d / "shared").mkdir()
        try:
            _torchrun(_job_env(token), d / "shared", d / "tiers")
        finally:
            survivors = _sweep(token)
        assert not survivors, f"processes survived the straight run: {survivors}"
        _STRAIGHT["dir"] = d
    return _STRAIGHT["dir"]


def _torchrun_cmd(shared, tiers, steps=16, out=None):
    """Two simulated nodes: one ``torchrun --nproc-per-node 2``, each rank its own tier ``tiers/node<R>``; the
    result files go to ``out`` (default: the shared root, which must then be a directory)."""
    args = [JOB, "--dir", str(shared), "--tier-root", str(tiers), "--steps", str(steps)]
    return torchrun_cmd(2, args + (["--out", str(out)] if out is not None else []))


def _torchrun(env, shared, tiers, steps=16, out=None):
    log_path = os.path.join(str(out or shared), "torchrun.log")
    with open(log_path, "ab") as log:
        r = subprocess.run(
            _torchrun_cmd(shared, tiers, steps, out), env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120
        )
    assert r.returncode == 0, open(log_path, errors="replace").read()[-6000:]


def _finals(shared):
    return [json.load(open(os.path.join(str(shared), f"final_rank{r}.json"))) for r in range(2)]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.timeout(240)
def test_two_nodes_resume_the_newest_step_valid_everywhere(tmp_path, tagged_env, straight_two_nodes):
    straight = straight_two_nodes
    s16 = step_dirname(16)
    # tests/test_dcp_remote.py runs the case with 12 in the root over s3 (node 1 downloads it); here the one where
    # both nodes read their tiers by default, both cases with RESUMEKIT_SOAK=1 (node 1 reading the shared directory;
    # the world-of-one tests below read it too).
    cases = ((("has12", True, 12),) if SOAK else ()) + (("lost12", False, 8),)
    for case, shared_has_12, expect in cases:
        d = tmp_path / case
        shutil.copytree(straight, d)
        shared, tiers = d / "shared", d / "tiers"
        for p in (shared / s16, tiers / "node0" / s16, tiers / "node1" / s16, tiers / "node1" / step_dirname(12)):
            shutil.rmtree(p)  # node 0 holds 12 and 8 locally, node 1 only 8
        if not shared_has_12:
            shutil.rmtree(shared / step_dirname(12))
        for r in range(2):
            os.remove(shared / f"final_rank{r}.json")
        for log in (shared / "events.jsonl", tiers / "node0" / "events.jsonl", tiers / "node1" / "events.jsonl"):
            log.unlink(missing_ok=True)
        _torchrun(tagged_env, shared, tiers)
        starts = [json.load(open(shared / f"start_rank{r}.json"))["step"] for r in range(2)]
        assert starts == [expect, expect], case
        evs = [_agreed(str(tiers / f"node{r}")) for r in range(2)]
        assert [len(e) for e in evs] == [1, 1] and {e["step"] for e in evs[0] + evs[1]} == {expect}
        want = [LOCAL, SHARED] if shared_has_12 else [LOCAL, LOCAL]
        assert [evs[r][0]["read"] for r in range(2)] == want and evs[0][0]["reads"] == want
        assert evs[0][0]["inventories"] == [[4, 8, 12], [4, 8]]
        assert [e["step"] for e in _agreed(str(shared))] == [expect]
        restored = [e for e in read_events(str(shared / "events.jsonl")) if e["event"] == "restore"]
        assert [e["step"] for e in restored] == [expect]
        assert _finals(shared) == _finals(straight / "shared"), case


def test_a_tier_copy_of_another_save_is_never_mixed_in(tmp_path):
    root, tier, other = tmp_path / "shared", tmp_path / "tier", tmp_path / "other"
    a = make_training()
    mgr = CheckpointManager(str(root), every_steps=2, distributed=True, local_tier=str(tier))
    train_steps(a, 4, mgr)
    mgr.close()
    # the tier's step 4 is replaced by another run's step 4 (as after a rollback and a re-save of step 4)
    b = make_training(seed=5)
    mgr = CheckpointManager(str(other / "shared"), every_steps=2, distributed=True, local_tier=str(other / "tier"))
    train_steps(b, 4, mgr)
    mgr.close()
    shutil.rmtree(tier / step_dirname(4))
    shutil.copytree(other / "tier" / step_dirname(4), tier / step_dirname(4))
    start, c = _restore(root, tier)
    ev = _agreed(str(tier))[-1]
    assert start == 4 and ev["read"] == SHARED and ev["inventories"] == [[2, 4]]
    assert_same(state_tensors(a), state_tensors(c))


def test_a_failed_or_killed_tier_copy_costs_nothing_but_speed(tmp_path, monkeypatch, caplog):
    from resumekit.distributed.nodetier import NodeTier

    root, tier = tmp_path / "shared", tmp_path / "tier"
    (tier / ".tmp-step_000000002-dead").mkdir(parents=True)  # a copy killed half-way in an earlier attempt
    real = NodeTier.keep_step

    def keep_step(self, shared, name, needs, world):
        if name == step_dirname(4):
            raise OSError(28, "No space left on device (injected)")
        return real(self, shared, name, needs, world)

    monkeypatch.setattr(NodeTier, "keep_step", keep_step)
    a = make_training()
    mgr = CheckpointManager(str(root), every_steps=2, distributed=True, local_tier=str(tier))
    with caplog.at_level("WARNING", logger="resumekit"):
        train_steps(a, 4, mgr)
    mgr.close()
    assert "could not keep step_000000004 in the node tier" in caplog.text
    assert sorted(os.listdir(tier)) == [step_dirname(2)]  # the stale tmp dir went with the next copy
    assert sorted(n for n in os.listdir(root) if n.startswith("step_")) == [step_dirname(2), step_dirname(4)]
    start, c = _restore(root, tier)
    assert start == 4 and _agreed(str(tier))[-1]["read"] == SHARED
    assert_same(state_tensors(a), state_tensors(c))
