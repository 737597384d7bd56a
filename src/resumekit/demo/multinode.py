"""Several "nodes" on one machine: the multi-node demonstration behind ``resumekit demo --nnodes N``.

Each node is its own ``torchrun`` agent (``--nnodes N``, c10d rendezvous on ``127.0.0.1``), wrapped by its own
``resumekit run``, exactly the launch line a cluster runs on every node; the checkpoint root is shared (a directory,
or an object store such as ``s3://`` with a local tier per node) and each node keeps its supervisor files (event
log, heartbeat, hang stack dumps) and, when it has one, its tier in a directory of its own. A node loss is a
SIGKILL of everything below that node's supervisor (the agent and its workers at once), as when a host dies:

* the other nodes' workers fail their next collective at once (the dead peer's sockets are closed; a peer that froze
  with its sockets open is caught by the collective timeout or the heartbeat), so their agents exit;
* torchrun runs with ``--max-restarts 0``: the supervisors own every restart, and every node restarts;
* node 0 hosts the rendezvous store (``is_host=1``, the others ``is_host=0``), and its restarted agent binds the same
  port again; a node waiting in rendezvous for a peer that does not come back gives up after ``join_timeout``, so
  its supervisor's restart budget bounds the wait.

The demo trains the DDP job of :mod:`resumekit.demo.distributed` straight on N nodes, then again under the
supervisors while SIGKILLing whole nodes at random moments (node 0, the store host, included; some kills mid-save),
and compares the final checkpoints bit for bit (the launch lines and the node processes are in
:mod:`resumekit.demo.nodes`; what the kill loop observes of the root, and how an object store's final steps are read
back, in :mod:`resumekit.demo.roots`). It measures how long the survivors took to notice a loss (their agent
gone) and how long until every rank trained again, and, with node tiers, checks that every node's events name the
same agreed resume step at every restart.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ResumekitError
from ..events import ENV_LOCAL_TIER, EVENTS_FILE, read_events
from ..storage import is_remote
from ..supervisor.proctree import pid_alive
from .core import CrashStats, ProgressTail, closing_fields, count_events, final_diffs, fresh_run_dirs, report
from .distributed import (
    PROGRESS_PATTERN,
    compare_final,
    demo_env,
    free_port,
    job_args,
    read_progress,
    same_batches,
)
from .nodes import NODE_DIR, LocalCluster, NodeLaunch, node_commands, node_torchrun_cmd, supervised_cmd
from .roots import RootWatch, clear_root, join_root, local_copy, newest_step

_POLL_S = 0.01
_LIST_S = 0.05  # seconds between bucket listings while a kill waits for an upload


def rank_generations(directory: str) -> list[dict[int, int]]:
    """Each start of the job as ``{rank: step it resumed from}``, in order, from the progress logs.

    A generation is the set of pids that reported between two restarts; every rank of one generation must have
    resumed from the same step, so each dict should hold one value. The step resumed from is the first step a
    process trained, minus one.

    Args:
        directory: the run directory.

    Returns:
        One ``{rank: resumed from}`` per generation.
    """
    per_rank: dict[int, list[int]] = {}
    for rank, recs in read_progress(directory).items():
        seen: set[int] = set()
        for rec in recs:
            if rec["pid"] not in seen:
                seen.add(rec["pid"])
                per_rank.setdefault(rank, []).append(int(rec["step"]) - 1)
    n = max((len(v) for v in per_rank.values()), default=0)
    return [{r: v[g] for r, v in per_rank.items() if g < len(v)} for g in range(n)]


@dataclass
class NodeKill:
    """One whole-node SIGKILL and what followed it."""

    node: int
    at_step: int
    mid_save: bool
    """A save was being written when the kill landed (its tmp or staging directory was there just before the
    kill) and that step was not committed once the survivors were gone."""
    pids: list[int] = field(default_factory=list)
    mid_upload: bool | None = None
    """(Object store) also: that step's objects were in the bucket before the kill, without its manifest (None:
    a directory root, where a save is no upload)."""
    notice_s: float | None = None
    """Seconds until every other node's agent had exited (None: not within the wait)."""
    recovered_s: float | None = None
    """Seconds until every rank trained a step again (None: not within the wait)."""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"node": self.node, "at_step": self.at_step, "mid_save": self.mid_save}
        if self.mid_upload is not None:
            out["mid_upload"] = self.mid_upload
        out["notice_s"] = None if self.notice_s is None else round(self.notice_s, 2)
        out["recovered_s"] = None if self.recovered_s is None else round(self.recovered_s, 2)
        return out


