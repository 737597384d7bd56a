"""One machine as several torchrun "nodes": the launch line of each node, and the node processes themselves.

A node is a ``torchrun --nnodes N`` agent with a c10d rendezvous on ``127.0.0.1`` (node 0 hosts the store), wrapped
by its own ``resumekit run`` whose event log, heartbeat and output are the node's own. :class:`LocalCluster` starts
the nodes in sessions of their own and loses one at will (SIGKILL of its agent and workers, the supervisor living on).
Used by :mod:`resumekit.demo.multinode` and the multi-node tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..supervisor.proctree import children, descendants, kill_tree, pid_alive
from .core import stop_tree, supervisor_cmd

NODE_DIR = "node{}"  # one node's supervisor files and torchrun output, outside the checkpoint directory: the
# supervisor counts file growth there as the job's activity, and a node's output must not hide a hang


# ------------------------------------------------------------------------------------------- launch lines
@dataclass(frozen=True, kw_only=True)
class NodeLaunch:
    """How the nodes of one job find each other; the same for every node but its rank.

    Every wait in here is bounded: a node whose peer is gone gives up and exits, and its supervisor decides.
    """

    nnodes: int
    """Nodes in the job (``torchrun --nnodes``)."""
    nproc: int = 1
    """Processes per node (``--nproc-per-node``)."""
    endpoint: str
    """``host:port`` of the rendezvous store, which node 0 hosts."""
    run_id: str = "resumekit-demo"
    """``--rdzv-id``: the same on every node of one job."""
    join_timeout: float = 60.0
    """Seconds a node waits in rendezvous for the others before its agent exits (torch's default is 600)."""
    read_timeout: float = 20.0
    """Seconds an agent waits on one request to the rendezvous store (torch's default is 60): a dead store host
    fails the others' agents within this."""

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        if self.nnodes < 1 or self.nproc < 1:
            raise ConfigError("NodeLaunch.nnodes and NodeLaunch.nproc must be >= 1")
        if self.join_timeout <= 0 or self.read_timeout < 1:
            raise ConfigError("NodeLaunch.join_timeout must be > 0 and NodeLaunch.read_timeout >= 1 s")
        host, _, port = self.endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"NodeLaunch.endpoint {self.endpoint!r} must be host:port")


def node_torchrun_cmd(launch: NodeLaunch, node_rank: int, job: Sequence[str]) -> list[str]:
    """The ``torchrun`` line of one node.

    Args:
        launch: what every node shares.
        node_rank: this node (0 hosts the rendezvous store).
        job: the script and its arguments, or ``-m module ...``.

    Returns:
        The command line.
    """
    # is_host is explicit: on one machine every agent matches 127.0.0.1, and on a cluster a restarted node 0 must
    # host again (not find a stale address). read_timeout is whole seconds (torch parses an int). No --node-rank:
    # the c10d backend ignores it (ranks come from the rendezvous), so the node rank only says who hosts.
    conf = f"is_host={int(node_rank == 0)},join_timeout={launch.join_timeout:g},read_timeout={int(launch.read_timeout)}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={launch.nnodes}",
        f"--nproc-per-node={launch.nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={launch.endpoint}",
        f"--rdzv-id={launch.run_id}",
        f"--rdzv-conf={conf}",
        "--max-restarts=0",  # the supervisors own restarts: a node loss needs every node restarted
        "--monitor-interval=0.1",
        *job,
    ]


def supervised_cmd(
    command: Sequence[str],
    directory: str,
    node_dir: str,
    *,
    max_restarts: int = 10,
    hang_timeout: float | None = None,
    backoff: float = 0.05,
    extra: Sequence[str] = (),
) -> list[str]:
    """``resumekit run`` around one node's command, its own files in ``node_dir``.

    Args:
        command: the node's torchrun line.
        directory: the shared checkpoint root (a directory or an object-store URI).
        node_dir: a directory of this node's own: event log, heartbeat and hang stack dumps.
        max_restarts: this node's restart budget.
        hang_timeout: ``--hang-timeout`` (None: off).
        backoff: the first restart delay (kept short: every node restarts after every loss).
        extra: more ``resumekit run`` options.

    Returns:
        The command line.
    """
    opts = ["--events", os.path.join(node_dir, "events.jsonl")]
    if hang_timeout is not None:
        opts += ["--hang-timeout", f"{hang_timeout:g}"]
    sup = supervisor_cmd(
        directory, max_restarts=max_restarts, backoff=backoff, backoff_max=max(backoff, 0.5), extra=[*opts, *extra]
    )
    return [*sup, "--", *command]


