"""Labeled / unlabeled / validation splits of a training set, drawn deterministically from a
seed (CIFAR-10-4K, SVHN-1K, ImageNet-10%) or read from a file, and saved with the run.

A split only ever indexes the *training* set: the test set is read separately and never
enters it. Validation samples are drawn first and are disjoint from both labeled and unlabeled
samples; the unlabeled set is every other training sample (labeled ones included, their labels
unused), as in the paper's CIFAR-10-4K setting.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

SPLIT_FORMAT = "mpl_fast.split/1"


def draw_split(labels: np.ndarray, num_classes: int, *, seed: int,
               labels_per_class: int | None = None, labeled_fraction: float | None = None,
               val_per_class: int = 0) -> dict[str, np.ndarray]:
    """Indices of the labeled, unlabeled and val samples, the same for the same seed.

    Per class: ``val_per_class`` samples for validation, then ``labels_per_class`` (or
    ``labeled_fraction`` of what remains, at least one) labeled samples. With neither given,
    every non-validation sample is labeled.
    """
    if labels_per_class is not None and labeled_fraction is not None:
        raise ValueError("give labels_per_class or labeled_fraction, not both")
    if labeled_fraction is not None and not 0.0 < labeled_fraction <= 1.0:
        raise ValueError(f"labeled_fraction must be in (0, 1], got {labeled_fraction}")
    if labels_per_class is not None and labels_per_class < 1:
        raise ValueError(f"labels_per_class must be at least 1, got {labels_per_class}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    labeled, val, short = [], [], []
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        val.append(members[:val_per_class])
        rest = members[val_per_class:]
        if labels_per_class is not None:
            n = labels_per_class
        elif labeled_fraction is not None:
            n = max(1, round(labeled_fraction * len(rest))) if len(rest) else 0
        else:
            n = len(rest)
        if len(members) < val_per_class + n:
            short.append(f"{c} ({len(members)})")
        labeled.append(rest[:n])
    if short:
        warnings.warn(f"classes with fewer training samples than the {val_per_class} val + "
                      f"{labels_per_class or 'requested'} labeled asked for, all used: "
                      f"{', '.join(short[:10])}", stacklevel=2)
    val_idx = np.sort(np.concatenate(val)).astype(np.int64)
    return {"labeled": np.sort(np.concatenate(labeled)).astype(np.int64),
            "val": val_idx,
            "unlabeled": np.setdiff1d(np.arange(len(labels)), val_idx).astype(np.int64)}


def split_record(split: dict[str, np.ndarray], keys: Sequence, *, dataset: str,
                 seed: int | None) -> dict[str, Any]:
    """The JSON-able record of ``split`` that the run saves: samples named by their keys
    (indices for arrays, relative paths for files); the unlabeled set written as "rest" when it
    is every non-val sample."""
    rest = np.setdiff1d(np.arange(len(keys)), split["val"])
    unlabeled = "rest" if np.array_equal(np.sort(split["unlabeled"]), rest) else \
        [_plain(keys[i]) for i in split["unlabeled"]]
    return {"format": SPLIT_FORMAT, "dataset": dataset, "seed": seed, "num_train": len(keys),
            "labeled": [_plain(keys[i]) for i in split["labeled"]],
            "val": [_plain(keys[i]) for i in split["val"]],
            "unlabeled": unlabeled}


def _plain(key):
    return int(key) if isinstance(key, (int, np.integer)) else str(key)


def save_split(record: dict[str, Any], path: str) -> None:
    """Write a split record as JSON."""
    with open(path, "w") as f:
        json.dump(record, f)


def read_split_file(path: str) -> dict[str, Any]:
    """A split from ``path``: a JSON record as :func:`save_split` writes, or a text file with
    one labeled sample per line (an index for CIFAR/SVHN, a path relative to the data
    directory for ImageFolder)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split file {path} does not exist; give a JSON split saved by a "
                                "previous run or a text file with one labeled sample per line")
    with open(path) as f:
        text = f.read()
    if path.endswith(".json"):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"split file {path} is not valid JSON ({e})") from None
        if not isinstance(record, dict) or "labeled" not in record:
            raise ValueError(f"split file {path} must be a JSON object with a 'labeled' list")
        return record
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return {"labeled": lines}


def split_from_record(record: dict[str, Any], keys: Sequence, labels: np.ndarray,
                      num_classes: int, *, seed: int, val_per_class: int = 0,
                      where: str = "split file") -> dict[str, np.ndarray]:
    """Indices of a split given by ``record`` (see :func:`read_split_file`).

    A record without 'val' gets ``val_per_class`` validation samples per class drawn (with
    ``seed``) from the training samples that are not labeled.
    """
    if record.get("num_train") is not None and record["num_train"] != len(keys):
        raise ValueError(f"{where} was made for a training set of {record['num_train']} samples, "
                         f"this one has {len(keys)}: it belongs to other data")
    position = {_plain(k): i for i, k in enumerate(keys)}
    by_int = isinstance(_plain(keys[0]), int) if len(keys) else False

    def lookup(name: str) -> np.ndarray:
        out = []
        for k in record.get(name) or []:
            key = int(k) if by_int else str(k)
            if key not in position:
                raise ValueError(f"{where}: {name} sample {k!r} is not in the training set")
            out.append(position[key])
        return np.asarray(sorted(set(out)), dtype=np.int64)

    labeled = lookup("labeled")
    if labeled.size == 0:
        raise ValueError(f"{where} lists no labeled samples")
    if "val" in record:
        val = lookup("val")
    else:
        rng = np.random.default_rng(seed)
        pool = np.setdiff1d(np.arange(len(keys)), labeled)
        val = np.sort(np.concatenate([
            rng.permutation(pool[labels[pool] == c])[:val_per_class] for c in range(num_classes)
        ])).astype(np.int64) if val_per_class else np.zeros(0, np.int64)
    if np.intersect1d(labeled, val).size:
        raise ValueError(f"{where}: labeled and val samples overlap")
    unlabeled = record.get("unlabeled", "rest")
    unlabeled = np.setdiff1d(np.arange(len(keys)), val) if unlabeled in (None, "rest") else lookup("unlabeled")
    return {"labeled": labeled, "val": val, "unlabeled": unlabeled.astype(np.int64)}
