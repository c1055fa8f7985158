"""The views of an image MPL needs: weak (random crop + flip), strong (weak geometry, then
RandAugment and cutout on the whole uint8 batch) and eval (deterministic), and the final
normalisation to float model input. All randomness comes from an explicit torch.Generator."""

from __future__ import annotations

import math

import torch


def pad_crop_flip(images: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator,
                  fill: int | None = None) -> torch.Tensor:
    """Weak view of small images (CIFAR, SVHN): pad by ``pad`` (reflect, or the constant
    ``fill``: MPL's official code pads with 128), crop back to the original size at a random
    offset, and flip half of them horizontally; uint8 (B, C, H, W) in and out, one gather for
    the whole batch."""
    b, _, h, w = images.shape
    dev = images.device
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=generator).to(dev)
    rows = oy - pad + torch.arange(h, device=dev)          # (B, H), may fall in the padding
    cols = ox - pad + torch.arange(w, device=dev)          # (B, W)
    if flip:
        flipped = (torch.rand(b, generator=generator) < 0.5).to(dev)
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    batch = torch.arange(b, device=dev)[:, None, None]
    if fill is None:
        rows, cols = _reflect(rows, h), _reflect(cols, w)
        out = images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    else:
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (B, H, W)
        out = images.permute(0, 2, 3, 1)[batch, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
        out = torch.where(inside[..., None], out, torch.full_like(out, fill))
    return out.permute(0, 3, 1, 2).contiguous()


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect-padding index map (edge pixel not repeated), for |offset| < n."""
    i = torch.where(i < 0, -i, i)
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style random crop: area ``scale`` of the image,
    aspect ratio ``ratio`` (log-uniform); the centre crop of the nearest ratio after 10 misses."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=generator).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(u[2] * (height - h + 1))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop_flip(image: torch.Tensor, size: int, *, flip: bool,
                      generator: torch.Generator) -> torch.Tensor:
    """Weak view of one decoded photo: random-resized-crop to ``size`` x ``size`` and a
    horizontal flip with probability 1/2; uint8 (C, H, W) in and out."""
    from torchvision.transforms.v2 import functional as TF

    top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator)
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if flip and float(torch.rand(1, generator=generator)) < 0.5:
        out = out.flip(-1)
    return out


def resize_center_crop(image: torch.Tensor, size: int, crop_fraction: float = 0.875) -> torch.Tensor:
    """Eval view of one decoded photo: shorter side to size / crop_fraction, centre crop."""
    from torchvision.transforms.v2 import functional as TF

    out = TF.resize(image, [round(size / crop_fraction)], antialias=True)
    return TF.center_crop(out, [size, size])


def strong_view(weak: torch.Tensor, *, num_ops: int, magnitude: int, policy: str, cutout: int,
                generator: torch.Generator, recrop_pad: int = 0, recrop_flip: bool = True,
                fill: int | None = None) -> torch.Tensor:
    """Strong view of a uint8 batch (B, C, H, W) that already has the weak geometry:
    RandAugment (each image its own ops and magnitudes) then cutout, on the batch's device;
    with ``recrop_pad`` > 0, then a second random flip (``recrop_flip``) and pad-and-crop by
    that many pixels, padded with ``fill`` (None: reflect), as MPL's official CIFAR pipeline.
    ``generator`` is a CPU generator (the op samples its per-image plan on the CPU).

    The one place the strong view is computed, by both pipelines.
    """
    from mpl_fast.augment import cutout as cutout_op
    from mpl_fast.augment import rand_augment

    out = rand_augment(weak, num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=31,
                       policy=policy, generator=generator)  # fill: the policy's own
    if cutout > 0:
        out = cutout_op(out, cutout, generator=generator)
    if recrop_pad > 0:
        out = pad_crop_flip(out, pad=recrop_pad, flip=recrop_flip, generator=generator, fill=fill)
    return out


class Normalize:
    """uint8 (B, C, H, W) -> float32 model input ((x / 255 - mean) / std), on the batch's device.

    One scalar multiply-add per channel straight into the output: on CPU about twice as fast
    as broadcasting a (1, C, 1, 1) tensor over a converted copy.
    """

    def __init__(self, mean, std):
        self.scale = [1.0 / (255.0 * s) for s in std]
        self.shift = [-m / s for m, s in zip(mean, std)]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        for c, (scale, shift) in enumerate(zip(self.scale, self.shift)):
            torch.mul(images[:, c], scale, out=out[:, c])
            out[:, c].add_(shift)
        return out
