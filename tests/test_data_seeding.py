"""Issue 13: randomness that belongs to the sample, a length that means one thing, an epoch that advances by itself,
iterable datasets, ``seed_everything``."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch

import resumekit
from resumekit import ResumableDataLoader
from resumekit.data import current_sample_seed, sample_seed
from resumekit.errors import ConfigError, StateMismatchError, UnsupportedStateError

FORK = {"multiprocessing_context": "fork"}  # workers start in milliseconds


class Augmenting(torch.utils.data.Dataset):
    """Draws from all three global RNGs in ``__getitem__``, as ordinary augmentation code does."""

    classes = ("a", "b")

    def __init__(self, n: int = 24):
        self.base = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x = self.base[i] + torch.randn(3) + float(np.random.normal()) + random.random()
        if random.random() < 0.5:
            x = x.flip(0)
        return i, x


class Batched(Augmenting):
    """Fetches a whole batch at once (``__getitems__``): seeded once per batch."""

    def __getitems__(self, indices):
        noise = torch.rand(len(indices))
        return [(i, self.base[i] + noise[k]) for k, i in enumerate(indices)]


def mixup(batch):
    """A collate_fn that draws."""
    idx = torch.tensor([b[0] for b in batch])
    x = torch.stack([b[1] for b in batch])
    lam = torch.rand(1)
    return idx, lam * x + (1 - lam) * x.flip(0)


def _bytes(batch) -> bytes:
    return b"".join(t.numpy().tobytes() for t in batch)


def _loader(ds=None, workers=0, **kw):
    kw = {**(FORK if workers else {}), **kw}
    return ResumableDataLoader(ds or Augmenting(), batch_size=4, seed=7, num_workers=workers, **kw)


def _epoch(workers, epoch=1, **kw):
    ld = _loader(workers=workers, **kw)
    ld.set_epoch(epoch)
    return [_bytes(b) for b in ld]


@pytest.mark.parametrize("before,after", [(2, 2), (2, 0), (0, 3), (3, 2)])
def test_batch_bytes_survive_a_mid_epoch_resume_with_other_workers(before, after):
    ref = _epoch(0)
    ld = _loader(workers=before)
    ld.set_epoch(1)
    got = []
    for i, b in enumerate(ld):
        got.append(_bytes(b))
        if i == 2:
            sd = ld.state_dict()
            break
    ld2 = _loader(workers=after)
    ld2.load_state_dict(sd)
    ld2.set_epoch(1)
    got += [_bytes(b) for b in ld2]
    assert got == ref


@pytest.mark.parametrize("ds,collate", [(Batched, None), (Augmenting, mixup)])
def test_batched_fetch_and_drawing_collate_are_seeded_per_batch(ds, collate):
    kw = {"collate_fn": collate} if collate else {}
    a = _loader(ds(), workers=0, **kw)
    b = _loader(ds(), workers=2, **kw)
    assert [_bytes(x) for x in a] == [_bytes(x) for x in b]


def test_subset_without_batched_fetch_is_seeded_per_sample():
    # torch's Subset always has __getitems__; over a dataset without one, it must not turn seeding per batch
    sub = torch.utils.data.Subset(Augmenting(), list(range(0, 24, 2)))
    ld = _loader(sub)
    for idx, x in ld:
        for k, (i, row) in enumerate(zip(idx.tolist(), x, strict=True)):
            j = i // 2  # the subset's index of dataset sample i
            assert torch.equal(row, ld.dataset[(0, j)][1]), (i, k)


def test_per_sample_seeds_reach_the_dataset():
    seen = []

    class Probe(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            seen.append((i, current_sample_seed()))
            return i

    ld = ResumableDataLoader(Probe(), batch_size=2, seed=3, shuffle=False)
    ld.set_epoch(2)
    list(ld)
    assert seen == [(i, sample_seed(3, 2, i)) for i in range(6)]
    assert current_sample_seed() is None  # restored after each batch in the main process


def test_training_rng_is_not_disturbed_by_augmentation_in_the_main_process():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    ld = _loader(collate_fn=mixup)
    for _ in ld:
        pass
    after = (random.getstate(), np.random.get_state()[1], torch.get_rng_state())
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])


def test_switching_per_sample_seeding_off_hands_the_dataset_over_untouched():
    ds = Augmenting()
    ld = _loader(ds, seed_per_sample=False)
    assert ld.dataset is ds and ld.source_dataset is ds
    assert len(list(ld)) == 6
    on = _loader(ds)
    assert on.source_dataset is ds and on.dataset.classes == ("a", "b")  # attributes reach through the wrapper
    clone = pickle.loads(pickle.dumps(on.dataset))
    assert torch.equal(clone[(1, 5)][1], on.dataset[(1, 5)][1])


@pytest.mark.parametrize("drop_last,n,expect", [(False, 26, 7), (True, 26, 6), (False, 24, 6)])
def test_len_is_the_whole_epoch_before_and_after_a_mid_epoch_restore(drop_last, n, expect):
    ld = _loader(Augmenting(n), drop_last=drop_last)
    assert len(ld) == expect and ld.remaining_batches == expect
    it = iter(ld)
    next(it), next(it)
    assert len(ld) == expect and ld.remaining_batches == expect - 2
    ld2 = _loader(Augmenting(n), drop_last=drop_last)
    ld2.load_state_dict(ld.state_dict())
    assert len(ld2) == expect and ld2.remaining_batches == expect - 2
    assert len(list(ld2)) == expect - 2
    assert len(ld2) == expect and ld2.remaining_batches == 0


def test_len_with_ranks_is_this_ranks_share():
    ld = ResumableDataLoader(Augmenting(24), batch_size=4, num_replicas=2, rank=1)
    assert len(ld) == 3 and len(ld.resumable_sampler) == 12


def test_auto_epoch_makes_the_simplest_loop_correct():
    def run(stop_at=None, sd=None):
        ld = _loader(auto_epoch=True)
        if sd is not None:
            ld.load_state_dict(sd)
        seen = []
        while len(seen) < 20:
            for b in ld:
                seen.append((ld.epoch, _bytes(b)))
                if len(seen) in (stop_at, 20):
                    return seen, ld.state_dict()
        return seen, ld.state_dict()

    full, _ = run()
    assert [e for e, _ in full] == [0] * 6 + [1] * 6 + [2] * 6 + [3] * 2
    for cut in (3, 6, 12, 13):  # mid-epoch and exactly at an epoch's last batch
        head, sd = run(stop_at=cut)
        tail, _ = run(sd=sd)
        assert [b for _, b in head + tail][:20] == [b for _, b in full], cut


def test_without_auto_epoch_a_finished_epoch_stays_finished():
    ld = _loader()
    assert len(list(ld)) == 6 and list(ld) == [] and ld.epoch == 0
    ld.set_epoch(1)
    assert len(list(ld)) == 6


# ------------------------------------------------------------------------------------------ iterable datasets
class Stream(torch.utils.data.IterableDataset):
    """An iterable dataset following the protocol: its position is its state."""

    def __init__(self, n: int = 22):
        self.n, self.pos, self.epoch = n, 0, 0

    def __iter__(self):
        while self.pos < self.n:
            i = self.pos
            self.pos += 1
            yield torch.tensor([float(i + 100 * self.epoch)]) + torch.rand(1)
        self.pos = 0

    def set_epoch(self, epoch):
        self.epoch, self.pos = epoch, 0

    def state_dict(self):
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, sd):
        self.pos, self.epoch = sd["pos"], sd["epoch"]


def test_iterable_dataset_resumes_exactly():
    def loader():
        return ResumableDataLoader(Stream(), batch_size=4, seed=1, auto_epoch=True)

    ref = []
    ld = loader()
    for _ in range(3):
        ref += [b.numpy().tobytes() for b in ld]
    assert len(ref) == 18
    for cut in (2, 6, 7):
        ld, got = loader(), []
        while len(got) < cut:
            for b in ld:
                got.append(b.numpy().tobytes())
                if len(got) == cut:
                    break
        sd = ld.state_dict()
        ld2 = loader()
        ld2.load_state_dict(sd)
        while len(got) < 18:
            got += [b.numpy().tobytes() for b in ld2]
        assert got == ref, cut


def test_iterable_dataset_that_cannot_resume_is_a_clear_error():
    class Plain(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(UnsupportedStateError, match="cannot resume Plain exactly: an IterableDataset keeps"):
        ResumableDataLoader(Plain())
    with pytest.raises(ConfigError, match="iterable dataset Stream with num_workers=0 only: with 2 workers"):
        ResumableDataLoader(Stream(), num_workers=2)
    with pytest.raises(StateMismatchError, match="saved for a map-style dataset, this loader reads an iterable"):
        ResumableDataLoader(Stream()).load_state_dict(_loader().state_dict())


def test_torchdata_stateful_dataloader_is_accepted_as_is(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")

    def loader():
        g = torch.Generator().manual_seed(0)
        return sdl.StatefulDataLoader(
            torch.utils.data.TensorDataset(torch.arange(40)), batch_size=4, shuffle=True, generator=g, num_workers=2
        )

    ref = [b[0].tolist() for b in loader()]
    ld, got = loader(), []
    mgr = resumekit.CheckpointManager(str(tmp_path), every_steps=1000)
    for b in ld:
        got.append(b[0].tolist())
        if len(got) == 4:
            mgr.save(4, {"data": ld}, block=True)
            break
    mgr.close()
    ld2 = loader()
    mgr2 = resumekit.CheckpointManager(str(tmp_path))
    assert mgr2.restore({"data": ld2}) == 4
    mgr2.close()
    assert got + [b[0].tolist() for b in ld2] == ref


# ------------------------------------------------------------------------------------------ seed_everything
def test_seed_everything_seeds_every_global_rng():
    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    assert resumekit.seed_everything(5) == 5
    a = draws()
    resumekit.seed_everything(5)
    assert draws() == a
    resumekit.seed_everything(6)
    assert draws() != a
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ConfigError, match="seed must be an integer in"):
            resumekit.seed_everything(bad)


def test_seed_everything_deterministic_switch(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    saved_cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        resumekit.seed_everything(0, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_cudnn


def test_persistent_workers_get_each_epoch_from_the_keys():
    # Persistent workers outlive an epoch; the epoch reaches them with every index, not through their copy.
    ld = _loader(workers=2, persistent_workers=True, auto_epoch=True)
    got = [_bytes(b) for _ in range(3) for b in ld]
    assert got == [b for e in range(3) for b in _epoch(0, epoch=e)]


# ------------------------------------------------------------------------------------------ Lightning
class _Abort(Exception):
    pass


def test_lightning_epoch_length_is_unchanged_after_a_mid_epoch_resume(tmp_path):
    """Lightning sizes every epoch from len(loader): a length that shrank after a restore cut later epochs short."""
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(3, 1)
            self.seen = []

        def training_step(self, batch, batch_idx):
            idx, x = batch
            self.seen.append((self.current_epoch, batch_idx, self.trainer.num_training_batches, idx.tolist()))
            return self.net(x).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class StopMidEpoch(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 3:
                trainer.save_checkpoint(str(tmp_path / "mid.ckpt"))
                raise _Abort()

    def fit(callbacks=(), ckpt=None):
        module = Module()
        trainer = pl.Trainer(
            max_epochs=3,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=list(callbacks),
        )
        loader = _loader(Augmenting(40))  # 10 batches per epoch
        try:
            trainer.fit(module, loader, ckpt_path=ckpt)
        except _Abort:
            pass
        return module.seen, loader

    straight, _ = fit()
    head, _ = fit([StopMidEpoch()])
    tail, loader = fit(ckpt=str(tmp_path / "mid.ckpt"))
    per_epoch = [sum(1 for e, *_ in straight if e == k) for k in range(3)]
    assert per_epoch == [10, 10, 10]
    assert [s[0] for s in tail].count(1) == 6 and [s[0] for s in tail].count(2) == 10  # not 6: the whole epoch
    assert {s[2] for s in tail} == {10} and len(loader) == 10
    assert [s[3] for s in head] + [s[3] for s in tail] == [s[3] for s in straight]  # same batches, same order
