"""The input contract of the augment functions and modules, as torchvision v2's RandAugment:
a single image (C, H, W) or a batch with any leading dims (..., C, H, W), a plain tensor or a
``torchvision.tv_tensors.Image`` (the type comes back). The kernels work on uint8 pixels, so a
float image is refused with the conversion to use (a round trip through uint8 would silently
quantise it)."""

from __future__ import annotations

from typing import Callable

import torch


def as_batch(images) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``images`` as a plain (N, C, H, W) tensor, and the function that gives an output batch
    the input's shape and type back."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"mpl_fast: `images` must be a tensor, got {type(images).__name__} (for PIL "
                         "images put torchvision.transforms.v2.ToImage() first)")
    if images.is_floating_point():
        raise ValueError(f"mpl_fast: `images` must be a uint8 tensor, got {images.dtype}: the kernels work on "
                         "8-bit pixels. For float images in [0, 1] put "
                         "torchvision.transforms.v2.ToDtype(torch.uint8, scale=True) before and "
                         "ToDtype(torch.float32, scale=True) after.")
    if images.dim() < 3:
        raise ValueError(f"mpl_fast: `images` must have shape (C, H, W) or (..., C, H, W), got "
                         f"{tuple(images.shape)}")
    kind = type(images)
    plain = images.as_subclass(torch.Tensor) if kind is not torch.Tensor else images
    shape = plain.shape
    batch = plain.reshape(-1, *shape[-3:])

    def restore(out: torch.Tensor) -> torch.Tensor:
        out = out.reshape(shape)
        return out.as_subclass(kind) if kind is not torch.Tensor else out

    return batch, restore