# ------------------------------------------------------------------------------------------ the nodes
class LocalCluster:
    """N node processes on this machine, each in a session of its own with its own log.

    Args:
        commands: one command line per node (node 0 first).
        directory: where ``node{i}/output.log`` goes.
        env: the environment of every node (a node's own entries in ``node_env``).
        node_env: per-node additions to ``env``.
    """

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        directory: str,
        env: dict[str, str] | None = None,
        node_env: Sequence[dict[str, str]] | None = None,
    ):
        self.commands = [list(c) for c in commands]
        self.directory = directory
        self.env = dict(os.environ if env is None else env)
        self.node_env = list(node_env or [{} for _ in commands])
        self.procs: list[subprocess.Popen] = []
        self._logs: list[Any] = []

    def node_dir(self, i: int) -> str:
        return os.path.join(self.directory, NODE_DIR.format(i))

    def start(self) -> None:
        """Start every node (node 0 first: it hosts the store the others connect to)."""
        for i, cmd in enumerate(self.commands):
            os.makedirs(self.node_dir(i), exist_ok=True)
            log = open(os.path.join(self.node_dir(i), "output.log"), "ab")  # noqa: SIM115 - the node's lifetime
            self._logs.append(log)
            env = dict(self.env, **self.node_env[i])
            self.procs.append(
                subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            )

    def job_pids(self, i: int) -> list[int]:
        """The live processes under node ``i``'s top process (its agent and workers; [] between restarts)."""
        return [p for p in children(self.procs[i].pid) if pid_alive(p)]

    def kill_node(self, i: int) -> list[int]:
        """SIGKILL node ``i``'s torchrun agent and its workers at once: the node is lost, its supervisor lives on to
        bring it back.

        The agent is the supervisor's child that has children of its own (the workers); a childless one is the
        supervisor's warm standby (an interpreter waiting to become the next attempt), which is left alone.

        Returns:
            The pids signalled; [] when no agent had workers.
        """
        killed: list[int] = []
        for p in self.agent_pids(i):
            killed += kill_tree(p)
        return killed

    def agent_pids(self, i: int) -> list[int]:
        """Node ``i``'s running agents: the supervisor's children that have workers."""
        return [p for p in self.job_pids(i) if descendants(p)]

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> list[int | None]:
        """Wait (bounded) for every node to exit; the exit codes (None: still running at the deadline)."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return [p.poll() for p in self.procs]

    def stop(self) -> None:
        """SIGKILL whatever still runs under every node; close the logs."""
        for p in self.procs:
            stop_tree(p)
        for log in self._logs:
            log.close()
        self._logs = []


def node_commands(
    launch: NodeLaunch,
    job: Sequence[str],
    directory: str,
    run_dir: str,
    *,
    supervised: bool,
    max_restarts: int = 10,
    hang_timeout: float | None = None,
    local_tiers: Sequence[str] | None = None,
) -> list[list[str]]:
    """One command per node: torchrun alone, or under ``resumekit run`` with its files in ``run_dir/node{i}``.

    Args:
        launch: what the nodes share.
        job: the job after torchrun's options.
        directory: the shared checkpoint root (a directory or an object-store URI).
        run_dir: where the per-node directories go.
        supervised: wrap each node in ``resumekit run``.
        max_restarts: each supervisor's restart budget.
        hang_timeout: each supervisor's ``--hang-timeout``.
        local_tiers: one local tier directory per node, passed to its ``resumekit run --local-tier`` (which
            exports it to the job as ``RESUMEKIT_LOCAL_TIER`` and pre-downloads an object store's newest step into
            it); None: no ``--local-tier``.

    Returns:
        The command lines, node 0 first.
    """
    if local_tiers is not None and len(local_tiers) != launch.nnodes:
        from ..errors import ConfigError

        raise ConfigError(f"node_commands: {len(local_tiers)} local tiers for {launch.nnodes} nodes")
    out = []
    for i in range(launch.nnodes):
        cmd = node_torchrun_cmd(launch, i, job)
        if supervised:
            node_dir = os.path.join(run_dir, NODE_DIR.format(i))
            extra = ["--local-tier", local_tiers[i]] if local_tiers is not None else []
            cmd = supervised_cmd(
                cmd, directory, node_dir, max_restarts=max_restarts, hang_timeout=hang_timeout, extra=extra
            )
        out.append(cmd)
    return out


__all__ = ["NODE_DIR", "LocalCluster", "NodeLaunch", "node_commands", "node_torchrun_cmd", "supervised_cmd"]
