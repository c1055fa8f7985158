"""Batched RandAugment ops on uint8 image batches: ``apply_op``, ``cutout``, ``rand_augment``.

Every image of an (N, C, H, W) uint8 batch (C = 1 or 3, any H, W) runs its own sequence of ops
in ONE call of the kernel ``torch.ops.mpl_fast.augment_apply`` (C++ on the CPU, one CUDA launch
on the GPU). The contract is torchvision: each op equals
``torchvision.transforms.autoaugment._apply_op(img, name, magnitude, NEAREST, fill)`` on that
image, up to float round-off (the kernels reproduce torchvision's float32 arithmetic, so in
practice they agree bit for bit).

How a call flows:

1. A *plan* says, per image and per step, which op (an index into ``OP_NAMES``) with which
   magnitude in torchvision's units, plus a box for ``Cutout`` steps. ``rand_augment`` draws it
   with a CPU ``torch.Generator`` (mpl_fast/augment/sampling.py); ``apply_op`` and ``cutout``
   build it directly.
2. ``plan_to_kernel_args`` turns magnitudes into kernel parameters (affine matrices, blend
   ratios, thresholds) with torchvision's formulas, in float64 then float32 exactly as
   torchvision does. Computed on the plan's device: a plan drawn on the CPU gives identical
   parameters, hence identical images, on the CPU and the GPU. (``rand_augment`` computes them
   once per policy table and gathers them per image: see sampling.py.)
3. ``run_plan`` / ``run_kernel`` call the kernel, or ``run_plan_reference`` (a loop over images
   calling torchvision, the specification) runs when the extension is missing.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch

from mpl_fast.ops import _extension

# torchvision's op names (RandAugment's table plus Invert), in the order of our op indices.
OP_NAMES = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert",
)
CUTOUT = len(OP_NAMES)  # plan-only op index: fill a box (MPL/UDA's Cutout)
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}

# Kernel op codes, as in csrc/augment.h (enum OpCode).
_K_IDENTITY, _K_AFFINE, _K_BRIGHTNESS, _K_COLOR, _K_CONTRAST, _K_SHARPNESS = 0, 1, 2, 3, 4, 5
_K_POSTERIZE, _K_SOLARIZE, _K_AUTOCONTRAST, _K_EQUALIZE, _K_INVERT, _K_CUTOUT = 6, 7, 8, 9, 10, 11
_K_TRANSLATE = 12
_PARAMS_PER_OP = 6
# Our op index -> kernel code.
_CODE_OF_OP = torch.tensor([
    _K_IDENTITY, _K_AFFINE, _K_AFFINE, _K_TRANSLATE, _K_TRANSLATE, _K_AFFINE, _K_BRIGHTNESS, _K_COLOR,
    _K_CONTRAST, _K_SHARPNESS, _K_POSTERIZE, _K_SOLARIZE, _K_AUTOCONTRAST, _K_EQUALIZE, _K_INVERT,
    _K_CUTOUT,
], dtype=torch.int32)
_BLEND_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
_GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")

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


# ---------------------------------------------------------------------------------------------
# Argument checks (ValueError naming the argument)
# ---------------------------------------------------------------------------------------------

def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"mpl_fast: `images` must be a tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"mpl_fast: `images` must be a uint8 tensor, got {images.dtype}")
    if images.dim() != 4:
        raise ValueError(f"mpl_fast: `images` must have shape (N, C, H, W), got {images.dim()} "
                         f"dimensions: {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"mpl_fast: `images` must have 1 or 3 channels (dim 1), got {images.shape[1]}")


def _check_generator(generator) -> None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("mpl_fast: `generator` must be a CPU torch.Generator (draws are made on the "
                         f"CPU so that CPU and CUDA give the same images), got one on {generator.device}")


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


# ---------------------------------------------------------------------------------------------
# Magnitudes -> kernel parameters (torchvision's formulas)
# ---------------------------------------------------------------------------------------------

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


def _affine_params(op_ids: torch.Tensor, mags: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(M,) geometric ops -> (M, 6) float32 normalized-grid coefficients, as torchvision's
    F.affine / F.rotate (tensor path) compute them: matrix in float64, cast to float32, divided
    by (w/2, h/2) in float32 (_gen_affine_grid)."""
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


