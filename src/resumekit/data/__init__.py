"""Deterministic, resumable data: order, position, and the randomness inside ``__getitem__``.

* :class:`ResumableSampler` (``sampler``): the order is a function of ``(seed, epoch)``; the position is global and
  restored in O(1), across a change of world size too.
* :class:`ResumableDataLoader` (``loader``): a DataLoader that is itself stateful, exact with worker processes,
  seeding the global RNGs per sample (``wrappers``) so a batch's bytes depend only on its samples.
* :func:`seed_everything` and the per-sample seeds (``seeding``).
"""

from .loader import ResumableDataLoader
from .sampler import ResumableSampler, epoch_seed
from .seeding import batch_seed, current_sample_seed, sample_seed, seed_everything

__all__ = [
    "ResumableDataLoader",
    "ResumableSampler",
    "batch_seed",
    "current_sample_seed",
    "epoch_seed",
    "sample_seed",
    "seed_everything",
]
