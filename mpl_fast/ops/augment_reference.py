"""The specification of the augment ops: torchvision's ``_apply_op``, one image and one step at
a time, and for Cutout a filled box. It is also the fallback when the extension is missing.

The loop reads numbers out of tensors, which torch.compile cannot trace; so it runs inside a
Python custom op, ``mpl_fast_reference::augment_plan``, which compiled code calls as one opaque
node (``fullgraph=True`` holds on the fallback too).
"""

from __future__ import annotations

import torch

from mpl_fast.ops.augment_args import CUTOUT, OP_NAMES, AugmentPlan, Fill, normalize_fill


def _reference_one(img: torch.Tensor, op: int, magnitude: float, box, fill: list[float]) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    if op == CUTOUT:
        y0, y1, x0, x1 = (int(v) for v in box)
        img = img.clone()
        img[:, y0:y1, x0:x1] = torch.tensor(fill, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        return img
    name = OP_NAMES[op]
    if name == "Solarize" and magnitude > 255:  # beyond torchvision's domain: nothing to invert
        return img
    if name == "Posterize":
        magnitude = float(min(max(int(magnitude), 0), 8))
    return _apply_op(img, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=fill)


@torch.library.custom_op("mpl_fast_reference::augment_plan", mutates_args=())
def _augment_plan(images: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor, boxes: torch.Tensor,
                  fill: list[int]) -> torch.Tensor:
    channels = images.shape[1]
    fills = [float(v) for v in (fill * channels if len(fill) == 1 else fill)]
    op_ids, mags, boxes = op_ids.cpu(), magnitudes.cpu(), boxes.cpu()
    out = []
    for i in range(images.shape[0]):
        img = images[i]
        for k in range(op_ids.shape[1]):
            img = _reference_one(img, int(op_ids[i, k]), float(mags[i, k]), boxes[i, k].tolist(), fills)
        out.append(img)
    return torch.stack(out) if out else images.clone(memory_format=torch.contiguous_format)


@_augment_plan.register_fake
def _augment_plan_fake(images, op_ids, magnitudes, boxes, fill):
    return torch.empty_like(images, memory_format=torch.contiguous_format)


def apply_plan_reference(images: torch.Tensor, plan: AugmentPlan, fill: Fill = 0) -> torch.Tensor:
    """``plan`` applied to uint8 (N, C, H, W) ``images`` by the specification."""
    return _augment_plan(images, plan.op_ids, plan.magnitudes.to(torch.float64), plan.boxes.to(torch.float64),
                         normalize_fill(fill, images.shape[1]))
