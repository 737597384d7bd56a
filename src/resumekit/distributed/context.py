"""This process's place in the job and the few collectives the checkpoint protocol needs (gloo, CPU)."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ConfigError

log = logging.getLogger("resumekit")

ENV_COLLECTIVE_TIMEOUT = "RESUMEKIT_COLLECTIVE_TIMEOUT"
"""Seconds a collective of resumekit's own gloo groups may wait for a peer before it fails (default: the timeout
the job gave ``init_process_group``)."""


def collective_timeout() -> datetime.timedelta | None:
    """How long resumekit's collectives wait for a peer: ``RESUMEKIT_COLLECTIVE_TIMEOUT`` seconds, else the default
    process group's own timeout; None (torch's default) when neither can be read.

    ``new_group`` does not inherit the default group's timeout: without one, torch gives every gloo group 30
    minutes. A rank whose peer froze (a node that stopped answering but kept its sockets open) would then wait half
    an hour inside a restore or a save agreement, long after the job's own collectives gave up; with the job's
    timeout, it fails with them and the node's torchrun exits for its supervisor to restart.

    Raises:
        ConfigError: ``RESUMEKIT_COLLECTIVE_TIMEOUT`` is not a positive number.
    """
    raw = os.environ.get(ENV_COLLECTIVE_TIMEOUT, "").strip()
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not seconds > 0:
            raise ConfigError(f"{ENV_COLLECTIVE_TIMEOUT}={raw!r} must be a positive number of seconds")
        return datetime.timedelta(seconds=seconds)
    import torch.distributed as dist

    try:
        world = dist.group.WORLD
        options = world._get_backend(torch.device("cpu")).options  # type: ignore[union-attr]
        timeout = options._timeout
    except Exception:  # noqa: BLE001 - a private attribute: when torch moves it, torch's default applies
        return None
    return timeout if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0 else None


class Collectives:
    """The few collectives the protocol needs, over a given group; trivial when there is only one process.

    Object collectives go over gloo groups created here (CPU, whatever the training backend), so they cost no
    device synchronisation and never share a communicator with the training's collectives.
    """

    def __init__(self, group: Any, rank: int, world_size: int):
        self.group = group
        self.rank = rank
        self.world_size = world_size

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def any_true(self, *flags: bool) -> tuple[bool, ...]:
        """Element-wise OR over ranks: one tiny all_reduce(MAX) of an int tensor on CPU."""
        if self.world_size == 1:
            return tuple(bool(f) for f in flags)
        import torch.distributed as dist

        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return tuple(bool(v) for v in t.tolist())


@dataclass
class DistContext:
    """This process's place in the job and the two gloo groups resumekit uses.

    Attributes:
        rank / world_size / local_rank: from torch.distributed (0 / 1 / 0 without a process group).
        ctl: collectives of the training thread (restore, save agreement, preemption flag).
        bg: collectives of the background persist thread (async saves); a separate group so its messages never
            interleave with the training thread's.
        dcp_group / dcp_bg_group: the process groups handed to DCP on each thread (None when not distributed).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ctl: Collectives = field(default_factory=lambda: Collectives(None, 0, 1))
    bg: Collectives = field(default_factory=lambda: Collectives(None, 0, 1))
    dcp_group: Any = None
    dcp_bg_group: Any = None

    @property
    def use_dist(self) -> bool:
        return self.world_size > 1

    @classmethod
    def create(cls) -> DistContext:
        """From the initialised default process group; must be called by every rank (group creation is
        collective). Without an initialised group: a single process (world size 1)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if (
            rank == 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
        ):
            log.warning(
                "torchrun shares its rendezvous store with the workers and restarts the group up to %s "
                "times: a restarted group can read the previous attempt's addresses and fail with 'Gloo "
                "connectFullMesh failed' or NCCL connect errors (pytorch#135712). Export "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun to avoid it",
                os.environ.get("TORCHELASTIC_MAX_RESTARTS"),
            )
        if world == 1:
            return cls(rank=rank, world_size=1, local_rank=local_rank)
        timeout = collective_timeout()
        ctl = dist.new_group(backend="gloo", timeout=timeout)
        bg = dist.new_group(backend="gloo", timeout=timeout)
        return cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            ctl=Collectives(ctl, rank, world),
            bg=Collectives(bg, rank, world),
            dcp_group=ctl,
            dcp_bg_group=bg,
        )


def wants_distributed(option: bool | None) -> bool:
    """The ``distributed`` option resolved: None means "when torch.distributed is initialised"."""
    if option is not None:
        return bool(option)
    if "torch.distributed" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()
