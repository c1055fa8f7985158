"""nn.Module transforms: RandAugment and Cutout, drop-in for torchvision v2 pipelines.

Input as torchvision v2's RandAugment takes it (mpl_fast/augment/inputs.py): uint8 (C, H, W)
or (..., C, H, W), a tensor or a tv_tensors.Image (returned as one), so a module sits in a
``v2.Compose`` after ``v2.ToImage()``. A ``generator`` given to a module gets the DataLoader
worker folded in inside a worker (mpl_fast/augment/workers.py), so workers do not repeat each
other's augmentations.
"""

from __future__ import annotations

from typing import Optional

import torch

import mpl_fast.augment.functional as functional
from mpl_fast.augment.workers import worker_generator


class RandAugment(torch.nn.Module):
    """RandAugment: each image gets ``num_ops`` random ops (see ``mpl_fast.augment.rand_augment``
    for the policies and arguments). ``generator`` (a CPU torch.Generator) makes the sequence of
    batches reproducible; without one, torch's global CPU generator is used."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9, num_magnitude_bins: int = 31,
                 policy: str = "torchvision", fill=None, cutout: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins
        self.policy, self.fill, self.cutout, self.generator = policy, fill, cutout, generator
        self._worker_stream: dict = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return functional.rand_augment(images, self.num_ops, self.magnitude, self.num_magnitude_bins, self.policy,
                                       worker_generator(self.generator, self._worker_stream), self.fill,
                                       self.cutout)

    def extra_repr(self) -> str:
        return (f"num_ops={self.num_ops}, magnitude={self.magnitude}, num_magnitude_bins={self.num_magnitude_bins}, "
                f"policy={self.policy!r}, fill={self.fill}, cutout={self.cutout}")


class Cutout(torch.nn.Module):
    """Cutout: a ``size`` x ``size`` square of ``fill`` at a random centre per image."""

    def __init__(self, size: int, fill=128, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.size, self.fill, self.generator = size, fill, generator
        self._worker_stream: dict = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return functional.cutout(images, self.size, self.fill, worker_generator(self.generator, self._worker_stream))

    def extra_repr(self) -> str:
        return f"size={self.size}, fill={self.fill}"
