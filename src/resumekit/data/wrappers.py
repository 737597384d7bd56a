"""What :class:`~resumekit.ResumableDataLoader` puts between torch's DataLoader and the user's dataset to seed the
global RNGs per sample, per batch and around ``collate_fn``, and to count an iterable dataset's items.

The sampler hands out keys ``(epoch, index)`` instead of bare indices, so the seed of a sample reaches the worker
that fetches it with the sample itself; nothing depends on which worker that is or what it fetched before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

from torch.utils.data import Dataset, IterableDataset, Sampler, Subset

from .sampler import ResumableSampler
from .seeding import (
    batch_seed,
    call_seeded,
    in_worker,
    restore_global_rngs,
    sample_seed,
    save_global_rngs,
    seed_global_rngs,
)

Key = tuple[int, int]


class _Forwarding:
    """Attribute access falls through to the wrapped dataset (``loader.dataset.classes`` keeps working)."""

    def __getattr__(self, name: str) -> Any:
        # Dunder lookups and the wrapped object itself must not recurse (pickle probes these before __dict__ is set).
        if name.startswith("__") or name == "dataset":
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


class EpochKeys(Sampler[Key]):
    """Yields ``(epoch, index)`` for each index of a :class:`ResumableSampler`.

    Args:
        sampler: the order and position.
    """

    def __init__(self, sampler: ResumableSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[Key]:
        epoch = self.sampler.epoch
        for i in self.sampler:
            yield (epoch, i)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Forwarded, for frameworks that call ``loader.sampler.set_epoch`` (Lightning does)."""
        self.sampler.set_epoch(epoch)


class Fetched:
    """A fetched batch on its way to ``collate_fn``, with the seed the collate step runs under.

    Args:
        data: what the dataset returned for the batch.
        seed: the collate seed.
    """

    __slots__ = ("data", "seed")

    def __init__(self, data: Any, seed: int):
        self.data = data
        self.seed = seed


def _batched_fetch(dataset: Any) -> Callable[[list[int]], Any] | None:
    """The dataset's own ``__getitems__`` when it really fetches a batch at once, else None (fetch per sample).

    torch's ``Subset`` defines ``__getitems__`` even over a dataset that has none (it then loops over
    ``__getitem__``): such a subset is fetched per sample, so ``random_split`` keeps per-sample seeds.
    """
    own = getattr(dataset, "__getitems__", None)
    if not callable(own):
        return None
    if isinstance(dataset, Subset) and _batched_fetch(dataset.dataset) is None:
        return None
    return cast(Callable[[list[int]], Any], own)


class SampleSeededDataset(_Forwarding, Dataset[Any]):
    """A map-style dataset whose items are fetched with the global RNGs seeded from ``(seed, epoch, index)``.

    A dataset with its own batched ``__getitems__`` is seeded once per batch, from the batch's indices. The result
    goes to ``collate_fn`` as a :class:`Fetched` carrying the collate seed (see :class:`SeededCollate`).

    Args:
        dataset: the user's map-style dataset.
        seed: the loader's base seed.
    """

    def __init__(self, dataset: Any, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self._batched = _batched_fetch(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, tuple):  # a bare index, e.g. someone reading loader.dataset[i]: no seeding
            return self.dataset[key]
        epoch, index = key
        return call_seeded(sample_seed(self.seed, epoch, index), self.dataset.__getitem__, index)

    def __getitems__(self, keys: Sequence[Key]) -> Fetched:
        indices = [i for _, i in keys]
        epoch = keys[0][0] if keys else 0
        # Workers own their RNGs; in the main process (num_workers=0) the training's RNG state is saved once per
        # batch and put back after it, so the loader's draws never shift dropout or anything else.
        saved = None if in_worker() else save_global_rngs()
        try:
            if self._batched is not None:
                seed_global_rngs(batch_seed(self.seed, epoch, indices))
                data = self._batched(indices)
            else:
                data = []
                for e, i in keys:
                    seed_global_rngs(sample_seed(self.seed, e, i))
                    data.append(self.dataset[i])
        finally:
            if saved is not None:
                restore_global_rngs(saved)
        return Fetched(data, batch_seed(self.seed, epoch, indices, collate=True))


class SeededCollate:
    """``collate_fn`` run with the global RNGs seeded from the batch (a mixup that draws stays exact).

    Args:
        fn: the user's collate function (or torch's default).
    """

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def __call__(self, data: Any) -> Any:
        if isinstance(data, Fetched):
            return call_seeded(data.seed, self.fn, data.data)
        return self.fn(data)  # batch_size=None: one sample, already seeded by __getitem__


class CountingIterable(_Forwarding, IterableDataset[Any]):
    """An iterable dataset whose items are counted (the loader's position) and, optionally, produced with the
    global RNGs seeded from ``(seed, epoch, item number)``.

    Only used with ``num_workers=0`` (the count must be the main process's): the loader refuses workers.

    Args:
        dataset: the user's iterable dataset (with ``state_dict``/``load_state_dict``).
        seed: the loader's base seed.
        seed_per_sample: seed before each item.
    """

    def __init__(self, dataset: Any, seed: int, seed_per_sample: bool):
        self.dataset = dataset
        self.seed = int(seed)
        self.seed_per_sample = seed_per_sample
        self.epoch = 0
        self.consumed = 0
        self.done = False

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.dataset)
        while True:
            try:
                if self.seed_per_sample:
                    item = call_seeded(sample_seed(self.seed, self.epoch, self.consumed), next, it)
                else:
                    item = next(it)
            except StopIteration:
                self.done = True
                return
            self.consumed += 1
            yield item


class StreamCollate:
    """``collate_fn`` for an iterable dataset, seeded from the number of items consumed when the batch closed.

    Args:
        fn: the user's collate function (or torch's default).
        stream: the counting wrapper (same process: workers are refused for iterable datasets).
    """

    def __init__(self, fn: Callable[[Any], Any], stream: CountingIterable):
        self.fn = fn
        self.stream = stream

    def __call__(self, data: Any) -> Any:
        s = self.stream
        return call_seeded(batch_seed(s.seed, s.epoch, (s.consumed,), collate=True), self.fn, data)
