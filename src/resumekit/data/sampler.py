"""The resumable data order: :class:`ResumableSampler` draws its order from ``(seed, epoch)`` alone and keeps the
*global* number of samples consumed in the epoch, so a resumed run skips straight to its position in O(1) (the
order is recomputed, no data is read) and the same global order continues even when the number of ranks changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

from ..errors import StateMismatchError

_MIX = 0x9E3779B97F4A7C15


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that differs for every (seed, epoch) pair."""
    return ((seed * _MIX) ^ (epoch + 1) * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)


class ResumableSampler(Sampler[int]):
    """A shuffling (or sequential) sampler whose position is part of its state.

    Args:
        data: the dataset or its length.
        seed: base seed; the order of epoch ``e`` depends on ``(seed, e)`` only.
        shuffle: permute each epoch (False: 0..n-1).
        num_replicas / rank: for data parallel jobs (default: from torch.distributed when initialised). Rank ``r``
            takes global positions ``r, r + W, r + 2W, ...`` so the global order does not depend on ``W``.
        drop_last: drop the tail so every rank gets the same count (else the order wraps to pad the last round).

    Its ``position`` counts global samples handed out in the current epoch. With ``DataLoader(num_workers=0)``
    that is exactly what the loop consumed; with worker processes use :class:`ResumableDataLoader`, which
    corrects for prefetching. Call :meth:`set_epoch` at the start of every epoch, as with DistributedSampler.
    ``len()`` is this rank's share of a whole epoch, whatever the position; :attr:`remaining` is what is left.
    """

    def __init__(
        self,
        data: Sized | int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ):
        n = data if isinstance(data, int) else len(data)
        if n < 0:
            raise ValueError("dataset length must be >= 0")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if ready else 1)
            rank = rank if rank is not None else (dist.get_rank() if ready else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.num_samples_total = n
        self.seed = int(seed)
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self.position = 0

    @property
    def epoch_length(self) -> int:
        """Global samples per epoch after dropping or padding to a multiple of ``num_replicas``."""
        n, w = self.num_samples_total, self.num_replicas
        return (n // w) * w if self.drop_last else math.ceil(n / w) * w

    @property
    def remaining(self) -> int:
        """Samples this rank still yields in the current epoch (its share of ``epoch_length - position``)."""
        left = self.epoch_length - self.position - self.rank
        return max(0, math.ceil(left / self.num_replicas))

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The global index order of an epoch (a pure function of seed and epoch)."""
        epoch = self.epoch if epoch is None else epoch
        n = self.num_samples_total
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator()
        g.manual_seed(epoch_seed(self.seed, epoch))
        return torch.randperm(n, generator=g)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; keeps the position when resuming into the same epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0

    def __iter__(self) -> Iterator[int]:
        order = self.order()
        n, w, total = self.num_samples_total, self.num_replicas, self.epoch_length
        if n == 0:
            return
        start = self.position
        for g in range(start + self.rank, total, w):
            # Count before yielding: the consumer holds the sample once next() returns.
            self.position = min(g - self.rank + w, total)
            yield int(order[g % n])

    def __len__(self) -> int:
        # The whole epoch, not what is left: frameworks size their epoch (progress bars, Lightning's loop, LR
        # schedules) from len(), and a length that shrank after a mid-epoch restore shortened every later epoch.
        return self.epoch_length // self.num_replicas

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_samples": self.num_samples_total,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("num_samples") != self.num_samples_total:
            raise StateMismatchError(
                f"sampler was saved for a dataset of {sd.get('num_samples')} samples, this one has "
                f"{self.num_samples_total}: the data changed; resume with resume='never' or init_from= to restart "
                "the data order"
            )
        self.seed = int(sd["seed"])
        self.epoch = int(sd["epoch"])
        self.position = int(sd["position"])
        self.shuffle = bool(sd.get("shuffle", self.shuffle))
