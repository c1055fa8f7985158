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
