"""CIFAR-10 and CIFAR-100 from their python pickle batches (cifar-10-python.tar.gz,
cifar-100-python.tar.gz, extracted). Nothing is downloaded.

The batches are pickles, so they are read with mpl_fast.data.safe_pickle: only dicts, lists,
strings, numbers and numpy arrays come back, and a file that asks for anything else (a crafted
file that would run code under ``pickle.load``) is refused with its name."""

from __future__ import annotations

import os

import numpy as np

from mpl_fast.data.safe_pickle import UnsafePickleError, load_plain_data
from mpl_fast.data.source import DatasetSource, LabeledSet, check_labels

# Per-channel statistics of the training images, in [0, 1].
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_LAYOUT = {
    10: dict(train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
             meta="batches.meta", names="label_names", labels="labels",
             title="CIFAR-10", archive="cifar-10-python.tar.gz", subdir="cifar-10-batches-py"),
    100: dict(train=["train"], test=["test"], meta="meta", names="fine_label_names",
              labels="fine_labels", title="CIFAR-100", archive="cifar-100-python.tar.gz",
              subdir="cifar-100-python"),
}


def _resolve_dir(data_dir: str, layout: dict) -> str:
    """``data_dir`` itself, or its extracted sub-folder, whichever holds the batches."""
    for candidate in (data_dir, os.path.join(data_dir, layout["subdir"])):
        if all(os.path.isfile(os.path.join(candidate, f)) for f in layout["train"] + layout["test"]):
            return candidate
    raise FileNotFoundError(
        f"expected {layout['title']} python batches ({', '.join(layout['train'] + layout['test'])}) "
        f"in {data_dir} (or {os.path.join(data_dir, layout['subdir'])}); get {layout['archive']} "
        "from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there")


def _read_pickle(path: str):
    """The pickled object, keys as str (the batches hold Python 2 str keys; a file re-pickled by
    Python 3 may hold bytes keys)."""
    obj = load_plain_data(path)
    if isinstance(obj, dict):
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj


def _read_batch(path: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _read_pickle(path)
        data, labels = entry["data"], entry[label_key]
    except UnsafePickleError:
        raise
    except Exception as e:  # unpickling garbage raises many kinds of errors
        raise ValueError(f"{path} is not a readable CIFAR python batch with 'data' and "
                         f"'{label_key}' ({type(e).__name__}: {e}); re-extract the archive") from None
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: expected 'data' as uint8 (N, 3072), found {data.dtype} "
                         f"{tuple(data.shape)}; re-extract the archive")
    labels = check_labels(labels, num_classes, path)
    if len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(labels)} labels")
    # Rows are 1024 red, 1024 green, 1024 blue values: to (N, 32, 32, 3).
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _read_names(path: str, key: str, num_classes: int) -> list[str]:
    try:
        names = list(_read_pickle(path)[key])
        if len(names) == num_classes:
            return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    except UnsafePickleError:
        raise  # cosmetic names, but a crafted file is refused, never skipped quietly
    except Exception:
        pass  # class names are cosmetic: fall back to numbers
    return [str(i) for i in range(num_classes)]


def load_cifar(data_dir: str, num_classes: int = 10) -> DatasetSource:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (fine labels) read from ``data_dir``."""
    layout = _LAYOUT[num_classes]
    root = _resolve_dir(data_dir, layout)

    def read(files):
        parts = [_read_batch(os.path.join(root, f), layout["labels"], num_classes) for f in files]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        return LabeledSet(images, labels, list(range(len(labels))))

    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return DatasetSource(
        name=f"cifar{num_classes}", train=read(layout["train"]), test=read(layout["test"]),
        num_classes=num_classes,
        classes=_read_names(os.path.join(root, layout["meta"]), layout["names"], num_classes),
        mean=mean, std=std, image_size=32, flip=True)
