"""Batched RandAugment ops on uint8 image batches: ``apply_op`` and ``apply_plan``.

Every image of an (N, C, H, W) uint8 batch (C = 1 or 3, any H, W) runs its own sequence of ops
in ONE call of the kernel ``torch.ops.mpl_fast.augment_apply`` (C++ on the CPU, one CUDA launch
on the GPU). The contract is torchvision: each op equals
``torchvision.transforms.autoaugment._apply_op(img, name, magnitude, NEAREST, fill)`` on that
image, up to float round-off (the kernels reproduce torchvision's float32 arithmetic, so in
practice they agree bit for bit).

How a call flows:

1. A *plan* (``AugmentPlan``) says, per image and per step, which op (an index into
   ``OP_NAMES``) with which magnitude in torchvision's units, plus a box for Cutout steps.
   ``apply_op`` builds a one-step plan; ``mpl_fast.augment`` draws random ones.
2. ``plan_to_kernel_args`` (augment_args.py) turns magnitudes into kernel parameters (affine
   matrices, blend ratios, thresholds) with torchvision's formulas, on the plan's device.
3. The kernel runs, or without the extension the reference (augment_reference.py).

Nothing here is random.
"""

from __future__ import annotations

from typing import Optional

import torch

from mpl_fast.ops import extension
from mpl_fast.ops.augment_args import (
    BLEND_OPS,
    OP_INDEX,
    OP_NAMES,
    AugmentPlan,
    Fill,
    normalize_fill,
    plan_to_kernel_args,
)
from mpl_fast.ops.augment_reference import apply_plan_reference


def check_images(images) -> None:
    """ValueError naming ``images`` unless it is a uint8 (N, C, H, W) tensor with C = 1 or 3."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"mpl_fast: `images` must be a tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"mpl_fast: `images` must be a uint8 tensor, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"mpl_fast: `images` must have shape (N, C, H, W), got {images.dim()} "
                         f"dimensions: {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"mpl_fast: `images` must have 1 or 3 channels (dim 1), got {images.shape[1]}")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that does not block the host: from pinned memory (torch's caching
    host allocator keeps the block alive until the copy is done)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not torch.compiler.is_compiling():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def apply_plan(images: torch.Tensor, plan: AugmentPlan, fill: Fill = 0, *,
               kernel_args: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Applies ``plan`` to ``images`` in one kernel call (the reference without the extension).

    ``kernel_args``: the plan's ``plan_to_kernel_args`` when the caller already has them (a
    policy's parameters are computed once and gathered per image). Parameters computed on the
    CPU give the same images on the CPU and the GPU; they are copied to the images' device."""
    check_images(images)
    fills = normalize_fill(fill, images.shape[1])
    if not extension.use_kernel(images.device):
        return apply_plan_reference(images, plan, fills)
    if kernel_args is None:
        kernel_args = plan_to_kernel_args(plan, images.shape[2], images.shape[3])
    codes, params = (_to_device(t, images.device) for t in kernel_args)
    return torch.ops.mpl_fast.augment_apply.default(images, codes, params, fills)


@extension.register_fake("augment_apply")
def _augment_apply_fake(images, codes, params, fill):
    torch._check(images.dtype == torch.uint8, lambda: f"`images` must be uint8, got {images.dtype}")
    torch._check(images.dim() == 4, lambda: f"`images` must have shape (N, C, H, W), got {images.shape}")
    torch._check(codes.dim() == 2 and codes.shape[0] == images.shape[0], lambda: "`codes` must be (N, K)")
    torch._check(params.dim() == 3 and params.shape[:2] == codes.shape, lambda: "`params` must be (N, K, 6)")
    return torch.empty_like(images, memory_format=torch.contiguous_format)


def _check_magnitudes(magnitudes, images: torch.Tensor, name: str) -> torch.Tensor:
    n = images.shape[0]
    if not isinstance(magnitudes, torch.Tensor):
        magnitudes = torch.as_tensor(magnitudes, dtype=torch.float64)
    if magnitudes.dim() == 0:
        magnitudes = magnitudes.expand(n)
    if magnitudes.shape != (n,):
        raise ValueError(f"mpl_fast: `magnitudes` must have shape (N,) = ({n},), got {tuple(magnitudes.shape)}")
    if magnitudes.device.type != "cpu" and magnitudes.device != images.device:
        raise ValueError(f"mpl_fast: `magnitudes` must be on the CPU or on the device of `images` "
                         f"({images.device}), got {magnitudes.device}")
    if magnitudes.dtype == torch.bool or magnitudes.is_complex():
        raise ValueError(f"mpl_fast: `magnitudes` must be a real tensor, got {magnitudes.dtype}")
    magnitudes = magnitudes.to(torch.float64)
    if magnitudes.device.type == "cpu" and not torch.compiler.is_compiling() and n > 0:
        # Same domain checks as torchvision (only where they cost no device sync).
        if not bool(torch.isfinite(magnitudes).all()):
            bad = magnitudes[~torch.isfinite(magnitudes)][0].item()
            raise ValueError(f"mpl_fast: `magnitudes` of {name} must be finite numbers, got {bad}")
        if name in BLEND_OPS and bool((magnitudes < -1).any()):
            raise ValueError(f"mpl_fast: `magnitudes` of {name} must be >= -1 (factor 1 + magnitude >= 0), "
                             f"got {magnitudes.min().item()}")
        if name == "Posterize" and bool(((magnitudes.trunc() < 0) | (magnitudes.trunc() > 8)).any()):
            raise ValueError("mpl_fast: `magnitudes` of Posterize must be bits in [0, 8]")
    return magnitudes


def apply_op(images: torch.Tensor, name: str, magnitudes, fill: Fill = 0) -> torch.Tensor:
    """Applies torchvision's RandAugment op ``name`` to every image, each with its own magnitude.

    Args:
        images: uint8 (N, C, H, W), C = 1 or 3, on the CPU or a GPU.
        name: one of ``OP_NAMES`` (torchvision's names: "Identity", "ShearX", ..., "Invert").
        magnitudes: (N,) tensor (or a number for all images) in torchvision's units: shear as
            tan of the angle, translation in pixels (truncated to int), rotation in degrees,
            1 + magnitude as the enhancement factor, Posterize bits, Solarize threshold
            (thresholds above 255 leave the image unchanged). On the CPU or on ``images``' device.
            Finite, and in the op's domain: checked (ValueError) when they are on the CPU
            outside torch.compile; on a GPU they are not read back (no host sync).
        fill: value(s) for pixels that geometric ops bring in from outside the image.

    Returns:
        A new uint8 tensor equal, image by image, to
        ``torchvision.transforms.autoaugment._apply_op(img, name, m, NEAREST, fill)``.
    """
    check_images(images)
    if name not in OP_INDEX:
        raise ValueError(f"mpl_fast: `name` must be one of {list(OP_NAMES)}, got {name!r}")
    mags = _check_magnitudes(magnitudes, images, name)
    n = images.shape[0]
    plan = AugmentPlan(torch.full((n, 1), OP_INDEX[name], dtype=torch.int64, device=mags.device),
                       mags.view(n, 1), torch.zeros(n, 1, 4, dtype=torch.float64, device=mags.device))
    return apply_plan(images, plan, fill)
