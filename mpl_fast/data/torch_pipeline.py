"""The torch DataLoader pipeline: workers read and decode a whole batch, apply the weak view
and (on CPU) the batched strong view to the collated uint8 batch; the main process moves the
batch to the device (strong view there when it is a GPU) and normalises."""

from __future__ import annotations

import signal
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mpl_fast.data.bad_data import record_corrupt
from mpl_fast.data.source import LabeledSet
from mpl_fast.data.views import Normalize, pad_crop_flip, resize_center_crop, resized_crop_flip, strong_view

LABELED, UNLABELED, EVAL = "labeled", "unlabeled", "eval"
_STREAM_IDS = {LABELED: 1, UNLABELED: 2}


def batch_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed for one batch, from (seed, stream, rank, batch number)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def strong_generator(seed: int) -> torch.Generator:
    """The CPU generator of a batch's strong view: its own stream, derived from the batch seed,
    so the strong view is the same whether a worker (CPU run) or the main process (GPU run)
    computes it."""
    return torch.Generator().manual_seed(batch_seed(seed, 0x57))


class InfiniteBatches(Sampler):
    """Endless (batch_seed, indices) pairs over this rank's shard of ``indices``: the shards of
    all ranks are disjoint; each pass over the shard is a fresh permutation; batches run across
    pass boundaries so every batch is full, even for a labeled set smaller than a batch."""

    def __init__(self, indices: np.ndarray, batch_size: int, *, seed: int, stream: int,
                 rank: int = 0, world_size: int = 1, start: int = 0):
        self.shard = np.random.default_rng([seed, stream]).permutation(indices)[rank::world_size]
        if len(self.shard) == 0:
            raise ValueError(f"rank {rank} of {world_size} gets no samples: the set has only "
                             f"{len(indices)}")
        self.batch_size, self.seed, self.stream, self.rank = batch_size, seed, stream, rank
        self.start = start  # batches already consumed (resume): replayed as indices, not loaded

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        rng = np.random.default_rng([self.seed, self.stream, self.rank, 1])
        pending = np.zeros(0, dtype=np.int64)
        number = 0
        while True:
            while len(pending) < self.batch_size:
                pending = np.concatenate([pending, rng.permutation(self.shard)])
            batch, pending = pending[:self.batch_size], pending[self.batch_size:]
            if number >= self.start:
                yield batch_seed(self.seed, self.stream, self.rank, number), batch.tolist()
            number += 1


class FiniteBatches(Sampler):
    """(0, indices) pairs covering ``indices`` once, in order."""

    def __init__(self, indices: np.ndarray, batch_size: int):
        self.indices, self.batch_size = np.asarray(indices), batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.indices), self.batch_size):
            yield 0, self.indices[start:start + self.batch_size].tolist()


def decode_file(path: str) -> torch.Tensor:
    """uint8 RGB (3, H, W) of a JPEG/PNG file (grey, palette, alpha and 16-bit converted).

    torchvision.io (libjpeg-turbo, faster than PIL); it is deprecated since
    torchvision 0.29 in favour of TorchCodec, so PIL takes over once it is gone.
    """
    if _tv_decode is None:
        return _pil_decode(path)
    from torchvision.io import ImageReadMode, read_file

    image = _tv_decode(read_file(path), mode=ImageReadMode.RGB)
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = (image.to(torch.float32) * (255.0 / torch.iinfo(image.dtype).max)).round().to(torch.uint8)
    return image


def _pil_decode(path: str) -> torch.Tensor:
    from PIL import Image

    # Only the formats the readers admit: PIL picks a decoder by content, and some (EPS) run an
    # external interpreter on the file.
    with Image.open(path, formats=("JPEG", "PNG")) as im:
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


try:
    from torchvision.io import decode_image as _tv_decode
except ImportError:  # a torchvision without image decoding
    _tv_decode = None