def run_nodes_with_kills(
    cluster: LocalCluster,
    watch: RootWatch,
    progress_dir: str,
    *,
    world: int,
    crashes: int,
    rng: random.Random,
    timeout: float = 300.0,
    last_step: int | None = None,
    recover_timeout: float = 120.0,
) -> CrashStats:
    """Start ``cluster`` and SIGKILL a whole node ``crashes`` times; wait for the job to end.

    The victims take turns from a random first node, so with two or more kills node 0 (the rendezvous store's
    host) and another node are both lost. The first kill, and about 40% of the others, are aimed at a save in
    progress (with an object-store root: at its upload, objects in the bucket and no manifest yet), the rest at a
    random number of steps ahead. After each kill the loop measures when the other nodes' agents had exited and
    when every rank trained again, and only then aims the next kill.

    Args:
        cluster: the nodes, not started yet.
        watch: what the loop observes of the checkpoints (committed steps, saves and uploads in progress).
        progress_dir: where the workers write their progress logs.
        world: ranks of the whole job.
        crashes: how many node kills.
        rng: picks the kind, the moment and the first victim.
        timeout: seconds the whole run may take.
        last_step: the job's length; kills aimed at a step never aim past ``last_step - 2``.
        recover_timeout: seconds to wait for the survivors and the restart after one kill.

    Returns:
        The kills (``attempts`` holds :meth:`NodeKill.as_dict` records) and the worst node exit code (0 when every
        node finished). Every process started is gone when it returns.
    """
    stats = CrashStats()
    tail = ProgressTail(progress_dir, PROGRESS_PATTERN)
    nnodes = len(cluster.commands)
    first_victim = rng.randrange(nnodes)
    deadline = time.monotonic() + timeout
    dead: set[int] = set()
    committed_at_kill = -1
    cluster.start()
    try:
        while stats.kills < crashes and cluster.running() and time.monotonic() < deadline:
            tail.poll()
            live = {rank: (pid, step) for pid, (rank, step) in tail.latest.items() if pid not in dead}
            # Every kill after the first waits for a checkpoint newer than the last kill's: each restart then
            # resumes from a later step, not from scratch again.
            if len(live) < world or (stats.kills and watch.committed() <= committed_at_kill):
                time.sleep(_POLL_S)
                continue
            aim_at_save = stats.kills == 0 or rng.random() < 0.4
            target = max(s for _, s in live.values()) + rng.randint(1, 8)
            if last_step is not None:
                target = min(target, last_step - 2)
            victim = (first_victim + stats.kills) % nnodes
            next_list = 0.0
            while cluster.running() and time.monotonic() < deadline:
                tail.poll()
                now = max(s for p, (_, s) in tail.latest.items() if p not in dead)
                if aim_at_save:
                    staged = watch.staging()
                    if staged is not None and not watch.remote:
                        break
                    # A bucket listing at most every _LIST_S: a real store throttles (and the listing competes with
                    # the uploads it waits for), the staging directory above is only a local stat.
                    if staged is not None and time.monotonic() >= next_list:
                        next_list = time.monotonic() + _LIST_S
                        if watch.uploading(staged):
                            break
                elif now >= target:
                    break
                time.sleep(0.002)
            else:
                break
            survivors = {i: cluster.agent_pids(i) for i in range(nnodes) if i != victim}
            at_step = max(s for p, (_, s) in tail.latest.items() if p not in dead)
            staged = watch.staging()
            # Seen before the kill (a listing takes a few ms): the step's objects are in the bucket, no manifest.
            uploading = watch.remote and staged is not None and watch.uploading(staged)
            at_kill = watch.staging_names()
            t_kill = time.monotonic()
            pids = cluster.kill_node(victim)
            if not pids:
                continue  # the node finished first: not a kill
            committed_at_kill = watch.committed(fresh=True)  # after the kill: at least what was committed at it
            dead |= {p for p, _ in live.values()}  # the whole generation goes down with the lost node
            kill = NodeKill(victim, at_step, staged is not None, pids, mid_upload=uploading if watch.remote else None)
            stats.kills += 1
            verdict: list[bool | None] = []

            def settle(
                late: bool = False,
                staged: int | None = staged,
                verdict: list[bool | None] = verdict,
                at_kill: set[str] = at_kill,
            ) -> None:
                # Once no process of the job is left to commit it: was the save the kill landed in committed?
                verdict.append(None if staged is None else watch.is_committed(staged))
                # Every staging directory left once the survivors are gone is a dead save's; later, the restarted
                # job may have a live one: then only those seen at the kill.
                watch.forget_staging(at_kill if late else None)

            until = min(deadline, t_kill + recover_timeout)
            _follow_recovery(kill, tail, survivors, dead, world, t_kill, until, on_notice=settle)
            if not verdict:
                settle(late=True)  # the survivors were not seen gone: later, so less likely to find it interrupted
            # Only a save that never committed was interrupted (unknown counts as not).
            kill.mid_save = staged is not None and verdict[0] is False
            kill.mid_upload = (kill.mid_save and uploading) if watch.remote else None
            stats.kills_mid_save += int(kill.mid_save)
            stats.attempts.append(kill.as_dict())
        cluster.wait(max(1.0, deadline - time.monotonic()))
    finally:
        cluster.stop()
    codes = [p.returncode for p in cluster.procs]
    stats.exit_code = 0 if codes and all(c == 0 for c in codes) else next((c for c in codes if c), -1)
    stats.restarts = stats.kills
    return stats


