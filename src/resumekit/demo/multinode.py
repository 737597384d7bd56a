"""Several "nodes" on one machine: the multi-node demonstration behind ``resumekit demo --nnodes N``.

Each node is its own ``torchrun`` agent (``--nnodes N``, c10d rendezvous on ``127.0.0.1``), wrapped by its own
``resumekit run``, exactly the launch line a cluster runs on every node; the checkpoint directory is shared and each
node keeps its supervisor files (event log, heartbeat, hang stack dumps) in a directory of its own. A node loss is a
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
:mod:`resumekit.demo.nodes`). It measures how long the survivors took to notice a loss (their agent
gone) and how long until every rank trained again.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..supervisor.proctree import pid_alive
from .core import CrashStats, ProgressTail, closing_fields, count_events, final_diffs, fresh_run_dirs, report, saving
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

_POLL_S = 0.01


def newest_step(directory: str) -> int:
    """The highest step committed in ``directory`` (a ``step_N`` directory; -1 when none): what the kill loop
    waits on, never what a restore trusts.

    Args:
        directory: the run directory.

    Returns:
        N of the newest ``step_N``.
    """
    from ..format import parse_step_dirname

    steps = [parse_step_dirname(n) for n in os.listdir(directory)] if os.path.isdir(directory) else []
    return max((s for s in steps if s is not None), default=-1)


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
    pids: list[int] = field(default_factory=list)
    notice_s: float | None = None
    """Seconds until every other node's agent had exited (None: not within the wait)."""
    recovered_s: float | None = None
    """Seconds until every rank trained a step again (None: not within the wait)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "at_step": self.at_step,
            "mid_save": self.mid_save,
            "notice_s": None if self.notice_s is None else round(self.notice_s, 2),
            "recovered_s": None if self.recovered_s is None else round(self.recovered_s, 2),
        }


def run_nodes_with_kills(
    cluster: LocalCluster,
    directory: str,
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
    host) and another node are both lost. The first kill, and about 40% of the others, land while a checkpoint is
    being written, the rest after a random number of steps. After each kill the loop measures when the other nodes'
    agents had exited and when every rank trained again, and only then aims the next kill.

    Args:
        cluster: the nodes, not started yet.
        directory: the shared run directory the workers write their progress and checkpoints to.
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
    tail = ProgressTail(directory, PROGRESS_PATTERN)
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
            if len(live) < world or (stats.kills and newest_step(directory) <= committed_at_kill):
                time.sleep(_POLL_S)
                continue
            aim_at_save = stats.kills == 0 or rng.random() < 0.4
            target = max(s for _, s in live.values()) + rng.randint(1, 8)
            if last_step is not None:
                target = min(target, last_step - 2)
            victim = (first_victim + stats.kills) % nnodes
            while cluster.running() and time.monotonic() < deadline:
                tail.poll()
                now = max(s for p, (_, s) in tail.latest.items() if p not in dead)
                if (aim_at_save and saving(directory)) or (not aim_at_save and now >= target):
                    break
                time.sleep(0.002)
            else:
                break
            survivors = {i: cluster.agent_pids(i) for i in range(nnodes) if i != victim}
            committed_at_kill = newest_step(directory)
            at_step = max(s for p, (_, s) in tail.latest.items() if p not in dead)
            t_kill = time.monotonic()
            mid_save = saving(directory)
            pids = cluster.kill_node(victim)
            if not pids:
                continue  # the node finished first: not a kill
            dead |= {p for p, _ in live.values()}  # the whole generation goes down with the lost node
            kill = NodeKill(victim, at_step, mid_save, pids)
            stats.kills += 1
            stats.kills_mid_save += int(mid_save)
            _follow_recovery(kill, tail, survivors, dead, world, t_kill, min(deadline, t_kill + recover_timeout))
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
) -> None:
    """Fill ``kill.notice_s`` (every surviving node's agent gone) and ``kill.recovered_s`` (every rank reported a
    step from a new process), waiting at most until ``until``."""
    while time.monotonic() < until:
        now = time.monotonic()
        if kill.notice_s is None and not any(pid_alive(p) for pids in survivors.values() for p in pids):
            kill.notice_s = now - t_kill
        tail.poll()
        fresh = {rank for pid, (rank, _) in tail.latest.items() if pid not in dead}
        if len(fresh) >= world:
            kill.recovered_s = now - t_kill
            return
        time.sleep(_POLL_S)


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
) -> int:
    """A straight N-node run vs one whose nodes are SIGKILLed whole and restarted by their supervisors.

    Args:
        directory: where both runs write (``straight/`` and ``crashy/``, emptied first).
        nnodes: nodes (separate torchrun agents on this machine).
        nproc: processes per node.
        crashes: how many whole-node SIGKILLs.
        steps: the job's length.
        seed: the kill seed (random when None; printed so a run can be repeated).
        as_json: print one JSON object instead of the table.
        save_every: the job's checkpoint interval.
        async_save: the job writes checkpoints in the background.

    Returns:
        0 only if both runs end bitwise identical, every rank saw the same batches, every restart resumed all
        ranks from one step, and every node exited 0.
    """
    seed = random.randrange(1 << 30) if seed is None else seed
    rng = random.Random(seed)
    straight, crashy = fresh_run_dirs(directory)
    for d in (straight + "-nodes", crashy + "-nodes"):
        shutil.rmtree(d, ignore_errors=True)
    env = demo_env()
    world = nnodes * nproc

    t0 = time.monotonic()
    launch = NodeLaunch(nnodes=nnodes, nproc=nproc, endpoint=f"127.0.0.1:{free_port()}", run_id="straight")
    ref = LocalCluster(
        node_commands(
            launch,
            job_args(straight, steps, save_every, 0, async_save),
            straight,
            straight + "-nodes",
            supervised=False,
        ),
        straight + "-nodes",
        env,
    )
    ref.start()
    try:
        codes = ref.wait(600.0)
    finally:
        ref.stop()
    t_straight = time.monotonic() - t0
    if any(c != 0 for c in codes):
        print(
            f"resumekit demo: the straight {nnodes}-node run failed (exit codes {codes}); see {straight}-nodes/node*/",
            file=sys.stderr,
        )
        return 1

    t0 = time.monotonic()
    launch = NodeLaunch(nnodes=nnodes, nproc=nproc, endpoint=f"127.0.0.1:{free_port()}", run_id="crashy")
    job = job_args(crashy, steps, save_every, 0, async_save)
    cluster = LocalCluster(
        node_commands(launch, job, crashy, crashy + "-nodes", supervised=True, max_restarts=3 * crashes + 3),
        crashy + "-nodes",
        dict(env, RESUMEKIT_TEST_SAVE_PAUSE="0.05"),
    )
    stats = run_nodes_with_kills(cluster, crashy, world=world, crashes=crashes, rng=rng, timeout=900, last_step=steps)
    t_crashy = time.monotonic() - t0
    stats.skipped_invalid = sum(count_events(cluster.node_dir(i), "skip_invalid") for i in range(nnodes))
    diffs = final_diffs(compare_final, straight, crashy, steps)
    batches_equal = same_batches(straight, crashy, world=world, steps=steps)
    gens = rank_generations(crashy)
    resume_steps = [sorted(set(g.values())) for g in gens]
    one_step_each = all(len(s) == 1 for s in resume_steps)
    notice = [a["notice_s"] for a in stats.attempts if a["notice_s"] is not None]
    recovered = [a["recovered_s"] for a in stats.attempts if a["recovered_s"] is not None]
    result: dict[str, Any] = {
        "identical": not diffs and batches_equal and one_step_each and stats.exit_code == 0,
        "nnodes": nnodes,
        "nproc": nproc,
        "kills": stats.kills,
        "kills_mid_save": stats.kills_mid_save,
        "nodes_killed": sorted({a["node"] for a in stats.attempts}),
        "skipped_invalid": stats.skipped_invalid,
        "exit_code": stats.exit_code,
        "differing_keys": diffs,
        "batch_sequence_equal": batches_equal,
        "resume_steps": [s[0] if len(s) == 1 else s for s in resume_steps],
        "same_resume_step_on_every_rank": one_step_each,
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
        ("whole-node SIGKILLs", stats.kills),
        ("  of which during a save", stats.kills_mid_save),
        ("  nodes lost (0 hosts the store)", ", ".join(str(n) for n in result["nodes_killed"]) or "-"),
        ("resumed from (each start)", ", ".join(str(s) for s in result["resume_steps"])),
        ("every rank resumed one step", "yes" if one_step_each else "NO"),
        ("survivors noticed a loss within", _secs(result["notice_s_max"])),
        ("every rank training again within", _secs(result["recovered_s_max"])),
        ("checkpoints skipped as invalid", stats.skipped_invalid),
        ("exit code (every node)", stats.exit_code),
    ]
    return report(
        result,
        as_json=as_json,
        title=f"{nnodes} nodes x {nproc} DDP under torchrun (c10d on 127.0.0.1), straight, then each node under "
        "`resumekit run` with whole-node SIGKILLs",
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
    "newest_step",
    "node_commands",
    "node_torchrun_cmd",
    "rank_generations",
    "run_multinode_demo",
    "run_nodes_with_kills",
    "supervised_cmd",
]