def plan_to_kernel_args(plan: AugmentPlan, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel op codes (N, K) int32 and parameters (N, K, 6) float32 for ``plan``."""
    op_ids, mags = plan.op_ids, plan.magnitudes.to(torch.float64)
    device = op_ids.device
    codes = _CODE_OF_OP.to(device)[op_ids]
    params = torch.zeros(op_ids.shape + (_PARAMS_PER_OP,), dtype=torch.float32, device=device)

    geometric = torch.zeros_like(op_ids, dtype=torch.bool)
    for name in _GEOMETRIC_OPS:
        geometric |= op_ids == OP_INDEX[name]
    blend = torch.zeros_like(geometric)
    for name in _BLEND_OPS:
        blend |= op_ids == OP_INDEX[name]

    # Geometric: computed for every step (cheap, fixed shapes) and selected.
    affine = _affine_params(op_ids.reshape(-1), mags.reshape(-1), height, width).reshape(params.shape)
    # Blends: torchvision's _blend(img, degenerate, ratio) with ratio = 1 + magnitude; both
    # ratio and 1 - ratio are float64 Python numbers that torch casts to float32.
    ratio = 1.0 + mags
    blend_params = torch.stack([ratio, 1.0 - ratio], dim=-1).to(torch.float32)
    blend_params = torch.nn.functional.pad(blend_params, (0, _PARAMS_PER_OP - 2))
    # Posterize: int(magnitude) bits; Solarize: the threshold as float32 (torch compares in float32).
    single = torch.nn.functional.pad(torch.where(op_ids == OP_INDEX["Posterize"], torch.trunc(mags), mags)
                                     .to(torch.float32).unsqueeze(-1), (0, _PARAMS_PER_OP - 1))
    boxes = torch.nn.functional.pad(plan.boxes.to(torch.float32), (0, _PARAMS_PER_OP - 4))
    # Whole-pixel translations (dx, dy): the kernel's fast path, same image as the affine grid.
    shift = torch.trunc(mags).clamp(-(2.0 ** 24), 2.0 ** 24).to(torch.float32)
    is_x, is_y = op_ids == OP_INDEX["TranslateX"], op_ids == OP_INDEX["TranslateY"]
    translate = torch.stack([torch.where(is_x, shift, 0.0), torch.where(is_y, shift, 0.0)], dim=-1)
    translate = torch.nn.functional.pad(translate, (0, _PARAMS_PER_OP - 2))

    is_single = (op_ids == OP_INDEX["Posterize"]) | (op_ids == OP_INDEX["Solarize"])
    params = torch.where(geometric.unsqueeze(-1), affine, params)
    params = torch.where((is_x | is_y).unsqueeze(-1), translate, params)
    params = torch.where(blend.unsqueeze(-1), blend_params, params)
    params = torch.where(is_single.unsqueeze(-1), single, params)
    params = torch.where((op_ids == CUTOUT).unsqueeze(-1), boxes, params)
    return codes.contiguous(), params.contiguous()


# ---------------------------------------------------------------------------------------------
# Reference (the specification): torchvision, one image and one op at a time
# ---------------------------------------------------------------------------------------------

def _reference_one(img: torch.Tensor, op: int, magnitude: float, box, fill: list[float]) -> torch.Tensor:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    if op == CUTOUT:
        y0, y1, x0, x1 = (int(v) for v in box)
        img = img.clone()
        img[:, y0:y1, x0:x1] = torch.tensor(fill, dtype=img.dtype).view(-1, 1, 1)
        return img
    name = OP_NAMES[op]
    if name == "Solarize" and magnitude > 255:  # beyond torchvision's domain: nothing to invert
        return img
    if name == "Posterize":
        magnitude = float(min(max(int(magnitude), 0), 8))
    return _apply_op(img, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=fill)


def run_plan_reference(images: torch.Tensor, plan: AugmentPlan, fill: Fill = 0) -> torch.Tensor:
    """The specification of every op here: a Python loop over images and steps calling
    torchvision's ``_apply_op`` (nearest interpolation) and, for Cutout, filling the box."""
    _check_images(images)
    fills = normalize_fill(fill, images.shape[1])
    fills = [float(v) for v in (fills * images.shape[1] if len(fills) == 1 else fills)]
    op_ids, mags, boxes = plan.op_ids.cpu(), plan.magnitudes.cpu(), plan.boxes.cpu()
    out = []
    for i in range(images.shape[0]):
        img = images[i]
        for k in range(op_ids.shape[1]):
            img = _reference_one(img, int(op_ids[i, k]), float(mags[i, k]), boxes[i, k].tolist(), fills)
        out.append(img)
    return torch.stack(out) if out else images.clone()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-device copy that does not block the host: from pinned memory (torch's caching
    host allocator keeps the block alive until the copy is done)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not torch.compiler.is_compiling():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def run_kernel(images: torch.Tensor, codes: torch.Tensor, params: torch.Tensor, fills: list[int]) -> torch.Tensor:
    """One call of the kernel; codes and params may still be on the CPU."""
    codes, params = _to_device(codes, images.device), _to_device(params, images.device)
    return torch.ops.mpl_fast.augment_apply.default(images, codes, params, fills)


def run_plan(images: torch.Tensor, plan: AugmentPlan, fill: Fill = 0) -> torch.Tensor:
    """Applies ``plan`` to ``images`` in one kernel call (or with the reference, without the extension).

    Kernel parameters are computed where the plan lives (a CPU plan gives the same parameters,
    hence the same images, for CPU and CUDA images), then copied to the images' device."""
    _check_images(images)
    fills = normalize_fill(fill, images.shape[1])
    if not _extension.use_kernel(images.device):
        return run_plan_reference(images, plan, fills)
    codes, params = plan_to_kernel_args(plan, images.shape[2], images.shape[3])
    return run_kernel(images, codes, params, fills)


@_extension.register_fake("augment_apply")
def _augment_apply_fake(images, codes, params, fill):
    torch._check(images.dtype == torch.uint8, lambda: f"`images` must be uint8, got {images.dtype}")
    torch._check(images.dim() == 4, lambda: f"`images` must have shape (N, C, H, W), got {images.shape}")
    torch._check(codes.dim() == 2 and codes.shape[0] == images.shape[0], lambda: "`codes` must be (N, K)")
    torch._check(params.dim() == 3 and params.shape[:2] == codes.shape, lambda: "`params` must be (N, K, 6)")
    return torch.empty_like(images, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Public ops
# ---------------------------------------------------------------------------------------------

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
        if name in _BLEND_OPS and bool((magnitudes < -1).any()):
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
        fill: value(s) for pixels that geometric ops bring in from outside the image.

    Returns:
        A new uint8 tensor equal, image by image, to
        ``torchvision.transforms.autoaugment._apply_op(img, name, m, NEAREST, fill)``.
    """
    _check_images(images)
    if name not in OP_INDEX:
        raise ValueError(f"mpl_fast: `name` must be one of {list(OP_NAMES)}, got {name!r}")
    mags = _check_magnitudes(magnitudes, images, name)
    n = images.shape[0]
    plan = AugmentPlan(torch.full((n, 1), OP_INDEX[name], dtype=torch.int64, device=mags.device),
                       mags.view(n, 1), torch.zeros(n, 1, 4, dtype=torch.float64, device=mags.device))
    return run_plan(images, plan, fill)


def cutout(images: torch.Tensor, size: int, fill: Fill = 128,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Fills a ``size`` x ``size`` square at a random centre of each image (MPL/UDA's Cutout).

    The centre (cy, cx) is uniform over the pixels; the square covers rows
    ``[cy - size // 2, cy - size // 2 + size)`` and the same for columns, clipped at the borders
    (so for even sizes exactly MPL's ``2 * pad_size`` box). ``fill`` defaults to 128, the grey
    MPL and UDA use. Draws come from ``generator`` (a CPU torch.Generator) for reproducibility.
    """
    _check_images(images)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"mpl_fast: `size` must be a non-negative int, got {size!r}")
    _check_generator(generator)
    from mpl_fast.augment.sampling import cutout_boxes

    n, _, h, w = images.shape
    boxes = cutout_boxes(n, 1, h, w, torch.full((n, 1), float(size), dtype=torch.float64), generator)
    plan = AugmentPlan(torch.full((n, 1), CUTOUT, dtype=torch.int64), torch.zeros(n, 1, dtype=torch.float64), boxes)
    return run_plan(images, plan, fill)


def rand_augment(images: torch.Tensor, num_ops: int = 2, magnitude: float = 9, num_magnitude_bins: int = 31,
                 policy: str = "torchvision", generator: Optional[torch.Generator] = None, fill: Fill = None,
                 cutout: int = 0) -> torch.Tensor:
    """RandAugment on a batch: each image gets ``num_ops`` ops drawn uniformly from ``policy``.

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
        images: uint8 (N, C, H, W), C = 1 or 3, CPU or GPU.
        fill: fill value(s) for geometric ops and Cutout; None means the policy's (0 for
            torchvision, 128 for the MPL policies).
        cutout: side of a final Cutout square after the ops (0 = none); MPL's CIFAR recipe uses
            image_size // 2 (16 px for 32x32), i.e. ``pad_size = image_size // 4``.
        generator: a CPU torch.Generator; the same seed gives the same images on CPU and CUDA.
    """
    _check_images(images)
    _check_generator(generator)
    from mpl_fast.augment.sampling import sample_plan

    if isinstance(cutout, bool) or not isinstance(cutout, int) or cutout < 0:
        raise ValueError(f"mpl_fast: `cutout` must be a non-negative int, got {cutout!r}")
    drawn = sample_plan(images.shape, num_ops, magnitude, num_magnitude_bins, policy, generator, final_cutout=cutout)
    fills = normalize_fill(drawn.fill if fill is None else fill, images.shape[1])
    if not _extension.use_kernel(images.device):
        return run_plan_reference(images, drawn.plan, fills)
    return run_kernel(images, drawn.codes, drawn.params, fills)