def _follow_recovery(
    kill: NodeKill,
    tail: ProgressTail,
    survivors: dict[int, list[int]],
    dead: set[int],
    world: int,
    t_kill: float,
    until: float,
    on_notice: Callable[[], None] | None = None,
) -> None:
    """Fill ``kill.notice_s`` (every surviving node's agent gone) and ``kill.recovered_s`` (every rank reported a
    step from a new process), waiting at most until ``until``; ``on_notice`` runs once when the survivors are gone."""
    while time.monotonic() < until:
        now = time.monotonic()
        if kill.notice_s is None and not any(pid_alive(p) for pids in survivors.values() for p in pids):
            kill.notice_s = now - t_kill
            if on_notice is not None:
                on_notice()
        tail.poll()
        fresh = {rank for pid, (rank, _) in tail.latest.items() if pid not in dead}
        if len(fresh) >= world:
            kill.recovered_s = now - t_kill
            return
        time.sleep(_POLL_S)


def agreed_resumes(tiers: Sequence[str], nproc: int) -> tuple[list[list[int]], list[str]]:
    """Every node's ``resume_agreed`` steps, one per restore, from the node tiers' event logs, and what is wrong.

    Each of a node's ``nproc`` ranks logs one event per restore (which global rank a node's process gets changes
    from start to start: the rendezvous hands ranks out), so a node's log holds ``nproc`` consecutive events per
    restore, which must name one step. A step is wrong for a rank when the rank neither held it in its tier (its
    inventory in the event), nor read it from the shared directory, nor had its node download it from the object
    store: a step only some nodes hold.

    Args:
        tiers: every node's tier directory.
        nproc: ranks per node.

    Returns:
        ``([[step, ...] per node], problems)``.
    """
    per_node: list[list[int]] = []
    problems: list[str] = []
    for node, tier in enumerate(tiers):
        events = [e for e in read_events(os.path.join(tier, EVENTS_FILE)) if e.get("event") == "resume_agreed"]
        for e in events:
            rank, step = int(e["rank"]), int(e["step"])
            inventories = e.get("inventories") or []
            held = rank < len(inventories) and step in (inventories[rank] or [])
            if not (held or e.get("downloaded") or str(e.get("read", "")).startswith("shared")):
                problems.append(
                    f"node {node} rank {rank} resumed step {step} without holding, reading or downloading it"
                )
        steps = []
        for k in range(0, len(events), nproc):
            chunk = {int(e["step"]) for e in events[k : k + nproc]}
            if len(chunk) != 1 or len(events[k : k + nproc]) != nproc:
                problems.append(f"node {node}: its ranks logged {sorted(chunk)} for one restore")
            steps.append(max(chunk))
        per_node.append(steps)
    return per_node, problems


