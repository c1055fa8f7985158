"""Embedded data sets: real data that ships with scikit-learn, so a run needs no download.

``digits``: sklearn's 1797 8x8 greyscale handwritten digits (values 0..16, scaled to [0, 1]).
A fixed 30% stratified test split (the same for every seed) is held out; from the rest each
seed draws ``labels_per_class`` labeled and ``val_per_class`` validation images; all the
non-validation training images form the unlabeled set (their labels are never read).

Views for 8x8 greyscale digits (RandAugment's photometric ops mean little at this size):
  weak   = a random sub-pixel translation of up to 1 px;
  strong = a random affine map (rotation up to 20 degrees, scale 0.85-1.15, shear up to 0.2,
           translation up to 1.5 px), a random contrast in [0.6, 1.2], Gaussian pixel noise
           (std 0.1) and a 3x3 cutout: changes that keep the digit readable but move most pixels.

``two-moons``: sklearn.datasets.make_moons, 2000 training points (noise 0.1) of which
``labels_per_class`` (3: six points in all, as in the paper) are labeled, and a separate
fixed test set of 1000 points. Weak view = the point itself, strong view = the point plus
Gaussian jitter (std ``jitter_std``, default 0.05).

``full_unlabeled_batch``: every step's unlabeled batch is the whole unlabeled pool (one fresh
permutation per step) instead of ``mu * batch_size`` points.

Every random choice comes from torch.Generators owned by the streams, whose states the
streams save and restore (``state_dict``/``load_state_dict``), so resumed runs are exact.

Data parallel (``world_size`` > 1): ``batch_size`` is per rank. Every rank draws and augments
the same global batch of world_size * batch_size rows (same seeds) and keeps its slice, rows
rank*B .. (rank+1)*B. These sets are tiny, so the duplicated work costs little, and the data a
run sees does not depend on how it is split: N ranks at batch B see exactly the batches of one
process at batch N*B, and every rank's stream state is the same (any rank's checkpoint resumes
any other).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mpl_fast.data.config import DataConfig
from mpl_fast.data.streams import DataStreams

_TEST_SPLIT_SEED = 20210  # the held-out test split never changes with the run's seed


class IndexBatches:
    """Endless batches of indices into n items, reshuffled every epoch by its own generator."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n <= 0:
            raise ValueError("IndexBatches: no items to draw from")
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self._new_epoch()

    def _new_epoch(self) -> None:
        self._epoch_start_state = self.gen.get_state()
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.pos = 0

    def next(self) -> torch.Tensor:
        parts, need = [], self.batch_size
        while need:
            if self.pos == self.n:
                self._new_epoch()
            take = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos:self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {"epoch_start_state": self._epoch_start_state.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["epoch_start_state"])
        self._new_epoch()
        self.pos = int(state["pos"])