class BatchDataset(Dataset):
    """Item = one whole batch: ``dataset[(seed, indices)]`` -> dict of uint8 views, labels and
    the corrupt files met. All randomness comes from ``seed``, so a batch is the same whatever
    worker builds it."""

    def __init__(self, data: LabeledSet, *, view: str, image_size: int, flip: bool,
                 strong: dict | None = None, replacements: np.ndarray | None = None, pad_fill: int | None = None):
        self.data, self.view, self.image_size, self.flip = data, view, image_size, flip
        self.pad_fill = pad_fill  # the weak view's pad of small images: a constant, or None (reflect)
        self.strong = strong            # strong_view kwargs when computed here (CPU), else None
        self.replacements = replacements  # where a corrupt training image's stand-in is drawn

    def __getitem__(self, item):
        seed, indices = item
        g = torch.Generator().manual_seed(seed)
        if self.data.is_files:
            images, labels, corrupt, loaded = self._load_files(indices, g)
        else:
            images = torch.from_numpy(self.data.images[indices]).permute(0, 3, 1, 2)
            labels, corrupt, loaded = self.data.labels[indices], [], indices
            if self.view != EVAL:
                images = pad_crop_flip(images, pad=4, flip=self.flip, generator=g, fill=self.pad_fill)
        out = {"weak": images.contiguous(), "label": torch.as_tensor(labels, dtype=torch.int64),
               "corrupt": corrupt, "seed": seed, "index": torch.as_tensor(loaded, dtype=torch.int64)}
        if self.view == UNLABELED and self.strong is not None:
            out["strong"] = strong_view(out["weak"], generator=strong_generator(seed), **self.strong)
        return out

    def _load_files(self, indices, g):
        images, labels, corrupt, loaded = [], [], [], []  # loaded: the index read (a stand-in's after a corrupt file)
        for index in indices:
            for _attempt in range(20):
                path = self.data.images[index]
                try:
                    image = decode_file(path)
                    break
                except Exception as e:  # any decoder failure = a corrupt file, reported upstream
                    corrupt.append((path, _one_line(e)))
                    image = None
                    if self.view == EVAL or self.replacements is None:
                        break
                    index = int(self.replacements[torch.randint(len(self.replacements), (1,), generator=g)])
            if image is None:  # eval: the sample is dropped; training: 20 stand-ins failed too
                continue
            if self.view == EVAL:
                image = resize_center_crop(image, self.image_size)
            else:
                image = resized_crop_flip(image, self.image_size, flip=self.flip, generator=g)
            images.append(image)
            labels.append(int(self.data.labels[index]))
            loaded.append(int(index))
        stacked = torch.stack(images) if images else \
            torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        return stacked, labels, corrupt, loaded


def _one_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:200] if text else 'no message'}"


class _Finish:
    """Main-process end of both pipelines: corrupt-file accounting, transfer to ``device``,
    the strong view when it was left for the device, normalisation."""

    def __init__(self, *, device, mean, std, strong: dict | None, stats: dict, strict: bool):
        self.device = torch.device(device)
        self.normalize = Normalize(mean, std)
        self.strong, self.stats, self.strict = strong, stats, strict

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device, non_blocking=True)

    def account(self, corrupt) -> None:
        for path, reason in corrupt:
            record_corrupt(self.stats, path, reason, strict=self.strict)

    def checked(self, batch: dict, expected: int | None):
        """Count the batch's corrupt files; refuse a training batch left short by them."""
        self.account(batch["corrupt"])
        if expected is not None and len(batch["label"]) < expected:
            raise RuntimeError(f"a batch lost {expected - len(batch['label'])} images to 20 corrupt "
                               f"files in a row (e.g. {batch['corrupt'][-1][0]}); check the data")

    def labeled(self, batch: dict, expected: int | None = None):
        self.checked(batch, expected)
        return self.normalize(self.images(batch["weak"])), batch["label"].to(self.device, non_blocking=True)

    def unlabeled(self, batch: dict, expected: int | None = None, with_indices: bool = False):
        self.checked(batch, expected)
        weak = self.images(batch["weak"])
        if "strong" in batch:
            strong = self.images(batch["strong"])
        else:
            strong = strong_view(weak, generator=strong_generator(batch["seed"]), **self.strong)
        if with_indices:  # each image's index in the unlabeled set (the row of a teacher-label store)
            return self.normalize(weak), self.normalize(strong), batch["index"].to(self.device)
        return self.normalize(weak), self.normalize(strong)


class EvalBatches:
    """A finite, re-iterable evaluation set: (x, y) batches, normalised, on the device."""

    def __init__(self, loader: DataLoader, finish: _Finish, num_samples: int):
        self.loader, self.finish, self.num_samples = loader, finish, num_samples

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if len(batch["label"]):
                yield self.finish.labeled(batch)
            else:
                self.finish.account(batch["corrupt"])