# -------------------------------------------------------------------------------------------- the demo
def run_multinode_demo(
    directory: str,
    *,
    nnodes: int,
    nproc: int = 1,
    crashes: int = 3,
    steps: int = 60,
    seed: int | None = None,
    as_json: bool = False,
    save_every: int = 5,
    async_save: bool = False,
    root: str | None = None,
    node_tiers: bool = False,
) -> int:
    """A straight N-node run vs one whose nodes are SIGKILLed whole and restarted by their supervisors.

    Args:
        directory: where both runs write their local files (``straight/`` and ``crashy/``: progress logs, and the
            checkpoints when ``root`` is None; ``*-nodes/node{i}/``: each node's supervisor files and tier), emptied
            first.
        nnodes: nodes (separate torchrun agents on this machine).
        nproc: processes per node.
        crashes: how many whole-node SIGKILLs.
        steps: the job's length.
        seed: the kill seed (random when None; printed so a run can be repeated).
        as_json: print one JSON object instead of the table.
        save_every: the job's checkpoint interval.
        async_save: the job writes checkpoints in the background.
        root: the shared checkpoint root: a directory or an object-store URI (``s3://bucket/prefix``, configured
            by the standard AWS variables); the runs write under ``root/straight`` and ``root/crashy`` (emptied
            first). None: ``directory``.
        node_tiers: give every node a local tier of its own (``*-nodes/node{i}/tier``); always on for an
            object-store root, which needs one.

    Returns:
        0 only if both runs end bitwise identical, every rank saw the same batches, every restart resumed all
        ranks from one step (with node tiers: the step every node's events name), and every node exited 0.
    """
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    work = fresh_run_dirs(directory)  # (straight, crashy): progress logs, and the checkpoints without a root
    nodes = tuple(w + "-nodes" for w in work)
    for d in nodes:
        shutil.rmtree(d, ignore_errors=True)
    remote = root is not None and is_remote(root)
    tiered = node_tiers or remote
    if root is None:
        ckpts = work
    else:
        try:
            clear_root(root, "straight", "crashy")
        except (OSError, ResumekitError) as e:  # a bucket that does not exist, no credentials, no endpoint
            print(f"resumekit demo: cannot prepare the checkpoint root {root}: {e}", file=sys.stderr)
            return 1
        ckpts = (join_root(root, "straight"), join_root(root, "crashy"))
        if not remote:
            for c in ckpts:
                os.makedirs(c)
    tiers = [[os.path.join(n, NODE_DIR.format(i), "tier") for i in range(nnodes)] for n in nodes]
    env = demo_env()
    env.pop(ENV_LOCAL_TIER, None)  # only the tiers the demo gives each node
    world = nnodes * nproc

    def node_env(run: int) -> list[dict[str, str]] | None:
        # The job reads its node's tier from RESUMEKIT_LOCAL_TIER: set per node here, and exported by resumekit run
        # --local-tier under the supervisors for an object-store root.
        return [{ENV_LOCAL_TIER: t} for t in tiers[run]] if tiered else None

    t0 = time.monotonic()
    launch = NodeLaunch(nnodes=nnodes, nproc=nproc, endpoint=f"127.0.0.1:{free_port()}", run_id="straight")
    job = job_args(ckpts[0], steps, save_every, 0, async_save, progress=work[0])
    ref = LocalCluster(node_commands(launch, job, ckpts[0], nodes[0], supervised=False), nodes[0], env, node_env(0))
    ref.start()
    try:
        codes = ref.wait(600.0)
    finally:
        ref.stop()
    t_straight = time.monotonic() - t0
    if any(c != 0 for c in codes):
        print(
            f"resumekit demo: the straight {nnodes}-node run failed (exit codes {codes}); see {nodes[0]}/node*/",
            file=sys.stderr,
        )
        return 1

    t0 = time.monotonic()
    launch = NodeLaunch(nnodes=nnodes, nproc=nproc, endpoint=f"127.0.0.1:{free_port()}", run_id="crashy")
    job = job_args(ckpts[1], steps, save_every, 0, async_save, progress=work[1])
    cmds = node_commands(
        launch,
        job,
        ckpts[1],
        nodes[1],
        supervised=True,
        max_restarts=3 * crashes + 3,
        # an object store: the supervisor needs the tier (pre-download, inventory); a directory root's tier is the
        # job's alone (the supervisor resumes from the shared directory)
        local_tiers=tiers[1] if remote else None,
    )
    # A pause between the files of a save (and, to an object store, between uploaded files) widens the window the
    # kills aim at; the job's state, and so the bitwise comparison, does not depend on it.
    cluster = LocalCluster(cmds, nodes[1], dict(env, RESUMEKIT_TEST_SAVE_PAUSE="0.05"), node_env(1))
    watch = RootWatch(ckpts[1], tiers[1])
    stats = run_nodes_with_kills(
        cluster, watch, work[1], world=world, crashes=crashes, rng=rng, timeout=900, last_step=steps
    )
    t_crashy = time.monotonic() - t0
    stats.skipped_invalid = sum(count_events(cluster.node_dir(i), "skip_invalid") for i in range(nnodes))

    def compare(a: str, b: str, step: int) -> list[str]:
        # an object store's final steps are downloaded (verified) through the storage layer, then read locally
        return compare_final(
            local_copy(a, step, os.path.join(directory, "straight-final")),
            local_copy(b, step, os.path.join(directory, "crashy-final")),
            step,
        )

    diffs = final_diffs(compare, ckpts[0], ckpts[1], steps)
    batches_equal = same_batches(work[0], work[1], world=world, steps=steps)
    gens = rank_generations(work[1])
    resume_steps = [sorted(set(g.values())) for g in gens]
    one_step_each = all(len(s) == 1 for s in resume_steps)
    agreed: list[list[int]] | None = None
    agreed_ok: bool | None = None
    if tiered:
        agreed, problems = agreed_resumes(tiers[1], nproc)
        # every restart that resumed a checkpoint: one resume_agreed per rank, the same step on every node, the
        # steps the progress logs show
        resumed = [s[0] for s in resume_steps[1:] if len(s) == 1 and s[0] > 0]
        agreed_ok = not problems and all(v == resumed for v in agreed)
    notice = [a["notice_s"] for a in stats.attempts if a["notice_s"] is not None]
    recovered = [a["recovered_s"] for a in stats.attempts if a["recovered_s"] is not None]
    mid_upload = sum(bool(a.get("mid_upload")) for a in stats.attempts) if remote else None
    result: dict[str, Any] = {
        "identical": not diffs and batches_equal and one_step_each and stats.exit_code == 0 and agreed_ok is not False,
        "nnodes": nnodes,
        "nproc": nproc,
        "root": root if root is not None else os.path.abspath(directory),
        "node_tiers": tiered,
        "kills": stats.kills,
        "kills_mid_save": stats.kills_mid_save,
        "kills_mid_upload": mid_upload,
        "nodes_killed": sorted({a["node"] for a in stats.attempts}),
        "skipped_invalid": stats.skipped_invalid,
        "exit_code": stats.exit_code,
        "differing_keys": diffs,
        "batch_sequence_equal": batches_equal,
        "resume_steps": [s[0] if len(s) == 1 else s for s in resume_steps],
        "same_resume_step_on_every_rank": one_step_each,
        "agreed_steps": agreed,
        "agreed_on_every_node": agreed_ok,
        "notice_s_max": max(notice, default=None),
        "recovered_s_max": max(recovered, default=None),
        **closing_fields(
            steps=steps,
            seed=seed,
            t_straight=t_straight,
            t_crashy=t_crashy,
            directory=directory,
            kills_detail=stats.attempts,
        ),
    }
    rows = [
        ("nodes x processes", f"{nnodes} x {nproc}"),
        ("checkpoint root", result["root"]),
        ("local tier per node", "yes" if tiered else "no"),
        ("whole-node SIGKILLs", stats.kills),
        ("  of which during a save", stats.kills_mid_save),
    ]
    if remote:
        rows.append(("  of which during its upload", mid_upload))
    rows += [
        ("  nodes lost (0 hosts the store)", ", ".join(str(n) for n in result["nodes_killed"]) or "-"),
        ("resumed from (each start)", ", ".join(str(s) for s in result["resume_steps"])),
        ("every rank resumed one step", "yes" if one_step_each else "NO"),
    ]
    if agreed_ok is not None:
        rows.append(("every node's events agree", "yes" if agreed_ok else "NO"))
    rows += [
        ("survivors noticed a loss within", _secs(result["notice_s_max"])),
        ("every rank training again within", _secs(result["recovered_s_max"])),
        ("checkpoints skipped as invalid", stats.skipped_invalid),
        ("exit code (every node)", stats.exit_code),
    ]
    where = f" over {root}" if remote else ""
    return report(
        result,
        as_json=as_json,
        title=f"{nnodes} nodes x {nproc} DDP under torchrun (c10d on 127.0.0.1){where}, straight, then each node "
        "under `resumekit run` with whole-node SIGKILLs",
        rows=rows,
        batches_label="same batch at every step/rank",
        t_straight=t_straight,
        t_crashy=t_crashy,
    )


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


__all__ = [
    "NODE_DIR",
    "LocalCluster",
    "NodeKill",
    "NodeLaunch",
    "RootWatch",
    "agreed_resumes",
    "newest_step",
    "node_commands",
    "node_torchrun_cmd",
    "rank_generations",
    "run_multinode_demo",
    "run_nodes_with_kills",
    "supervised_cmd",
]