class _Stream:
    """An infinite iterator of augmented batches with a resumable state."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, seed: int,
                 views: tuple[Callable, ...], device: str, rank: int = 0, world_size: int = 1,
                 keys: torch.Tensor | None = None):
        self.x, self.y, self.views, self.device = x, y, views, device
        self.keys = keys  # each row's training-set index, yielded third when given
        self.rank, self.world_size = rank, world_size
        self.indices = IndexBatches(len(x), batch_size * world_size, seed)  # the global batch
        self.aug_gen = torch.Generator().manual_seed(seed + 7919)

    def __iter__(self):
        return self

    def __next__(self):
        idx = self.indices.next()
        raw = self.x[idx]
        views = [self._mine(view(raw, self.aug_gen)).to(self.device) for view in self.views]
        if self.y is not None:  # labeled: (view, label)
            return views[0], self._mine(self.y[idx]).to(self.device)
        if self.keys is not None:  # unlabeled with indices: (weak, strong, training-set index)
            return views[0], views[1], self._mine(self.keys[idx]).to(self.device)
        return views[0], views[1]  # unlabeled: (weak, strong)

    def _mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch."""
        per_rank = rows.shape[0] // self.world_size
        return rows[self.rank * per_rank:(self.rank + 1) * per_rank]

    def state_dict(self) -> dict:
        return {"indices": self.indices.state_dict(), "aug_gen": self.aug_gen.get_state().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.indices.load_state_dict(state["indices"])
        self.aug_gen.set_state(state["aug_gen"])


# ----------------------------------------------------------------------------- digit views

def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _affine(x: torch.Tensor, gen: torch.Generator, rot_deg: float, scale: tuple[float, float],
            shear: float, shift_px: float) -> torch.Tensor:
    """A random affine map per image (bilinear, zero outside), shift in pixels."""
    n, _, h, w = x.shape
    ang = _uniform(n, -rot_deg, rot_deg, gen) * (math.pi / 180)
    s = _uniform(n, *scale, gen)
    sh = _uniform(n, -shear, shear, gen)
    tx = _uniform(n, -shift_px, shift_px, gen) * (2.0 / w)
    ty = _uniform(n, -shift_px, shift_px, gen) * (2.0 / h)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos, -sin + sh * cos, tx], 1),
                         torch.stack([sin, cos + sh * sin, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def digits_weak(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return _affine(x, gen, rot_deg=0.0, scale=(1.0, 1.0), shear=0.0, shift_px=1.0)


def digits_strong(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    x = _affine(x, gen, rot_deg=20.0, scale=(0.85, 1.15), shear=0.2, shift_px=1.5)
    x = x * _uniform(n, 0.6, 1.2, gen).view(n, 1, 1, 1)
    x = x + 0.1 * torch.randn(x.shape, generator=gen)
    cy = torch.randint(0, h, (n,), generator=gen).view(n, 1, 1)
    cx = torch.randint(0, w, (n,), generator=gen).view(n, 1, 1)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    hole = ((rows - cy).abs() <= 1) & ((cols - cx).abs() <= 1)
    return x.masked_fill(hole.unsqueeze(1), 0.0).clamp_(0.0, 1.0)


def _identity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return x.clone()


def _jitter(std: float) -> Callable:
    def view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return x + std * torch.randn(x.shape, generator=gen)
    return view


# ----------------------------------------------------------------------------- splits

def _per_class_split(y: np.ndarray, labels_per_class: int, val_per_class: int, seed: int):
    """Indices (labeled, val) with a fixed number per class, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    labeled, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        if len(idx) < labels_per_class + val_per_class:
            raise ValueError(f"class {c} has {len(idx)} training examples, fewer than "
                             f"labels_per_class + val_per_class = {labels_per_class + val_per_class}")
        labeled.extend(idx[:labels_per_class].tolist())
        val.extend(idx[labels_per_class:labels_per_class + val_per_class].tolist())
    return np.array(sorted(labeled), dtype=np.int64), np.array(sorted(val), dtype=np.int64)


def _load(name: str, jitter_std: float = 0.05):
    """(x_train, y_train, x_test, y_test, views) as torch tensors; ``jitter_std``: the two-moons
    strong view's jitter."""
    if name == "digits":
        from sklearn.datasets import load_digits  # noqa: PLC0415
        from sklearn.model_selection import train_test_split  # noqa: PLC0415

        d = load_digits()
        x = (d.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        y = d.target.astype(np.int64)
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, stratify=y, random_state=_TEST_SPLIT_SEED)
        return xtr, ytr, xte, yte, (digits_weak, digits_strong)
    if name == "two-moons":
        from sklearn.datasets import make_moons  # noqa: PLC0415

        xtr, ytr = make_moons(n_samples=2000, noise=0.1, random_state=_TEST_SPLIT_SEED)
        xte, yte = make_moons(n_samples=1000, noise=0.1, random_state=_TEST_SPLIT_SEED + 1)
        return (xtr.astype(np.float32), ytr.astype(np.int64), xte.astype(np.float32), yte.astype(np.int64),
                (_identity, _jitter(jitter_std)))
    raise ValueError(f"unknown embedded data set {name!r}; choose 'digits' or 'two-moons'")


def _eval_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str) -> list:
    return [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)]


def load_training_images(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(x_train, y_train) of an embedded data set, in the order that gives each image its index."""
    xtr, ytr, _, _, _ = _load(name)
    return xtr, ytr


def _unlabeled_batch(cfg: DataConfig, pool: int, world_size: int) -> int:
    """The unlabeled batch per rank: mu * batch_size, or the rank's share of the whole pool."""
    if not cfg.full_unlabeled_batch:
        return cfg.mu * cfg.batch_size
    if pool % world_size:
        raise ValueError(f"--data.full-unlabeled-batch: the {pool} unlabeled points do not split evenly over "
                         f"{world_size} ranks; use a rank count that divides {pool}, or --no-data.full-unlabeled-batch")
    return pool // world_size


def build_embedded_streams(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1,
                           device: str = "cpu", with_indices: bool = False) -> DataStreams:
    """DataStreams for the embedded data sets ("digits", "two-moons"); see the module docstring.
    ``with_indices``: the unlabeled stream yields (weak, strong, index), index int64 = each
    image's row in the training set (the row of a teacher-label store made for it)."""
    xtr, ytr, xte, yte, (weak, strong) = _load(cfg.dataset, cfg.jitter_std)
    if cfg.labeled_fraction is not None:
        raise ValueError("embedded data sets take labels_per_class, not labeled_fraction")
    per_class = cfg.labels_per_class if cfg.labels_per_class is not None else 3
    labeled, val = _per_class_split(ytr, per_class, cfg.val_per_class, seed)
    unlabeled = np.setdiff1d(np.arange(len(ytr)), val)  # labeled images are also unlabeled data
    X, Y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    stream_seed = seed * 1_000_003 + 1  # the same on every rank: each takes its slice of one global batch
    labeled_stream = _Stream(X[labeled], Y[labeled], cfg.batch_size, stream_seed, (weak,), device, rank, world_size)
    unlabeled_stream = _Stream(X[unlabeled], None, _unlabeled_batch(cfg, len(unlabeled), world_size), stream_seed + 1,
                               (weak, strong), device,
                               rank, world_size, keys=torch.from_numpy(unlabeled) if with_indices else None)
    return DataStreams(
        labeled=labeled_stream,
        unlabeled=unlabeled_stream,
        val=_eval_batches(X[val], Y[val], cfg.eval_batch_size, device) if len(val) else [],
        test=_eval_batches(torch.from_numpy(xte), torch.from_numpy(yte), cfg.eval_batch_size, device),
        num_classes=int(ytr.max()) + 1,
        input_shape=tuple(xtr.shape[1:]),
        split={"dataset": cfg.dataset, "seed": seed, "labeled": labeled.tolist(), "val": val.tolist(),
               "num_unlabeled": int(len(unlabeled)), "num_test": int(len(yte))},
        stats={"world_size": world_size},
    )
