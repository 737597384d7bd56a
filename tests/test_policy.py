import pytest
from hypothesis import given
from hypothesis import strategies as st

from resumekit.errors import ConfigError
from resumekit.policy import RetentionPolicy, SavePolicy, young_interval


def test_every_steps():
    p = SavePolicy(every_steps=10)
    assert [s for s in range(1, 35) if p.due(s, 0.0, 0.0, None)] == [10, 20, 30]


def test_every_seconds_and_never_twice():
    p = SavePolicy(every_seconds=5)
    assert not p.due(3, now=4.0, last_save_time=0.0, last_saved_step=None)
    assert p.due(3, now=5.0, last_save_time=0.0, last_saved_step=None)
    assert not p.due(3, now=50.0, last_save_time=0.0, last_saved_step=3)


@pytest.mark.parametrize(
    "kw", [{"every_steps": 0}, {"every_steps": 1.5}, {"every_seconds": -1}, {"every_seconds": float("inf")}]
)
def test_save_policy_validation_names_field(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        SavePolicy(**kw)


def test_retention_validation():
    with pytest.raises(ConfigError, match="best_metric"):
        RetentionPolicy(keep_best=2)
    with pytest.raises(ConfigError, match="best_mode"):
        RetentionPolicy(keep_best=1, best_metric="loss", best_mode="up")


def test_keep_last_and_every():
    p = RetentionPolicy(keep_last=2, keep_every=100)
    assert p.to_delete([50, 100, 150, 200, 250, 300]) == [50, 150]


def test_keep_best():
    p = RetentionPolicy(keep_last=1, keep_best=1, best_metric="loss")
    metrics = {1: {"loss": 0.5}, 2: {"loss": 0.1}, 3: {"loss": 0.9}, 4: {"loss": 0.7}}
    assert p.to_delete([1, 2, 3, 4], metrics) == [1, 3]


def test_inactive_policy_keeps_everything():
    assert RetentionPolicy().to_delete([1, 2, 3]) == []


@given(
    steps=st.sets(st.integers(0, 10**9), min_size=1, max_size=40),
    keep_last=st.one_of(st.none(), st.integers(1, 5)),
    keep_every=st.one_of(st.none(), st.integers(1, 1000)),
    protected=st.sets(st.integers(0, 10**9), max_size=3),
)
def test_never_deletes_newest_or_protected(steps, keep_last, keep_every, protected):
    p = RetentionPolicy(keep_last=keep_last, keep_every=keep_every)
    doomed = p.to_delete(sorted(steps), protected=protected)
    assert max(steps) not in doomed
    assert not set(doomed) & protected
    assert set(doomed) <= steps
    if keep_last:
        assert not set(doomed) & set(sorted(steps)[-keep_last:])


def test_young_interval():
    assert young_interval(2.0, 3600.0) == pytest.approx(120.0)
