"""The images the offline labeller runs the teacher over, in a fixed order, with the eval
preprocessing only (no augmentation), and an identity that tells one data set from another.

Which images: every image of the run's *training* set, row i = training image i, the index the
trainer's splits and unlabeled streams use (the unlabeled set is the training set minus the
validation images: labelling all of them keeps one store valid for every seed's split). Or,
with ``unlabeled_dir``, the separate unlabeled images of that folder or file list, row i = the
i-th file in the order of mpl_fast.data.unlabeled.unlabeled_files, the order in which the
trainer's ``--data.unlabeled-dir`` stream indexes them.

Preprocessing (the trainer's evaluation view):
  embedded (digits, two-moons)  the stored values as they are;
  arrays (CIFAR, SVHN)          uint8 -> (x / 255 - mean) / std, no crop;
  image files (ImageFolder)     shorter side to size / 0.875, centre crop to size, normalised.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from mpl_fast.data.config import EMBEDDED_DATASETS, DataConfig

UNLABELED_FOLDER = "unlabeled-folder"  # the identity's name of a store made with --unlabeled-dir


@dataclass
class ImagesToLabel:
    """``num_images`` images; ``load(start, stop)`` -> (float model input of rows start..stop,
    indices among them of corrupt files, which get no teacher output)."""

    num_images: int
    num_classes: int
    input_shape: tuple[int, ...]
    identity: dict            # name, num_images, sha256 of the ordered contents / file list
    preprocessing: dict
    load: Callable[[int, int], tuple[torch.Tensor, list[int]]]
    skipped: dict = field(default_factory=dict)
    decodes_files: bool = False  # loading decodes files: worth DataLoader workers


def images_to_label(data: DataConfig, data_dir: str | None = None, unlabeled_dir: str | None = None) -> ImagesToLabel:
    """The training images of ``data`` (``data_dir`` overrides the run's data folder), or with
    ``unlabeled_dir`` every image of that folder or file list (the paper's separate unlabeled
    set, e.g. YFCC100M), preprocessed like the run's data set's image files."""
    if data_dir is not None:
        data = DataConfig(**{**data.__dict__, "data_dir": data_dir})
    if data.dataset in EMBEDDED_DATASETS:
        if unlabeled_dir is not None:
            raise ValueError(f"--unlabeled-dir labels image files, and the run's data set {data.dataset!r} is "
                             "embedded arrays: leave --unlabeled-dir out")
        return _embedded(data.dataset)
    from mpl_fast.data.files import load_source  # noqa: PLC0415 - file readers only when needed

    source = load_source(data)
    if unlabeled_dir is not None:
        if not source.train.is_files:
            raise ValueError(f"--unlabeled-dir labels image files with an image-file teacher, and the run's "
                             f"data set {source.name!r} is arrays: leave --unlabeled-dir out")
        from mpl_fast.data.unlabeled import unlabeled_files  # noqa: PLC0415

        paths, keys = unlabeled_files(unlabeled_dir, flag="--unlabeled-dir")
        return _files(source, paths, keys, name=UNLABELED_FOLDER)
    if source.train.is_files:
        return _files(source, source.train.images, source.train.keys, name=source.name)
    return _arrays(source)


def identity_of_arrays(name: str, images: np.ndarray) -> dict:
    """The identity of an in-memory set: its name, size and a hash of its contents in order
    (what the trainer compares with a store's before reading labels from it)."""
    return {"name": name, "num_images": len(images),
            "sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()}


def identity_of_files(name: str, keys: list[str]) -> dict:
    """The identity of a set of image files: its name, size and a hash of the ordered relative
    paths (the files' contents are not read: hashing 100M images would cost a labelling pass)."""
    return {"name": name, "num_images": len(keys), "sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}


def _embedded(name: str) -> ImagesToLabel:
    # The embedded reader's own loader: the same arrays, in the same order, as the trainer's streams.
    from mpl_fast.data.embedded import load_training_images  # noqa: PLC0415

    xtr, ytr = load_training_images(name)
    x = torch.from_numpy(np.ascontiguousarray(xtr))

    def load(start: int, stop: int):
        return x[start:stop], []

    return ImagesToLabel(
        num_images=len(x), num_classes=int(ytr.max()) + 1, input_shape=tuple(x.shape[1:]),
        identity=identity_of_arrays(name, xtr),
        preprocessing={"view": "eval", "description": f"embedded {name}: the stored values as they are"},
        load=load)


def _arrays(source) -> ImagesToLabel:
    from mpl_fast.data.views import Normalize  # noqa: PLC0415

    images = source.train.images  # (N, H, W, 3) uint8
    normalize = Normalize(source.mean, source.std)

    def load(start: int, stop: int):
        return normalize(torch.from_numpy(np.ascontiguousarray(images[start:stop])).permute(0, 3, 1, 2)), []

    n = len(images)
    return ImagesToLabel(
        num_images=n, num_classes=source.num_classes, input_shape=(3, source.image_size, source.image_size),
        identity=identity_of_arrays(source.name, images),
        preprocessing={"view": "eval", "description": "uint8 -> (x / 255 - mean) / std, no crop",
                       "mean": list(source.mean), "std": list(source.std)},
        load=load)


def _files(source, paths: list[str], keys: list[str], name: str) -> ImagesToLabel:
    from mpl_fast.data.torch_pipeline import decode_file  # noqa: PLC0415
    from mpl_fast.data.views import Normalize, resize_center_crop  # noqa: PLC0415

    size = source.image_size
    normalize = Normalize(source.mean, source.std)

    def load(start: int, stop: int):
        batch, corrupt = [], []
        for i in range(start, stop):
            try:
                image = resize_center_crop(decode_file(paths[i]), size)
            except Exception:  # a file that does not decode: no teacher output for it
                corrupt.append(i - start)
                image = torch.zeros(3, size, size, dtype=torch.uint8)
            batch.append(image)
        return normalize(torch.stack(batch)), corrupt

    n = len(paths)
    return ImagesToLabel(
        num_images=n, num_classes=source.num_classes, input_shape=(3, size, size),
        identity=identity_of_files(name, keys),
        preprocessing={"view": "eval", "image_size": size, "crop_fraction": 0.875,
                       "description": "shorter side to size / 0.875, centre crop, (x / 255 - mean) / std",
                       "mean": list(source.mean), "std": list(source.std)},
        load=load, skipped={k: len(v) for k, v in source.skipped.items()}, decodes_files=True)


def batch_grid(start: int, stop: int, batch_size: int) -> Iterator[tuple[int, int]]:
    """[a, b) batches covering [start, stop), cut at the multiples of ``batch_size``: the same
    batches whatever range a rank or a resumed run starts from (so the teacher sees the same
    batch compositions, and its outputs are the same to the bit)."""
    a = start
    while a < stop:
        b = min(stop, (a // batch_size + 1) * batch_size)
        yield a, b
        a = b
