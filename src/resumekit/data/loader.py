"""The resumable DataLoader: exact position with worker processes, randomness that belongs to the sample, a length
that means one thing, and an opt-in epoch that advances by itself."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, default_convert

from ..errors import ConfigError, StateMismatchError, UnsupportedStateError
from .sampler import ResumableSampler, epoch_seed
from .wrappers import CountingIterable, EpochKeys, SampleSeededDataset, SeededCollate, StreamCollate


class ResumableDataLoader(DataLoader[Any]):
    """A DataLoader that is itself stateful: put it in the checkpoint state and a resumed run sees the batches, and
    the bytes in them, that the straight run saw.

    **Order and position.** A map-style dataset is read in the order of a :class:`ResumableSampler` (a function of
    ``(seed, epoch)``); the position saved is what the loop has *received*, not what the workers prefetched.

    **Randomness per sample** (``seed_per_sample=True``, the default). Before each ``__getitem__`` the loader seeds
    python ``random``, numpy's global generator and torch's CPU generator from ``(seed, epoch, index)``, in the main
    process and in workers alike; a dataset with its own batched ``__getitems__`` is seeded once per batch from the
    batch's indices, and ``collate_fn`` runs seeded from the batch too. A batch's bytes then depend only on its
    samples: a mid-epoch resume is exact with any ``num_workers``, even a different one from the run before. In the
    main process (``num_workers=0``) the three global states are saved before and restored after, so the
    training's own random stream (dropout, ...) is untouched; in workers they are the loader's. The seed in use is
    :func:`resumekit.data.current_sample_seed`. Turn it off for a dataset that manages its own generators.

    **Length.** ``len(loader)`` is the batch count of a whole epoch on this rank, before and after a mid-epoch
    restore alike; :attr:`remaining_batches` is what the current epoch still holds.

    **Epochs.** Call :meth:`set_epoch` at the start of every epoch (as with DistributedSampler), or pass
    ``auto_epoch=True``: iterating past the end of an epoch then starts the next one, so ``while step < total:
    for batch in loader: ...`` is correct as it stands, resumed or not.

    **Iterable datasets** keep their position inside their iterator, so they must take part: an
    ``IterableDataset`` needs ``state_dict()`` (its position after the last item it yielded) and
    ``load_state_dict(sd)`` (the next ``iter()`` continues from there), and optionally ``set_epoch(epoch)``; it is
    read with ``num_workers=0``, where that position is exact. With worker processes use torchdata's
    ``StatefulDataLoader``, which collects the workers' states; it goes into the checkpoint state as it is.

    Args:
        dataset: a map-style dataset, or an iterable one following the protocol above.
        batch_size: samples per batch on this rank.
        seed: the data order and the per-sample seeds derive from it.
        shuffle, drop_last, num_replicas, rank: passed to the sampler (``drop_last`` also to batching); map-style
            only.
        seed_per_sample: seed the global RNGs per sample (see above).
        auto_epoch: advance the epoch when iterated past its end.
        **kwargs: any other DataLoader argument (num_workers, collate_fn, pin_memory, multiprocessing_context,
            ...). ``sampler``, ``batch_sampler`` and ``generator`` are managed here.

    Raises:
        TypeError: ``sampler``, ``batch_sampler`` or ``generator`` was given.
        UnsupportedStateError: an iterable dataset without ``state_dict``/``load_state_dict``.
        ConfigError: an iterable dataset with ``num_workers > 0``.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int | None = 1,
        *,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed_per_sample: bool = True,
        auto_epoch: bool = False,
        **kwargs: Any,
    ):
        for k in ("sampler", "batch_sampler", "generator"):
            if k in kwargs:
                raise TypeError(f"ResumableDataLoader manages {k!r} itself")
        self.seed = int(seed)
        self.seed_per_sample = seed_per_sample
        self.auto_epoch = auto_epoch
        self.source_dataset = dataset
        """The dataset as given (``loader.dataset`` may be the seeding wrapper around it)."""
        collate = kwargs.pop("collate_fn", None)
        if collate is None:
            collate = default_collate if batch_size is not None else default_convert
        # Worker seeds come from this generator: a pure function of (seed, epoch), never of the global RNG, so a
        # mid-epoch restart neither consumes nor depends on the training's random stream.
        self._worker_generator = torch.Generator()
        self.resumable_sampler: ResumableSampler | None = None
        self._stream: CountingIterable | None = None
        if isinstance(dataset, IterableDataset):
            _check_iterable(dataset, kwargs.get("num_workers", 0))
            self._stream = CountingIterable(dataset, self.seed, seed_per_sample)
            super().__init__(
                self._stream,
                batch_size=batch_size,
                drop_last=drop_last,
                generator=self._worker_generator,
                collate_fn=StreamCollate(collate, self._stream) if seed_per_sample else collate,
                **kwargs,
            )
            return
        self.resumable_sampler = ResumableSampler(
            dataset, seed=seed, shuffle=shuffle, num_replicas=num_replicas, rank=rank, drop_last=drop_last
        )
        if seed_per_sample:
            ds: Any = SampleSeededDataset(dataset, self.seed)
            sampler: Any = EpochKeys(self.resumable_sampler)
            collate = SeededCollate(collate)
        else:
            ds, sampler = dataset, self.resumable_sampler
        super().__init__(
            ds,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            generator=self._worker_generator,
            collate_fn=collate,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------ epochs
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``; keeps the position when resuming into the same epoch.

        Args:
            epoch: the epoch number.
        """
        st = self._stream
        if st is None:
            self._sampler.set_epoch(epoch)
        elif epoch != st.epoch:
            st.epoch, st.consumed, st.done = epoch, 0, False
            set_epoch = getattr(st.dataset, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self._stream.epoch if self._stream is not None else self._sampler.epoch

    # ------------------------------------------------------------------------------------------ lengths
    def __len__(self) -> int:
        """Batches in a whole epoch on this rank (not what is left of the current one: see
        :attr:`remaining_batches`)."""
        if self._stream is not None:
            return super().__len__()
        return self._batches(len(self._sampler))

    @property
    def remaining_batches(self) -> int:
        """Batches the current epoch still holds on this rank (map-style datasets)."""
        if self._stream is not None:
            raise TypeError("remaining_batches needs a map-style dataset: an iterable one does not know its end")
        return self._batches(self._sampler.remaining)

    def _batches(self, samples: int) -> int:
        bs = self.batch_size or 1
        return samples // bs if self.drop_last else math.ceil(samples / bs)

    @property
    def _sampler(self) -> ResumableSampler:
        assert self.resumable_sampler is not None
        return self.resumable_sampler

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self._stream is not None:
            yield from self._iter_stream()
            return
        s = self._sampler
        if self.auto_epoch and s.position >= s.epoch_length > 0:
            s.set_epoch(s.epoch + 1)  # the previous pass ended (or was left at its last batch)
        self._worker_generator.manual_seed(epoch_seed(s.seed, s.epoch))
        start, total = s.position, s.epoch_length
        per_batch = (self.batch_size or 1) * s.num_replicas
        for delivered, batch in enumerate(super().__iter__(), 1):
            # Workers prefetch, so the sampler has run ahead; the position is what the loop has received.
            s.position = min(start + delivered * per_batch, total)
            yield batch
        s.position = total
        if self.auto_epoch:
            s.set_epoch(s.epoch + 1)

    def _iter_stream(self) -> Iterator[Any]:
        st = self._stream
        assert st is not None
        if st.done:
            if self.auto_epoch:
                self.set_epoch(st.epoch + 1)
            else:  # a new pass over the same epoch, as the dataset decides
                st.consumed, st.done = 0, False
        self._worker_generator.manual_seed(epoch_seed(self.seed, st.epoch))
        # num_workers=0 (enforced): nothing is prefetched, so the dataset's state after each batch is exact.
        yield from super().__iter__()
        if self.auto_epoch and st.done:
            self.set_epoch(st.epoch + 1)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The position (and, for an iterable dataset, the dataset's own state)."""
        st = self._stream
        if st is None:
            return self._sampler.state_dict()
        return {
            "kind": "iterable",
            "seed": self.seed,
            "epoch": st.epoch,
            "consumed": st.consumed,
            "done": st.done,
            "dataset": st.dataset.state_dict(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Continue from ``sd`` (from :meth:`state_dict`).

        Raises:
            StateMismatchError: the state is of the other kind of dataset, or of a dataset of another length.
        """
        st = self._stream
        is_stream = sd.get("kind") == "iterable"
        if (st is not None) != is_stream:
            saved, here = ("an iterable", "a map-style") if is_stream else ("a map-style", "an iterable")
            raise StateMismatchError(f"the loader state was saved for {saved} dataset, this loader reads {here} one")
        if st is None:
            self._sampler.load_state_dict(sd)
            return
        st.dataset.load_state_dict(sd["dataset"])
        self.seed = st.seed = int(sd["seed"])
        st.epoch, st.consumed, st.done = int(sd["epoch"]), int(sd["consumed"]), bool(sd["done"])


def _check_iterable(dataset: Any, num_workers: int) -> None:
    """Refuse an iterable dataset whose position the loader could not save exactly."""
    name = type(dataset).__name__
    if not (callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))):
        raise UnsupportedStateError(
            f"ResumableDataLoader cannot resume {name} exactly: an IterableDataset keeps its position inside its "
            "iterator, out of the loader's sight. Give it state_dict() (its position after the last item it "
            "yielded) and load_state_dict() (the next iter() continues from there), or use a map-style dataset, or "
            "put torchdata's StatefulDataLoader in the checkpoint state instead"
        )
    if num_workers:
        raise ConfigError(
            f"ResumableDataLoader reads the iterable dataset {name} with num_workers=0 only: with {num_workers} "
            "workers each iterates its own copy, and the main process cannot read their positions. Use "
            "num_workers=0, or torchdata's StatefulDataLoader (it gathers the workers' states) in the checkpoint "
            "state instead"
        )
