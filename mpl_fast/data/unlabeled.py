"""Images for the unlabeled pool only, beside a data set's training set: SVHN's
extra_32x32.mat, or ``--data.unlabeled-dir`` (a folder of image files at any depth, e.g. an
ImageFolder whose class names are ignored, or a text file listing one image path per line).
Their labels are never read: they are stored as -1."""

from __future__ import annotations

import os

import numpy as np

from mpl_fast.data.imagefolder import IMAGE_EXTENSIONS
from mpl_fast.data.source import LabeledSet


def unlabeled_files(path: str, flag: str = "--data.unlabeled-dir") -> tuple[list[str], list[str]]:
    """(absolute paths, keys) of the images of ``path``: a folder, searched recursively in sorted
    walk order, or a file list (one path per line, relative paths taken from the list's folder,
    blank lines and lines starting with # ignored). Image i of this order is row i of a label
    store made of ``path`` (the labeller and the trainer both list it here). keys: the paths
    relative to the folder (or to the list's folder), what a store's identity hashes, so moving
    the folder keeps it. One clear error, naming ``flag``, for a missing path, a listed file
    that does not exist, or no images at all."""
    if os.path.isdir(path):
        base, paths = path, []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    elif os.path.isfile(path):
        base = os.path.dirname(os.path.abspath(path))
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag} {path}: not a readable text file listing images ({e})") from None
        paths = [line if os.path.isabs(line) else os.path.join(base, line)
                 for line in lines if line and not line.startswith("#")]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{flag} {path} lists {len(missing)} files that do not exist, "
                                    f"e.g. {missing[0]}; fix the list")
    else:
        raise FileNotFoundError(f"{flag} {path} is neither a folder nor a file list")
    if not paths:
        raise FileNotFoundError(f"{flag} {path} holds no JPEG or PNG files ({', '.join(IMAGE_EXTENSIONS)})")
    paths = [os.path.abspath(p) for p in paths]
    return paths, [os.path.relpath(p, os.path.abspath(base)) for p in paths]


def read_unlabeled_source(path: str) -> LabeledSet:
    """The image files of ``path`` (see unlabeled_files) as a LabeledSet whose labels are -1."""
    paths, keys = unlabeled_files(path)
    return LabeledSet(paths, np.full(len(paths), -1, dtype=np.int64), keys)


def with_extra_unlabeled(train: LabeledSet, extra: LabeledSet, split: dict) -> tuple[LabeledSet, dict]:
    """``train`` with ``extra`` appended (arrays with arrays, files with files) and ``split``
    with the appended samples added to its unlabeled indices only (labeled and val stay within
    the training set)."""
    if train.is_files != extra.is_files:
        raise ValueError("the extra unlabeled images must be of the training set's kind (image files for an "
                         "ImageFolder; --data.unlabeled-dir needs --data.dataset imagefolder)")
    n = len(train)
    if train.is_files:
        images = train.images + extra.images
    else:
        if extra.images.shape[1:] != train.images.shape[1:]:
            raise ValueError(f"extra unlabeled images are {extra.images.shape[1:]}, the training images "
                             f"{train.images.shape[1:]}")
        images = np.concatenate([train.images, extra.images])
    joined = LabeledSet(images, np.concatenate([train.labels, extra.labels]), list(train.keys) + list(extra.keys))
    split = dict(split)
    split["unlabeled"] = np.concatenate([split["unlabeled"], np.arange(n, n + len(extra), dtype=np.int64)])
    return joined, split
