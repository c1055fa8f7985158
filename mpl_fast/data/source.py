"""What a reader hands to the pipelines: the training and test sets of one data set on disk."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LabeledSet:
    """Images and labels of one split of a data set.

    images: uint8 array (N, H, W, 3) for in-memory data sets (CIFAR, SVHN), or a list of
            absolute file paths for image files (ImageFolder).
    labels: int64 array (N,).
    keys:   how each sample is named in a saved split: its index for arrays, its path
            relative to the data directory for files (so a split survives moving the data).
    """

    images: np.ndarray | list[str]
    labels: np.ndarray
    keys: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_files(self) -> bool:
        return isinstance(self.images, list)


@dataclass
class DatasetSource:
    """A data set as read from disk: train and test sets, classes and normalisation."""

    name: str
    train: LabeledSet
    test: LabeledSet
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int                  # native (arrays) or default crop size (files)
    flip: bool = True                # horizontal flip in the weak view (not for digits: SVHN)
    skipped: dict = field(default_factory=dict)  # files the reader left out, by reason
    extra_unlabeled: LabeledSet | None = None  # images for the unlabeled pool only (SVHN's extra set)


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """``labels`` as int64, or a ValueError naming ``where`` if any is outside [0, num_classes)."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(f"{where}: label {labels[bad[0]]} at position {bad[0]} is outside "
                         f"0..{num_classes - 1} ({bad.size} labels out of range); the file is "
                         "damaged or belongs to another data set")
    return labels