def ignore_stop_signals(_worker_id: int) -> None:
    """A DataLoader worker ignores SIGINT/SIGTERM: a signal to the whole process group (Ctrl-C,
    timeout, kill -TERM -PGID, a batch scheduler) is the main process's to handle (it checkpoints
    and stops, then ends its workers); a worker that died of it first would fail the main process
    with "DataLoader worker is killed by signal" before it could checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_torch_streams(data: LabeledSet, test: LabeledSet, split: dict, *, cfg, source, seed: int,
                        rank: int, world_size: int, device, stats: dict, image_size: int,
                        with_indices: bool = False, unlabeled_set: LabeledSet | None = None):
    """(labeled, unlabeled, val, test) streams through torch DataLoaders; ``with_indices``: the
    unlabeled stream yields (weak, strong, index). ``unlabeled_set``: the unlabeled stream reads
    this set (``split["unlabeled"]`` indexes it) instead of ``data``."""
    on_gpu = torch.device(device).type != "cpu"
    pad_fill = 128 if cfg.crop_fill == "gray" else None
    strong = dict(num_ops=cfg.randaug_num_ops, magnitude=cfg.randaug_magnitude,
                  policy=cfg.randaug_policy, cutout=cfg.cutout, fill=pad_fill, recrop_flip=source.flip,
                  # small images only (photos have no pad-and-crop view); 4 px at 32 px, as the weak view
                  recrop_pad=4 if cfg.strong_recrop and not data.is_files else 0)
    finish = _Finish(device=device, mean=source.mean, std=source.std,
                     strong=strong if on_gpu else None, stats=stats, strict=cfg.strict)

    def loader(dataset, sampler, workers):
        # A generator of its own: without one, every new DataLoader iterator draws its workers'
        # base seed from the global RNG, which a resumed run (its iterators start at its first
        # step, not the original run's) would then leave elsewhere, and dropout with it. The
        # batches themselves do not depend on it (every batch is seeded by its number).
        return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers,
                          pin_memory=on_gpu, prefetch_factor=2 if workers else None,
                          persistent_workers=False, worker_init_fn=ignore_stop_signals if workers else None,
                          generator=torch.Generator().manual_seed(seed))

    def train(view, indices, batch_size, images=data):
        dataset = BatchDataset(images, view=view, image_size=image_size, flip=source.flip,
                               strong=None if on_gpu else strong, replacements=indices, pad_fill=pad_fill)

        def loader_from(start: int) -> DataLoader:
            sampler = InfiniteBatches(indices, batch_size, seed=seed, stream=_STREAM_IDS[view],
                                      rank=rank, world_size=world_size, start=start)
            return loader(dataset, sampler, cfg.num_workers)
        return loader_from

    def evaluation(labeled_set, indices):
        dataset = BatchDataset(labeled_set, view=EVAL, image_size=image_size, flip=False)
        sampler = FiniteBatches(indices, cfg.eval_batch_size)
        return EvalBatches(loader(dataset, sampler, min(cfg.num_workers, 2)), finish, len(indices))

    labeled_loader_from = train(LABELED, split["labeled"], cfg.batch_size)
    unlabeled_loader_from = train(UNLABELED, split["unlabeled"], cfg.mu * cfg.batch_size,
                                  data if unlabeled_set is None else unlabeled_set)
    labeled = ResumableBatches(labeled_loader_from, lambda b: finish.labeled(b, cfg.batch_size))
    unlabeled = ResumableBatches(unlabeled_loader_from,
                                 lambda b: finish.unlabeled(b, cfg.mu * cfg.batch_size, with_indices))
    return (labeled, unlabeled, evaluation(data, split["val"]),
            evaluation(test, np.arange(len(test))))


class ResumableBatches:
    """Endless finished batches that know how many were handed out, so a checkpoint can store
    that count and a resumed run continues with the very next batch (every batch is a function
    of its number). The workers start at the first ``next``, not at build time."""

    def __init__(self, loader_from: Callable[[int], DataLoader], finish_batch):
        self._loader_from, self._finish = loader_from, finish_batch
        self.consumed, self._batches = 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = iter(self._loader_from(self.consumed))
        batch = self._finish(next(self._batches))
        self.consumed += 1
        return batch

    def state_dict(self) -> dict:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.consumed, self._batches = int(state["consumed"]), None
