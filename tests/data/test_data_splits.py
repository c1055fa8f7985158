"""Labeled/unlabeled/val splits: deterministic from a seed, disjoint where they must be,
saved and read back to the same indices, never drawn from the test set."""

import json

import numpy as np
import pytest

from mpl_fast.data.config import DataConfig
from mpl_fast.data.files import resolve_split
from mpl_fast.data.splits import draw_split, read_split_file, save_split, split_from_record, split_record


@pytest.fixture
def labels():
    return np.random.default_rng(1).permutation(np.repeat(np.arange(10), 50))


def test_draw_is_deterministic_and_per_class(labels):
    a = draw_split(labels, 10, seed=3, labels_per_class=4, val_per_class=5)
    b = draw_split(labels, 10, seed=3, labels_per_class=4, val_per_class=5)
    c = draw_split(labels, 10, seed=4, labels_per_class=4, val_per_class=5)
    for key in ("labeled", "val", "unlabeled"):
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["labeled"], c["labeled"])
    assert np.bincount(labels[a["labeled"]], minlength=10).tolist() == [4] * 10
    assert np.bincount(labels[a["val"]], minlength=10).tolist() == [5] * 10


def test_val_is_disjoint_from_labeled_and_unlabeled(labels):
    s = draw_split(labels, 10, seed=0, labels_per_class=4, val_per_class=5)
    assert np.intersect1d(s["val"], s["labeled"]).size == 0
    assert np.intersect1d(s["val"], s["unlabeled"]).size == 0
    # Unlabeled = every other training sample, labeled ones included (labels unused).
    assert len(s["unlabeled"]) == len(labels) - 50
    assert np.isin(s["labeled"], s["unlabeled"]).all()


def test_labeled_fraction_and_all_labeled(labels):
    s = draw_split(labels, 10, seed=0, labeled_fraction=0.1)
    assert np.bincount(labels[s["labeled"]]).tolist() == [5] * 10
    s = draw_split(labels, 10, seed=0, val_per_class=10)
    assert len(s["labeled"]) == 400
    with pytest.raises(ValueError, match="not both"):
        draw_split(labels, 10, seed=0, labels_per_class=1, labeled_fraction=0.5)


def test_short_class_warns(labels):
    with pytest.warns(UserWarning, match="fewer training samples"):
        s = draw_split(labels[:60], 10, seed=0, labels_per_class=20)
    assert len(s["labeled"]) == 60


def test_record_round_trip_by_index_and_by_path(tmp_path, labels):
    s = draw_split(labels, 10, seed=5, labels_per_class=3, val_per_class=2)
    for keys in (list(range(len(labels))), [f"train/c{c}/img{i}.jpg" for i, c in enumerate(labels)]):
        record = split_record(s, keys, dataset="x", seed=5)
        assert record["unlabeled"] == "rest"
        path = str(tmp_path / "split.json")
        save_split(record, path)
        back = split_from_record(read_split_file(path), keys, labels, 10, seed=99)
        for key in ("labeled", "val", "unlabeled"):
            assert np.array_equal(back[key], s[key]), key


def test_text_file_list_draws_val_from_the_rest(tmp_path, labels):
    keys = [f"train/{i}.png" for i in range(len(labels))]
    path = tmp_path / "labeled.txt"
    path.write_text("# my labels\ntrain/3.png\ntrain/7.png\n\ntrain/11.png\n")
    s = split_from_record(read_split_file(str(path)), keys, labels, 10, seed=0, val_per_class=2)
    assert s["labeled"].tolist() == [3, 7, 11]
    assert len(s["val"]) == 20 and np.intersect1d(s["val"], s["labeled"]).size == 0


def test_bad_split_files(tmp_path, labels):
    keys = list(range(len(labels)))
    with pytest.raises(ValueError, match=r"labeled sample 9999 is not in the training set"):
        split_from_record({"labeled": [1, 9999]}, keys, labels, 10, seed=0)
    with pytest.raises(ValueError, match=r"made for a training set of 7 samples"):
        split_from_record({"labeled": [1], "num_train": 7}, keys, labels, 10, seed=0)
    with pytest.raises(ValueError, match=r"overlap"):
        split_from_record({"labeled": [1, 2], "val": [2]}, keys, labels, 10, seed=0)
    with pytest.raises(FileNotFoundError, match=r"split file .* does not exist"):
        read_split_file(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"not valid JSON"):
        read_split_file(str(bad))


def test_split_comes_from_train_only_and_config_split_file_reproduces_it(tmp_path):
    from mpl_fast.data.files import load_source
    from mpl_fast.data.tiny import write_tiny_cifar

    root = write_tiny_cifar(str(tmp_path / "c10"), train_per_class=8, test_per_class=4)
    cfg = DataConfig(dataset="cifar10", data_dir=root, labels_per_class=2, val_per_class=1)
    source = load_source(cfg)
    split, record = resolve_split(cfg, source, seed=11)
    # Every index is a training index; the test images (a separate batch) are never named.
    train_rows = {source.train.images[i].tobytes() for i in range(len(source.train))}
    test_rows = {img.tobytes() for img in source.test.images}
    assert not train_rows & test_rows
    for key in ("labeled", "val", "unlabeled"):
        assert split[key].max() < len(source.train)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(record))
    cfg2 = DataConfig(dataset="cifar10", data_dir=root, split_file=str(path))
    split2, record2 = resolve_split(cfg2, source, seed=0)
    assert record2["labeled"] == record["labeled"] and record2["val"] == record["val"]
