"""The teacher-label store: layout, crash-safe commits, distributions, one-sentence refusals."""

import json
import os

import numpy as np
import pytest
import torch

from mpl_fast.reduced.store import (
    MANIFEST,
    StoreError,
    TeacherLabelStore,
    bytes_per_image,
    merge_ranges,
    missing_ranges,
    spread_topk,
)

DATASET = {"name": "toy", "num_images": 10, "sha256": "ab" * 32}


def _create(folder, n=10, c=6, k=3, dataset=DATASET):
    return TeacherLabelStore.create(str(folder), num_images=n, num_classes=c, k=k, teacher={"sha256": "0" * 64},
                                    preprocessing={"view": "eval"}, dataset=dict(dataset, num_images=n))


def _topk_rows(n, c, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(2 * torch.randn(n, c, generator=g), 1)
    return p, *p.topk(k, 1)


def test_bytes_per_image_rule():
    assert bytes_per_image(8, 1000) == 8 * 2 + 8 * 2 == 32   # 100M images: 3.2 GB
    assert bytes_per_image(1000, 1000) == 4000                 # all ImageNet classes: 400 GB for 100M
    assert bytes_per_image(8, 40000) == 8 * 2 + 8 * 4          # more classes than int16 holds


def test_files_are_sized_and_int32_beyond_int16(tmp_path):
    s = _create(tmp_path / "a", n=10, c=6, k=3)
    assert os.path.getsize(tmp_path / "a" / "probs.f16") == 10 * 3 * 2
    assert os.path.getsize(tmp_path / "a" / "classes.i16") == 10 * 3 * 2
    assert s.manifest["bytes_per_image"] == 12
    big = _create(tmp_path / "b", n=4, c=40000, k=2)
    assert big.classes.dtype == np.int32 and os.path.getsize(tmp_path / "b" / "classes.i32") == 4 * 2 * 4
    big.write(0, torch.full((4, 2), 0.5), torch.tensor([[39999, 32768]] * 4))
    assert big.topk([3])[1].tolist() == [[39999, 32768]]


def test_ranges():
    assert merge_ranges([[5, 7], [0, 2], [2, 4], [6, 9], [10, 10]]) == [[0, 4], [5, 9]]
    assert missing_ranges([[0, 4], [5, 9]], 0, 12) == [[4, 5], [9, 12]]
    assert missing_ranges([[0, 4]], 2, 3) == []
    assert missing_ranges([], 3, 8) == [[3, 8]]


def test_round_trip_and_distributions(tmp_path):
    n, c, k = 10, 6, 3
    s = _create(tmp_path, n, c, k)
    _, vals, idx = _topk_rows(n, c, k)
    s.write(0, vals, idx)
    s.commit([[0, n]])
    r = TeacherLabelStore.open(str(tmp_path))
    r.check_compatible(num_classes=c, dataset=dict(DATASET, num_images=n))
    d = r.distributions(torch.tensor([7, 2, 7]))
    assert d.shape == (3, c) and d.dtype == torch.float32
    torch.testing.assert_close(d.sum(1), torch.ones(3), rtol=0, atol=2e-3)  # fp16 round-off of k values
    rows = torch.tensor([7, 2, 7])
    stored = vals[rows].half().float()
    # the top k in their classes, exactly the stored fp16 values
    assert torch.equal(d.gather(1, idx[rows]), stored)
    # the rest of the mass spread evenly over the other classes
    rest = (1 - stored.sum(1, keepdim=True)).clamp(min=0) / (c - k)
    others = torch.ones(3, c, dtype=torch.bool).scatter_(1, idx[rows], False)
    torch.testing.assert_close(d[others].view(3, c - k), rest.expand(3, c - k))
    assert (d[others].view(3, c - k).amax(1) <= stored.amin(1) + 1e-3).all()


def test_all_classes_stored_is_the_distribution_itself(tmp_path):
    n, c = 10, 6
    s = _create(tmp_path, n, c, k=c)
    p, vals, idx = _topk_rows(n, c, c)
    s.write(0, vals, idx)
    s.commit([[0, n]])
    torch.testing.assert_close(s.distributions(torch.arange(n)), p, rtol=2 ** -11, atol=1e-7)


def test_spread_clamps_fp16_overshoot():
    probs = torch.tensor([[0.6, 0.4004]])  # sums above 1 after fp16 rounding
    d = spread_topk(probs, torch.tensor([[1, 0]]), 4)
    assert (d >= 0).all() and d[0, 2] == 0 and d[0, 3] == 0


def test_uncommitted_rows_are_not_done(tmp_path):
    """A kill after writing rows but before their commit: the manifest does not list them."""
    s = _create(tmp_path, n=10)
    _, vals, idx = _topk_rows(10, 6, 3)
    s.write(0, vals[:4], idx[:4])
    s.commit([[0, 4]])
    s.write(4, vals[4:8], idx[4:8])      # written, flushed or not, never committed
    s.flush()
    del s
    r = TeacherLabelStore.open(str(tmp_path), writable=True)
    assert r.done == [[0, 4]] and r.missing(0, 10) == [[4, 10]] and not r.complete
    with pytest.raises(StoreError, match=r"incomplete \(6 of 10 images not labelled yet\).*run the same"):
        r.check_compatible(num_classes=6)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp manifest left behind


def test_refusals_are_one_sentence(tmp_path):
    s = _create(tmp_path / "s", n=10)
    s.commit([[0, 10]])
    with pytest.raises(StoreError, match="over 6 classes but this run's data set and networks have 10"):
        s.check_compatible(num_classes=10)
    with pytest.raises(StoreError, match=r"made for another data set \(name 'toy' there, 'digits' here\)"):
        s.check_compatible(dataset={"name": "digits", "num_images": 10})
    with pytest.raises(StoreError, match="another data set .*content hash"):
        s.check_compatible(dataset=dict(DATASET, sha256="cd" * 32))
    with pytest.raises(StoreError, match="image index 10 is outside the label store's 0..9"):
        s.distributions(torch.tensor([3, 10]))
    with pytest.raises(StoreError, match="--top-k 7 must be between 1 and the teacher's 6 classes"):
        _create(tmp_path / "k", c=6, k=7)
    with pytest.raises(StoreError, match="already holds a label store"):
        _create(tmp_path / "s")
    with pytest.raises(StoreError, match="is not a teacher-label store"):
        TeacherLabelStore.open(str(tmp_path / "nowhere"))


def test_damaged_store_is_refused(tmp_path):
    _create(tmp_path, n=10)
    with open(tmp_path / "probs.f16", "r+b") as f:
        f.truncate(7)
    with pytest.raises(StoreError, match="probs.f16 has 7 bytes where the manifest's 10 images x k=3 need 60"):
        TeacherLabelStore.open(str(tmp_path))
    m = json.loads((tmp_path / MANIFEST).read_text())
    m["k"] = 9
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(StoreError, match="k = 9 for 6 classes"):
        TeacherLabelStore.open(str(tmp_path))
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(StoreError, match="cannot be read as JSON"):
        TeacherLabelStore.open(str(tmp_path))


def test_stored_teacher_inputs_fetch_by_index(tmp_path):
    from mpl_fast.reduced.stream import StoredTeacherInputs

    s = _create(tmp_path, n=10, c=6, k=6)
    p, vals, idx = _topk_rows(10, 6, 6)
    s.write(0, vals, idx)
    s.commit([[0, 10]])

    class Fake:
        def __init__(self, with_index=True):
            self.n, self.with_index = 0, with_index

        def __next__(self):
            self.n += 1
            index = torch.tensor([self.n, 9 - self.n])
            strong = torch.full((2, 1, 8, 8), float(self.n))
            return (strong, strong, index) if self.with_index else (strong, strong)

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    stream = StoredTeacherInputs(Fake(), TeacherLabelStore.open(str(tmp_path)))
    dist, strong = next(stream)
    assert strong[0, 0, 0, 0] == 1 and dist.shape == (2, 6)
    torch.testing.assert_close(dist, p[[1, 8]], rtol=2 ** -11, atol=1e-7)
    state = stream.state_dict()
    next(stream)
    stream.load_state_dict(state)
    torch.testing.assert_close(next(stream)[0], p[[2, 7]], rtol=2 ** -11, atol=1e-7)
    with pytest.raises(ValueError, match="yields no image indices"):
        next(StoredTeacherInputs(Fake(with_index=False), s))
