"""File-based data sets (CIFAR-10/100, SVHN, ImageFolder) read from ``cfg.data_dir``, split
into labeled / unlabeled / val, and served through DALI or a torch DataLoader.

Layouts (nothing is downloaded):
  cifar10      DIR/data_batch_1..5, test_batch, batches.meta (or DIR/cifar-10-batches-py/)
  cifar100     DIR/train, test, meta (or DIR/cifar-100-python/); fine labels
  svhn         DIR/train_32x32.mat, test_32x32.mat (extra_32x32.mat, when present: unlabeled pool only)
  imagefolder  DIR/train/<class>/<image>, DIR/val/<class>/<image> (val/, or test/, is the test set)

The training streams are sharded by rank (disjoint shards); val and test are whole on every
rank. ``DataStreams.split`` is the JSON-able split record for the run to save; a saved one
(or a text file of labeled samples) comes back in through ``cfg.split_file``.
``DataStreams.stats`` is updated as batches are drawn (corrupt images met, loader used).

Unlabeled pool: the training set minus val, plus SVHN's extra set or ``--data.unlabeled-dir``
when given. With ``with_indices`` (reduced MPL) it is the set a teacher-label store covers
instead: ``--data.unlabeled-dir`` alone when given (each image's index = its row in that
folder's order), else the training set.
"""

from __future__ import annotations

import numpy as np
import torch

from mpl_fast.data.bad_data import new_stats
from mpl_fast.data.config import DataConfig, check_unlabeled_dir
from mpl_fast.data.source import DatasetSource
from mpl_fast.data.splits import draw_split, read_split_file, split_from_record, split_record
from mpl_fast.data.streams import DataStreams
from mpl_fast.data.unlabeled import read_unlabeled_source, with_extra_unlabeled

LOADERS = ("auto", "torch", "dali")


def load_source(cfg: DataConfig) -> DatasetSource:
    """The data set named by ``cfg.dataset`` read from ``cfg.data_dir``."""
    if not cfg.data_dir:
        raise ValueError(f"dataset {cfg.dataset!r} is read from disk: give its folder with --data-dir "
                         "(nothing is downloaded)")
    if cfg.dataset in ("cifar10", "cifar100"):
        from mpl_fast.data.cifar import load_cifar
        return load_cifar(cfg.data_dir, 10 if cfg.dataset == "cifar10" else 100)
    if cfg.dataset == "svhn":
        from mpl_fast.data.svhn import load_svhn
        return load_svhn(cfg.data_dir)
    if cfg.dataset == "imagefolder":
        from mpl_fast.data.imagefolder import load_imagefolder
        return load_imagefolder(cfg.data_dir, cfg.image_size)
    raise ValueError(f"{cfg.dataset!r} is not a file-based data set")


def choose_loader(cfg: DataConfig, source: DatasetSource, device) -> str:
    """"torch" or "dali" for ``cfg.loader``: auto = DALI for image files when DALI is installed
    and the batches go to a CUDA device, else torch; an explicit "dali" that cannot run refuses
    with the reason."""
    if cfg.loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {cfg.loader!r}")
    from mpl_fast.data.dali_pipeline import dali_unavailable_reason

    if cfg.loader == "torch":
        return "torch"
    if not source.train.is_files:
        if cfg.loader == "dali":
            raise ValueError(f"--loader dali decodes image files; {source.name} is read into memory "
                             "as arrays (nothing to decode): use --loader torch or auto")
        return "torch"
    reason = dali_unavailable_reason()
    if cfg.loader == "dali":
        if reason:
            raise RuntimeError(f"--loader dali cannot run: {reason}")
        return "dali"
    return "dali" if reason is None and torch.device(device).type == "cuda" else "torch"


def resolve_split(cfg: DataConfig, source: DatasetSource, seed: int):
    """(indices, record): the labeled/unlabeled/val split drawn from ``seed`` or read from
    ``cfg.split_file``, and the JSON-able record the run saves."""
    train = source.train
    if cfg.split_file:
        split = split_from_record(read_split_file(cfg.split_file), train.keys, train.labels,
                                  source.num_classes, seed=seed, val_per_class=cfg.val_per_class,
                                  where=f"split file {cfg.split_file}")
    else:
        split = draw_split(train.labels, source.num_classes, seed=seed,
                           labels_per_class=cfg.labels_per_class,
                           labeled_fraction=cfg.labeled_fraction, val_per_class=cfg.val_per_class)
    return split, split_record(split, train.keys, dataset=source.name, seed=seed)


def build_file_streams(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1,
                       device: str = "cpu", with_indices: bool = False) -> DataStreams:
    """The DataStreams of a data set on disk (see mpl_fast.data.build_streams)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    check_unlabeled_dir(cfg)
    source = load_source(cfg)
    if cfg.in_memory:
        from mpl_fast.data.in_memory import decode_into_memory
        source = decode_into_memory(source, cfg.image_size)
    image_size = source.image_size
    if not source.train.is_files and cfg.image_size not in (None, source.image_size):
        raise ValueError(f"{source.name} images are {source.image_size}x{source.image_size}; "
                         f"image_size={cfg.image_size} is not supported for it")
    split, record = resolve_split(cfg, source, seed)
    train = source.train
    extra = source.extra_unlabeled
    if cfg.unlabeled_dir:
        extra = read_unlabeled_source(cfg.unlabeled_dir)
    unlabeled_set = None
    if with_indices:
        # The unlabeled stream draws exactly the images a teacher-label store covers, indexed as
        # the labeller indexed them: --data.unlabeled-dir's images alone (the paper's setting:
        # ImageNet labeled, YFCC100M unlabeled), else the training set (SVHN's extra set is not
        # in a store of the training set: left out).
        if cfg.unlabeled_dir:
            unlabeled_set, split = extra, dict(split, unlabeled=np.arange(len(extra), dtype=np.int64))
            record["unlabeled_extra"] = {"source": cfg.unlabeled_dir, "count": len(extra), "only": True}
    elif extra is not None:  # labeled and val stay in the training set; the unlabeled pool grows
        train, split = with_extra_unlabeled(train, extra, split)
        record["unlabeled_extra"] = {"source": cfg.unlabeled_dir or f"{source.name} extra", "count": len(extra)}
    loader = choose_loader(cfg, source, device)
    stats = new_stats(loader)
    stats.update({f"skipped_{k}": len(v) for k, v in source.skipped.items()})
    if loader == "dali":
        from mpl_fast.data.dali_pipeline import build_dali_streams as build
    else:
        from mpl_fast.data.torch_pipeline import build_torch_streams as build
    labeled, unlabeled, val, test = build(train, source.test, split, cfg=cfg, source=source,
                                          seed=seed, rank=rank, world_size=world_size,
                                          device=device, stats=stats, image_size=image_size,
                                          with_indices=with_indices, unlabeled_set=unlabeled_set)
    return DataStreams(labeled=labeled, unlabeled=unlabeled, val=val, test=test,
                       num_classes=source.num_classes, input_shape=(3, image_size, image_size),
                       split=record, stats=stats)
