"""What the augment kernel is told: op names and indices, the kernel's op codes, plans, and the
math that turns a plan's magnitudes (torchvision's units) into kernel parameters.

No randomness here: a plan is given (``mpl_fast.augment`` draws them). The kernel op codes
mirror ``enum OpCode`` in csrc/augment.h, the source of truth; tests/ops/test_extension.py parses
that enum and checks ``KernelCode`` against it.
"""

from __future__ import annotations

import enum
import math
import numbers
from typing import NamedTuple, Sequence, Union

import torch

# torchvision's op names (RandAugment's table plus Invert), in the order of our op indices.
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert",
)
CUTOUT = len(OP_NAMES)  # plan-only op index: fill a box (MPL/UDA's Cutout)
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}


class KernelCode(enum.IntEnum):
    """The kernel's op codes: csrc/augment.h ``enum OpCode`` (kIdentity -> IDENTITY, ...)."""

    IDENTITY = 0
    AFFINE = 1
    BRIGHTNESS = 2
    COLOR = 3
    CONTRAST = 4
    SHARPNESS = 5
    POSTERIZE = 6
    SOLARIZE = 7
    AUTO_CONTRAST = 8
    EQUALIZE = 9
    INVERT = 10
    CUTOUT = 11
    TRANSLATE = 12


PARAMS_PER_OP = 6  # csrc/augment.h kParamsPerOp

# Our op index -> kernel code (translations have their own whole-pixel code; see plan_to_kernel_args).
_CODE_OF_OP = torch.tensor([
    KernelCode.IDENTITY, KernelCode.AFFINE, KernelCode.AFFINE, KernelCode.TRANSLATE, KernelCode.TRANSLATE,
    KernelCode.AFFINE, KernelCode.BRIGHTNESS, KernelCode.COLOR, KernelCode.CONTRAST, KernelCode.SHARPNESS,
    KernelCode.POSTERIZE, KernelCode.SOLARIZE, KernelCode.AUTO_CONTRAST, KernelCode.EQUALIZE, KernelCode.INVERT,
    KernelCode.CUTOUT,
], dtype=torch.int32)
BLEND_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

Fill = Union[numbers.Real, Sequence[numbers.Real], None]


class AugmentPlan(NamedTuple):
    """Per image (N) and per step (K): what to apply.

    op_ids: (N, K) int64, indices into ``OP_NAMES`` (or ``CUTOUT``).
    magnitudes: (N, K) float64, in torchvision's units (signed where torchvision signs them).
    boxes: (N, K, 4) float64, ``(y0, y1, x0, x1)`` half-open and clipped, used by Cutout steps.
    """

    op_ids: torch.Tensor
    magnitudes: torch.Tensor
    boxes: torch.Tensor


