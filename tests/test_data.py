import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resumekit import ResumableDataLoader, ResumableSampler
from resumekit.errors import StateMismatchError


def test_order_depends_only_on_seed_and_epoch():
    a, b = ResumableSampler(100, seed=3), ResumableSampler(100, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(ResumableSampler(100, seed=3)) != list(ResumableSampler(100, seed=4))
    assert sorted(ResumableSampler(100, seed=3)) == list(range(100))


def test_mid_epoch_resume_continues_exactly():
    s = ResumableSampler(50, seed=1)
    s.set_epoch(2)
    full = list(s)
    s2 = ResumableSampler(50, seed=1)
    s2.set_epoch(2)
    it = iter(s2)
    head = [next(it) for _ in range(17)]
    sd = s2.state_dict()
    s3 = ResumableSampler(50, seed=1)
    s3.load_state_dict(sd)
    s3.set_epoch(2)  # same epoch: keeps the position
    assert head + list(s3) == full


def test_skip_is_constant_time():
    # Skipping to the end of a 10M-sample epoch must not iterate the skipped part.
    s = ResumableSampler(10_000_000, seed=0, shuffle=False)
    s.position = 10_000_000 - 3
    t = time.perf_counter()
    assert list(s) == [9_999_997, 9_999_998, 9_999_999]
    assert time.perf_counter() - t < 1.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), w1=st.integers(1, 4), w2=st.integers(1, 4), cut=st.integers(0, 60))
def test_global_order_survives_world_size_change(n, w1, w2, cut):
    """Consume `cut` rounds with w1 ranks, resume with w2 ranks: the global sequence is the 1-rank sequence."""
    ref = ResumableSampler(n, seed=5, num_replicas=1, rank=0, drop_last=True)
    ref_order = list(ref)
    ranks = [ResumableSampler(n, seed=5, num_replicas=w1, rank=r, drop_last=True) for r in range(w1)]
    its = [iter(r) for r in ranks]
    seen = []
    rounds = min(cut, len(ranks[0]))
    for _ in range(rounds):
        seen.extend(next(i) for i in its)
    sd = ranks[0].state_dict()
    ranks2 = [ResumableSampler(n, seed=5, num_replicas=w2, rank=r, drop_last=True) for r in range(w2)]
    for r in ranks2:
        r.load_state_dict(sd)
    rest = [list(r) for r in ranks2]
    for k in range(max(map(len, rest), default=0)):
        seen.extend(r[k] for r in rest if k < len(r))
    assert seen == ref_order[: len(seen)]
    assert len(set(seen)) == len(seen)  # nothing repeated


def test_dataset_change_is_a_clear_error():
    sd = ResumableSampler(10).state_dict()
    with pytest.raises(StateMismatchError, match="dataset of 10 samples, this one has 11"):
        ResumableSampler(11).load_state_dict(sd)


class Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        # torch's RNG inside a worker: seeded from the loader's per-epoch generator
        return i, torch.rand(1).item()


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_position_exact_with_workers(workers):
    straight = ResumableDataLoader(Squares(), batch_size=4, seed=2, num_workers=workers)
    straight.set_epoch(1)
    ref = [b[0].tolist() for b in straight]
    ld = ResumableDataLoader(Squares(), batch_size=4, seed=2, num_workers=workers)
    ld.set_epoch(1)
    got = []
    for i, b in enumerate(ld):
        got.append(b[0].tolist())
        if i == 3:
            sd = ld.state_dict()  # workers have prefetched ahead; the state must still say 4 batches
            break
    assert sd["position"] == 16
    ld2 = ResumableDataLoader(Squares(), batch_size=4, seed=2, num_workers=workers)
    ld2.load_state_dict(sd)
    ld2.set_epoch(1)
    got += [b[0].tolist() for b in ld2]
    assert got == ref


def test_worker_seeding_is_deterministic_per_epoch():
    def draws(epoch):
        ld = ResumableDataLoader(Squares(), batch_size=4, seed=2, num_workers=2)
        ld.set_epoch(epoch)
        return [b[1].tolist() for b in ld]

    torch.manual_seed(1)
    a = draws(3)
    torch.manual_seed(999)  # the global RNG must not matter
    assert draws(3) == a
    assert draws(4) != a


def test_loader_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    ld = ResumableDataLoader(torch.utils.data.TensorDataset(torch.arange(40)), batch_size=4, seed=2)
    for _ in ld:
        break
    assert torch.equal(before, torch.get_rng_state())
