"""RandAugment and Cutout as functions: draw a plan (sampling.py), run it (mpl_fast.ops)."""

from __future__ import annotations

from typing import Optional

import torch

from mpl_fast.augment.inputs import as_batch
from mpl_fast.augment.sampling import cutout_boxes, sample_plan
from mpl_fast.ops import CUTOUT, AugmentPlan, apply_plan, check_images, normalize_fill
from mpl_fast.ops.augment_args import Fill


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"mpl_fast: `generator` must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("mpl_fast: `generator` must be a CPU torch.Generator (draws are made on the "
                         f"CPU so that CPU and CUDA give the same images), got one on {generator.device}")


def cutout(images: torch.Tensor, size: int, fill: Fill = 128,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fills a ``size`` x ``size`` square at a random centre of each image (MPL/UDA's Cutout).

    The centre (cy, cx) is uniform over the pixels; the square covers rows
    ``[cy - size // 2, cy - size // 2 + size)`` and the same for columns, clipped at the borders
    (so for even sizes exactly MPL's ``2 * pad_size`` box). ``fill`` defaults to 128, the grey
    MPL and UDA use. Draws come from ``generator`` (a CPU torch.Generator; None: torch's global
    one). ``images``: uint8 (C, H, W) or (..., C, H, W), tensor or tv_tensors.Image.
    """
    batch, restore = as_batch(images)
    check_images(batch)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"mpl_fast: `size` must be a non-negative int, got {size!r}")
    _check_generator(generator)
    n, _, h, w = batch.shape
    boxes = _cutout_boxes(n, h, w, size, generator)
    plan = AugmentPlan(torch.full((n, 1), CUTOUT, dtype=torch.int64), torch.zeros(n, 1, dtype=torch.float64), boxes)
    return restore(apply_plan(batch, plan, fill))


def _cutout_boxes(n, h, w, size, generator):
    sizes = torch.full((n, 1), float(size), dtype=torch.float64)
    if generator is not None and torch.compiler.is_compiling():
        return _cutout_boxes_eagerly(n, 1, h, w, sizes, generator)
    return cutout_boxes(n, 1, h, w, sizes, generator)


# torch.compile cannot trace a torch.Generator argument: with one, the draws run eagerly.
_cutout_boxes_eagerly = torch.compiler.disable(cutout_boxes)


def rand_augment(images: torch.Tensor, num_ops: int = 2, magnitude: float = 9, num_magnitude_bins: int = 31,
                 policy: str = "torchvision", generator: Optional[torch.Generator] = None, fill: Fill = None,
                 cutout: int = 0) -> torch.Tensor:
    """RandAugment: each image gets ``num_ops`` ops drawn uniformly from ``policy``.

    Policies (tables and the source of every number: mpl_fast/augment/policies.py):
      - "torchvision": the distribution of ``torchvision.transforms.RandAugment(num_ops,
        magnitude, num_magnitude_bins)``: ``magnitude`` is a bin index, signs random where
        torchvision signs.
      - "mpl": Meta Pseudo Labels' CIFAR RandAugment (google-research/meta_pseudo_labels):
        ``magnitude`` is its level (out of 10, may exceed it; the paper uses up to 16), each op
        applied with a per-image probability drawn from U(0.2, 0.8), Cutout among the ops,
        translate and cutout constants of image_size // 8; ``num_magnitude_bins`` is unused.
      - "mpl-imagenet": the same with MPL's ImageNet constants (translate 100 px, cutout 40).

    Args:
        images: uint8 (C, H, W) or (..., C, H, W) with C = 1 or 3, CPU or GPU, a tensor or a
            tv_tensors.Image (returned as one).
        fill: fill value(s) for geometric ops and Cutout; None means the policy's (0 for
            torchvision, 128 for the MPL policies).
        cutout: side of a final Cutout square after the ops (0 = none); MPL's CIFAR recipe uses
            image_size // 2 (16 px for 32x32), i.e. ``pad_size = image_size // 4``.
        generator: a CPU torch.Generator; the same seed gives the same images on CPU and CUDA.
            None: torch's global CPU generator (the form torch.compile traces; see sampling.py).
    """
    batch, restore = as_batch(images)
    check_images(batch)
    _check_generator(generator)
    if isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 0:
        raise ValueError(f"mpl_fast: `cutout` must be a non-negative int, got {cutout!r}")
    drawn = sample_plan(batch.shape, num_ops, magnitude, num_magnitude_bins, policy, generator, final_cutout=cutout)
    fills = normalize_fill(drawn.fill if fill is None else fill, batch.shape[1])
    return restore(apply_plan(batch, drawn.plan, fills, kernel_args=(drawn.codes, drawn.params)))
