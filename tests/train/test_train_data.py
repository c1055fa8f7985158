"""The embedded data sets: splits, views, and exact resumption of the streams."""

import pytest
import torch

from mpl_fast.data import DataConfig, build_streams


def _cfg(dataset="digits", **kw):
    base = dict(dataset=dataset, labels_per_class=3, val_per_class=5 if dataset == "digits" else 0,
                batch_size=8, mu=2, eval_batch_size=100)
    base.update(kw)
    return DataConfig(**base)


def test_digits_split():
    s = build_streams(_cfg(), seed=0)
    assert s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert len(s.split["labeled"]) == 30 and len(s.split["val"]) == 50
    assert not set(s.split["labeled"]) & set(s.split["val"])
    assert sum(len(y) for _, y in s.test) == s.split["num_test"] == 540
    assert s.split["num_unlabeled"] == 1257 - 50
    other = build_streams(_cfg(), seed=1)
    assert other.split["labeled"] != s.split["labeled"]                    # the seed draws the labels
    assert torch.equal(other.test[0][0], s.test[0][0])                     # the test split is fixed
    x, y = next(s.labeled)
    assert x.shape == (8, 1, 8, 8) and y.dtype == torch.int64
    weak, strong = next(s.unlabeled)
    assert weak.shape == strong.shape == (16, 1, 8, 8)
    assert 0 <= strong.min() and strong.max() <= 1
    assert (weak - strong).abs().mean() > 0.05


def test_two_moons():
    s = build_streams(_cfg("two-moons", batch_size=6, mu=4), seed=0)
    assert s.num_classes == 2 and s.input_shape == (2,)
    assert len(s.split["labeled"]) == 6 and s.val == []
    x, y = next(s.labeled)
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]


def test_full_unlabeled_batch_is_the_whole_pool_in_a_fresh_order_each_step():
    s = build_streams(_cfg("two-moons", batch_size=6, mu=2, full_unlabeled_batch=True), seed=0)
    pool = s.split["num_unlabeled"]
    assert pool == 2000
    first, second = next(s.unlabeled)[0], next(s.unlabeled)[0]   # weak views = the points themselves
    assert first.shape == second.shape == (pool, 2)
    key = lambda x: sorted(map(tuple, x.tolist()))  # noqa: E731 - every point once, in any order
    assert key(first) == key(second)
    assert len(set(key(first))) == pool
    assert not torch.equal(first, second)                            # reshuffled between steps
    small = build_streams(_cfg("two-moons", batch_size=6, mu=2), seed=0)
    assert next(small.unlabeled)[0].shape == (12, 2)                  # without it: mu * batch_size


def test_full_unlabeled_batch_splits_over_ranks_or_is_refused():
    cfg = _cfg("two-moons", batch_size=3, full_unlabeled_batch=True)
    assert next(build_streams(cfg, seed=0, rank=1, world_size=2).unlabeled)[0].shape == (1000, 2)
    with pytest.raises(ValueError, match="do not split evenly over 3 ranks"):
        build_streams(cfg, seed=0, rank=0, world_size=3)


@pytest.mark.parametrize("std", [0.05, 0.15])
def test_two_moons_strong_view_jitter_has_the_configured_spread(std):
    s = build_streams(_cfg("two-moons", batch_size=6, full_unlabeled_batch=True, jitter_std=std), seed=0)
    weak, strong = next(s.unlabeled)
    assert (strong - weak).std().item() == pytest.approx(std, rel=0.05)


def test_full_unlabeled_batch_is_refused_for_file_data_sets():
    from mpl_fast.train.config import preset, validate

    cfg = preset("cifar10-4k")
    cfg.data.full_unlabeled_batch = True
    with pytest.raises(ValueError, match="--data.full-unlabeled-batch is for the embedded data sets"):
        validate(cfg)
    cfg = preset("two-moons")
    cfg.data.jitter_std = -0.1
    with pytest.raises(ValueError, match="--data.jitter-std -0.1: must be a finite number >= 0"):
        validate(cfg)


@pytest.mark.parametrize("dataset", ["digits", "two-moons"])
def test_streams_resume_exactly(dataset):
    a = build_streams(_cfg(dataset), seed=3)
    for _ in range(7):
        next(a.labeled), next(a.unlabeled)
    states = a.labeled.state_dict(), a.unlabeled.state_dict()
    expect = [(next(a.labeled), next(a.unlabeled)) for _ in range(9)]
    b = build_streams(_cfg(dataset), seed=3)
    b.labeled.load_state_dict(states[0])
    b.unlabeled.load_state_dict(states[1])
    for (l1, u1) in expect:
        l2, u2 = next(b.labeled), next(b.unlabeled)
        for t1, t2 in zip((*l1, *u1), (*l2, *u2)):
            assert torch.equal(t1, t2)


def test_too_many_labels_per_class_is_refused():
    with pytest.raises(ValueError, match="fewer than"):
        build_streams(_cfg(labels_per_class=200), seed=0)
