"""Unlabeled images beside the training set: SVHN's extra_32x32.mat joins the unlabeled pool
when present; --data.unlabeled-dir adds a folder or a file list of images to an ImageFolder's
pool. Labeled and validation samples stay within the training set."""

import os

import numpy as np
import pytest

from mpl_fast.data import build_streams
from mpl_fast.data.config import DataConfig
from mpl_fast.data.tiny import write_tiny_imagefolder, write_tiny_svhn


def _write_extra(root, n):
    from scipy.io import savemat

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    savemat(os.path.join(root, "extra_32x32.mat"), {"X": images, "y": np.ones((n, 1), np.uint8)})


def test_svhn_extra_joins_the_unlabeled_pool_only(tmp_path):
    root = write_tiny_svhn(str(tmp_path / "svhn"), train_per_class=4, test_per_class=1)
    cfg = DataConfig(dataset="svhn", data_dir=root, labels_per_class=1, val_per_class=1, batch_size=4, mu=2,
                     loader="torch", num_workers=0)
    without = build_streams(cfg, seed=0)
    assert "unlabeled_extra" not in without.split
    _write_extra(root, 12)
    streams = build_streams(cfg, seed=0)
    assert streams.split["unlabeled_extra"] == {"source": "svhn extra", "count": 12}
    assert streams.split["labeled"] == without.split["labeled"] and streams.split["val"] == without.split["val"]
    weak, strong = next(streams.unlabeled)
    assert weak.shape == strong.shape == (8, 3, 32, 32)


def test_the_pool_indices_of_the_extra_images_follow_the_training_set():
    from mpl_fast.data.source import LabeledSet
    from mpl_fast.data.unlabeled import with_extra_unlabeled

    train = LabeledSet(np.zeros((5, 2, 2, 3), np.uint8), np.arange(5), list(range(5)))
    extra = LabeledSet(np.ones((3, 2, 2, 3), np.uint8), np.full(3, -1), ["e0", "e1", "e2"])
    split = {"labeled": np.array([0]), "val": np.array([1]), "unlabeled": np.array([0, 2, 3, 4])}
    joined, out = with_extra_unlabeled(train, extra, split)
    assert out["unlabeled"].tolist() == [0, 2, 3, 4, 5, 6, 7] and out["labeled"].tolist() == [0]
    assert len(joined) == 8 and joined.images[5:].min() == 1 and joined.labels[5:].tolist() == [-1] * 3


def test_unlabeled_dir_as_a_folder_or_a_file_list(tmp_path):
    root = write_tiny_imagefolder(str(tmp_path / "photos"), num_classes=2, train_per_class=3, val_per_class=1,
                                  bad_files=False)
    more = write_tiny_imagefolder(str(tmp_path / "more"), num_classes=2, train_per_class=2, val_per_class=1,
                                  bad_files=False, seed=3)
    cfg = DataConfig(dataset="imagefolder", data_dir=root, labels_per_class=1, val_per_class=1, batch_size=2,
                     mu=2, image_size=16, loader="torch", num_workers=0, unlabeled_dir=more)
    streams = build_streams(cfg, seed=0)
    assert streams.split["unlabeled_extra"]["count"] == 6  # train/ and val/ of the other folder, labels ignored
    weak, _ = next(streams.unlabeled)
    assert weak.shape == (4, 3, 16, 16)

    listing = tmp_path / "list.txt"
    files = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs in os.walk(os.path.join(more, "train"))
                   for f in fs)
    listing.write_text("# unlabeled images\n" + "\n".join(files) + "\n\n")
    cfg.unlabeled_dir = str(listing)
    assert build_streams(cfg, seed=0).split["unlabeled_extra"]["count"] == 4

    listing.write_text("nowhere.jpg\n")
    with pytest.raises(FileNotFoundError, match="do not exist, e.g. .*nowhere.jpg"):
        build_streams(cfg, seed=0)
    cfg.unlabeled_dir = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a file list"):
        build_streams(cfg, seed=0)


def test_unlabeled_dir_is_refused_for_array_data_sets(tmp_path):
    root = write_tiny_svhn(str(tmp_path / "svhn"), train_per_class=2, test_per_class=1)
    cfg = DataConfig(dataset="svhn", data_dir=root, labels_per_class=1, batch_size=2, mu=1, loader="torch",
                     num_workers=0, unlabeled_dir=str(tmp_path))
    with pytest.raises(ValueError, match="--data.unlabeled-dir .* imagefolder"):
        build_streams(cfg, seed=0)


@pytest.mark.parametrize("preset", ["digits", "two-moons"])
def test_the_trainer_refuses_unlabeled_dir_for_embedded_data_sets(preset, tmp_path, capsys):
    """Their streams never read the folder: a run with it would silently train without it."""
    from mpl_fast.train.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["--preset", preset, "--data.unlabeled-dir", str(tmp_path), "--steps", "1", "--dry-run"])
    err = capsys.readouterr().err
    assert stop.value.code != 0 and f"--data.dataset {preset} does not read it" in err and "Traceback" not in err
