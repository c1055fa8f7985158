"""SVHN (cropped digits) from its MATLAB files train_32x32.mat and test_32x32.mat, and
extra_32x32.mat when present: its 531k images join the unlabeled pool only (the paper's
SVHN-1K draws unlabeled images from train + extra, 604k). Nothing is downloaded."""

from __future__ import annotations

import os

import numpy as np

from mpl_fast.data.source import DatasetSource, LabeledSet, check_labels

SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)
_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
EXTRA_FILE = "extra_32x32.mat"


def _read_mat(path: str) -> LabeledSet:
    from scipy.io import loadmat  # scipy: only needed for SVHN

    try:
        mat = loadmat(path)
        x, y = mat["X"], mat["y"]
    except Exception as e:
        raise ValueError(f"{path} is not a readable SVHN .mat file with 'X' and 'y' "
                         f"({type(e).__name__}: {e}); download it again") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise ValueError(f"{path}: expected 'X' as uint8 (32, 32, 3, N), found {x.dtype} {x.shape}")
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(y) != x.shape[3]:
        raise ValueError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    y = np.where(y == 10, 0, y)   # SVHN writes the digit 0 as label 10
    labels = check_labels(y, 10, path)
    return LabeledSet(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), labels, list(range(len(labels))))


def load_svhn(data_dir: str) -> DatasetSource:
    """SVHN train and test sets read from ``data_dir``."""
    paths = {k: os.path.join(data_dir, f) for k, f in _FILES.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"expected SVHN files train_32x32.mat and test_32x32.mat in {data_dir} (missing: "
            f"{', '.join(os.path.basename(p) for p in missing)}); get them from "
            "http://ufldl.stanford.edu/housenumbers/ (format 2, cropped digits) and put them there")
    extra_path = os.path.join(data_dir, EXTRA_FILE)
    extra = None
    if os.path.isfile(extra_path):
        extra = _read_mat(extra_path)
        extra.labels = np.full(len(extra), -1, dtype=np.int64)  # never read: unlabeled pool only
        extra.keys = [f"extra/{i}" for i in range(len(extra))]
    return DatasetSource(
        name="svhn", train=_read_mat(paths["train"]), test=_read_mat(paths["test"]),
        num_classes=10, classes=[str(i) for i in range(10)], mean=SVHN_MEAN, std=SVHN_STD,
        image_size=32, flip=False, extra_unlabeled=extra)
