"""Configuration of the data side of a run (part of the trainer's dataclass tree)."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

EmbeddedDataset = Literal["digits", "two-moons"]
FileDataset = Literal["cifar10", "cifar100", "svhn", "imagefolder"]
Dataset = Literal[EmbeddedDataset, FileDataset]
Loader = Literal["auto", "torch", "dali"]
CropFill = Literal["gray", "reflect"]
RandAugmentPolicy = Literal["mpl", "mpl-imagenet", "torchvision"]  # mpl_fast.augment.policies.POLICIES

EMBEDDED_DATASETS: tuple[str, ...] = typing.get_args(EmbeddedDataset)
FILE_DATASETS: tuple[str, ...] = typing.get_args(FileDataset)


@dataclass
class DataConfig:
    dataset: Dataset = "digits"
    data_dir: str | None = None             # file-based data sets only; nothing is downloaded
    unlabeled_dir: str | None = None        # more unlabeled images: a folder or a file list (imagefolder only)
    in_memory: bool = False                 # imagefolder of small images: decode once, train like CIFAR's arrays
    labels_per_class: int | None = None     # labeled examples per class (CIFAR-10-4K: 400)
    labeled_fraction: float | None = None   # or a fraction of the training set (ImageNet-10%: 0.1)
    val_per_class: int = 0                  # validation carved from the training data (selection)
    split_file: str | None = None           # a saved/user-given split instead of drawing one
    batch_size: int = 64                    # labeled batch per step (per rank)
    mu: int = 7                             # unlabeled batch = mu * batch_size
    # Embedded data sets: the unlabeled batch is the whole unlabeled pool every step (each step a
    # fresh order; mu is then unused), as full-batch training on a toy set.
    full_unlabeled_batch: bool = False
    jitter_std: float = 0.05                # two-moons: std of the strong view's Gaussian jitter
    eval_batch_size: int = 256
    image_size: int | None = None           # resize/crop target; None = the data set's own
    randaug_num_ops: int = 2                # strong view: RandAugment ops per image
    randaug_magnitude: int = 16             # strong view: (maximum) magnitude
    randaug_policy: RandAugmentPolicy = "mpl"
    cutout: int = 16                        # cutout side in pixels (0 = none)
    # Small images (CIFAR, SVHN; not photo folders): the pad of the pad-and-crop views, gray
    # 128 (MPL's official code) or reflect; and the official second flip + pad-and-crop of the
    # strong view after Cutout.
    crop_fill: CropFill = "gray"
    strong_recrop: bool = True
    loader: Loader = "auto"
    num_workers: int = 2
    strict: bool = False                    # stop on a corrupt image instead of skipping it


def check_unlabeled_dir(cfg: DataConfig) -> None:
    """Refuses ``unlabeled_dir`` where no reader would use it: one sentence naming the flags."""
    if not cfg.unlabeled_dir:
        return
    if cfg.dataset != "imagefolder":
        raise ValueError(f"--data.unlabeled-dir adds image files to an ImageFolder's unlabeled pool; --data.dataset "
                         f"{cfg.dataset} does not read it: drop the flag or use --data.dataset imagefolder")
    if cfg.in_memory:
        raise ValueError("--data.in-memory decodes one ImageFolder; --data.unlabeled-dir adds a second source of "
                         "files: drop one of them")
