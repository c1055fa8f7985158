"""nn.Module transforms for uint8 image batches: RandAugment and Cutout."""

from __future__ import annotations

from typing import Optional

import torch

from mpl_fast.ops import augment as augment_ops


class RandAugment(torch.nn.Module):
    """Batched RandAugment: each image of a uint8 (N, C, H, W) batch gets ``num_ops`` random ops.

    See ``mpl_fast.ops.rand_augment`` for the policies and arguments. ``generator`` (a CPU
    torch.Generator) makes the sequence of batches reproducible; without one, torch's global
    CPU generator is used.
    """

    def __init__(self, num_ops: int = 2, magnitude: float = 9, num_magnitude_bins: int = 31,
                 policy: str = "torchvision", fill=None, cutout: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.num_ops, self.magnitude, self.num_magnitude_bins = num_ops, magnitude, num_magnitude_bins
        self.policy, self.fill, self.cutout, self.generator = policy, fill, cutout, generator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return augment_ops.rand_augment(images, self.num_ops, self.magnitude, self.num_magnitude_bins,
                                        self.policy, self.generator, self.fill, self.cutout)

    def extra_repr(self) -> str:
        return (f"num_ops={self.num_ops}, magnitude={self.magnitude}, num_magnitude_bins={self.num_magnitude_bins}, "
                f"policy={self.policy!r}, fill={self.fill}, cutout={self.cutout}")


class Cutout(torch.nn.Module):
    """Batched Cutout: a ``size`` x ``size`` square of ``fill`` at a random centre per image."""

    def __init__(self, size: int, fill=128, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.size, self.fill, self.generator = size, fill, generator

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return augment_ops.cutout(images, self.size, self.fill, self.generator)

    def extra_repr(self) -> str:
        return f"size={self.size}, fill={self.fill}"