def normalize_fill(fill: Fill, channels: int) -> list[int]:
    """``fill`` as 1 or ``channels`` ints in [0, 255] (floats round half to even, as torchvision
    does when it casts the filled float image back to uint8); None means 0."""
    if fill is None:
        return [0]
    values = [fill] if isinstance(fill, numbers.Real) else list(fill)
    if len(values) not in (1, channels):
        raise ValueError(f"mpl_fast: `fill` must have 1 or C = {channels} values, got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 255:
            raise ValueError(f"mpl_fast: `fill[{i}]` must be a number in [0, 255], got {v!r}")
        out.append(int(round(v)))
    return out


def _inverse_affine(center, angle, translate, shear):
    """torchvision.transforms.functional._get_inverse_affine_matrix (scale 1), vectorized in
    float64 with the same operation order. Returns six (M,) tensors."""
    rad_per_deg = math.pi / 180.0  # math.radians
    rot = angle * rad_per_deg
    sx, sy = shear[0] * rad_per_deg, shear[1] * rad_per_deg
    cx, cy = center
    tx, ty = translate
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = 0.0 + (m0 * (-cx - tx) + m1 * (-cy - ty)) + cx
    m5 = 0.0 + (m3 * (-cx - tx) + m4 * (-cy - ty)) + cy
    return m0, m1, m2, m3, m4, m5


def affine_params(op_ids: torch.Tensor, mags: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(M,) geometric ops -> (M, 6) float32 normalized-grid coefficients of ``KernelCode.AFFINE``,
    as torchvision's F.affine / F.rotate (tensor path) compute them: matrix in float64, cast to
    float32, divided by (w/2, h/2) in float32 (_gen_affine_grid)."""
    zero = torch.zeros_like(mags)
    rad_to_deg = 180.0 / math.pi  # math.degrees
    is_shear_x, is_shear_y = op_ids == OP_INDEX["ShearX"], op_ids == OP_INDEX["ShearY"]
    is_shear = is_shear_x | is_shear_y
    shear_deg = torch.atan(mags) * rad_to_deg
    shear = (torch.where(is_shear_x, shear_deg, zero), torch.where(is_shear_y, shear_deg, zero))
    trunc = torch.trunc(mags)  # int(magnitude)
    translate = (torch.where(op_ids == OP_INDEX["TranslateX"], trunc, zero),
                 torch.where(op_ids == OP_INDEX["TranslateY"], trunc, zero))
    # Shears pivot on the top-left corner (center=[0, 0]); the rest on the image centre.
    center = (torch.where(is_shear, zero - width * 0.5, zero), torch.where(is_shear, zero - height * 0.5, zero))
    angle = torch.where(op_ids == OP_INDEX["Rotate"], -mags, zero)  # F.rotate passes -angle
    matrix = torch.stack(_inverse_affine(center, angle, translate, shear), dim=-1).to(torch.float32)
    half = torch.tensor([0.5 * width] * 3 + [0.5 * height] * 3, dtype=torch.float32, device=mags.device)
    return matrix / half


def _is_any(op_ids: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    out = torch.zeros_like(op_ids, dtype=torch.bool)
    for name in names:
        out |= op_ids == OP_INDEX[name]
    return out


def plan_to_kernel_args(plan: AugmentPlan, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel op codes (N, K) int32 and parameters (N, K, 6) float32 for ``plan``, computed on
    the plan's device (a CPU plan gives the same parameters, hence images, on CPU and GPU)."""
    op_ids, mags = plan.op_ids, plan.magnitudes.to(torch.float64)
    device = op_ids.device
    codes = _CODE_OF_OP.to(device)[op_ids]
    params = torch.zeros(op_ids.shape + (PARAMS_PER_OP,), dtype=torch.float32, device=device)
    geometric, blend = _is_any(op_ids, GEOMETRIC_OPS), _is_any(op_ids, BLEND_OPS)

    # Geometric: computed for every step (cheap, fixed shapes) and selected.
    affine = affine_params(op_ids.reshape(-1), mags.reshape(-1), height, width).reshape(params.shape)
    # Blends: torchvision's _blend(img, degenerate, ratio) with ratio = 1 + magnitude; both
    # ratio and 1 - ratio are float64 Python numbers that torch casts to float32.
    ratio = 1.0 + mags
    blend_params = torch.stack([ratio, 1.0 - ratio], dim=-1).to(torch.float32)
    blend_params = torch.nn.functional.pad(blend_params, (0, PARAMS_PER_OP - 2))
    # Posterize: int(magnitude) bits; Solarize: the threshold as float32 (torch compares in float32).
    single = torch.nn.functional.pad(torch.where(op_ids == OP_INDEX["Posterize"], torch.trunc(mags), mags)
                                     .to(torch.float32).unsqueeze(-1), (0, PARAMS_PER_OP - 1))
    boxes = box_params(plan.boxes)
    # Whole-pixel translations (dx, dy): the kernel's fast path, same image as the affine grid.
    shift = torch.trunc(mags).clamp(-(2.0 ** 24), 2.0 ** 24).to(torch.float32)
    is_x, is_y = op_ids == OP_INDEX["TranslateX"], op_ids == OP_INDEX["TranslateY"]
    translate = torch.stack([torch.where(is_x, shift, 0.0), torch.where(is_y, shift, 0.0)], dim=-1)
    translate = torch.nn.functional.pad(translate, (0, PARAMS_PER_OP - 2))

    is_single = (op_ids == OP_INDEX["Posterize"]) | (op_ids == OP_INDEX["Solarize"])
    params = torch.where(geometric.unsqueeze(-1), affine, params)
    params = torch.where((is_x | is_y).unsqueeze(-1), translate, params)
    params = torch.where(blend.unsqueeze(-1), blend_params, params)
    params = torch.where(is_single.unsqueeze(-1), single, params)
    params = torch.where((op_ids == CUTOUT).unsqueeze(-1), boxes, params)
    return codes.contiguous(), params.contiguous()


def box_params(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes ``(y0, y1, x0, x1)`` -> the (..., 6) float32 parameters of ``KernelCode.CUTOUT``."""
    return torch.nn.functional.pad(boxes.to(torch.float32), (0, PARAMS_PER_OP - boxes.shape[-1]))
