"""RandAugment policy tables: which ops, and each op's magnitude, in torchvision's units.

A policy maps (magnitude setting, image height, width) to a table of entries
``(op name, magnitude, signed)``: ``rand_augment`` draws ops uniformly from the table and, where
``signed``, flips the magnitude's sign with probability 1/2. Magnitudes are in the units of
``torchvision.transforms.autoaugment._apply_op`` (mpl_fast/ops/augment.py explains them), so every
policy runs on the same kernels.

Sources of the numbers
----------------------
"torchvision": torchvision 0.29 ``RandAugment._augmentation_space`` (transforms/autoaugment.py),
    reproduced exactly, float32 ``torch.linspace`` included (tests compare the two tables):
    Identity 0; ShearX/Y linspace(0, 0.3) signed; TranslateX/Y linspace(0, 150/331 * W or H)
    signed; Rotate linspace(0, 30) deg signed; Brightness/Color/Contrast/Sharpness
    linspace(0, 0.9) signed; Posterize 8 - round(bin / ((bins - 1) / 4)) bits; Solarize
    linspace(255, 0); AutoContrast, Equalize 0. 14 ops (no Invert, no Cutout).

"mpl" / "mpl-imagenet": Meta Pseudo Labels' official code, google-research/meta_pseudo_labels
    augment.py (class RandAugment, level_to_arg and the *_level_to_arg helpers; _MAX_LEVEL = 10)
    and data_utils.py (the constants per data set). Level L = the ``magnitude`` argument.
    Op list (15, uniform): AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, Color,
    Contrast, Brightness, Sharpness, ShearX, ShearY, TranslateX, TranslateY, Cutout.
    - Rotate: L / 10 * 30 degrees, random sign (_rotate_level_to_arg).
    - Posterize: int(L / 10 * 4) bits (_mult_to_arg(level, 4)); MPL keeps that many bits, so
      larger levels posterize *less*; clamped to [0, 8] (TF's shift is undefined beyond 8).
    - Solarize: threshold int(L / 10 * 256) (_mult_to_arg(level, 256), an int32), which MPL's
      solarize casts to the image's uint8 (``tf.cast(threshold, image.dtype)``): TF's integer
      narrowing cast wraps modulo 256 (its docs: a cast of 256 to uint8 gives 0, of -1 gives
      255; tf.saturate_cast is the clamping one). So from L = 10 on the threshold wraps: 256 -> 0
      (every pixel inverted), L = 16: 409 -> 153, L = 17: 435 -> 179. We match it.
    - Color, Contrast, Brightness, Sharpness: factor L / 10 * 1.8 + 0.1, unsigned
      (_enhance_level_to_arg); torchvision magnitude = factor - 1. MPL's blend(degenerate, image,
      factor) equals torchvision's _blend(image, degenerate, factor). Mapping note: MPL's
      Contrast degenerates to (pixel count / 256) instead of the mean (a bug in the TF port);
      we use torchvision's mean.
    - ShearX/Y: L / 10 * 0.3, random sign (_shear_level_to_arg); same matrix entry as
      torchvision's tan(atan(m)).
    - TranslateX/Y: L / 10 * translate_const pixels, random sign (_translate_level_to_arg);
      torchvision truncates to whole pixels (MPL's TF op takes fractions; nearest sampling makes
      the difference at most one pixel).
    - Cutout: a square of side 2 * int(L / 10 * cutout_const) (_mult_to_arg(level,
      cutout_const), pad_size on each side of a uniform centre).
    - translate_const = cutout_const = image_size // 8 in "mpl" (data_utils.py, CIFAR:
      ``RandAugment(cutout_const=image_size//8, translate_const=image_size//8)``); per axis,
      W // 8 and H // 8 here, min(H, W) // 8 for Cutout. "mpl-imagenet": RandAugment's defaults
      translate_const = 100, cutout_const = 40 (data_utils.py, ImageNet uses the defaults).
    - Each selected op is applied with probability p, p ~ U(0.2, 0.8) drawn once per image
      (RandAugment.distort); otherwise Identity.
    - Fill 128 for geometric ops and Cutout (``replace_value = [128] * 3``).
    - MPL then applies a final cutout of pad_size = image_size // 4 (16 px squares on 32x32
      CIFAR): ``rand_augment(..., cutout=16)`` or ``mpl_fast.augment.cutout(images, 16)``.
    Ops with no torchvision counterpart: Cutout (ours, see mpl_fast.augment.cutout). MPL's op
    list has no Identity (Identity only appears when an op is skipped by its probability).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# (op name, magnitude, signed)
Entry = tuple[str, float, bool]


@dataclass(frozen=True)
class Policy:
    """A RandAugment policy: its op table, its fill, and MPL's per-image apply probability."""

    name: str
    table: Callable[[float, int, int, int], list[Entry]]  # (magnitude, num_bins, height, width)
    fill: int
    apply_probability: tuple[float, float] | None  # per-image p ~ U(lo, hi), None: always apply
    needs_integer_magnitude: bool


def torchvision_table(magnitude: float, num_bins: int, height: int, width: int) -> list[Entry]:
    """torchvision.transforms.RandAugment._augmentation_space(num_bins, (height, width)) at bin
    ``magnitude``, as (name, float(value), signed) in torchvision's order."""
    m = int(magnitude)

    def bin_of(start: float, end: float) -> float:
        return float(torch.linspace(start, end, num_bins)[m].item())  # float32, as torchvision

    posterize_bits = 8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()
    return [
        ("Identity", 0.0, False),
        ("ShearX", bin_of(0.0, 0.3), True),
        ("ShearY", bin_of(0.0, 0.3), True),
        ("TranslateX", bin_of(0.0, 150.0 / 331.0 * width), True),
        ("TranslateY", bin_of(0.0, 150.0 / 331.0 * height), True),
        ("Rotate", bin_of(0.0, 30.0), True),
        ("Brightness", bin_of(0.0, 0.9), True),
        ("Color", bin_of(0.0, 0.9), True),
        ("Contrast", bin_of(0.0, 0.9), True),
        ("Sharpness", bin_of(0.0, 0.9), True),
        ("Posterize", float(posterize_bits[m].item()), False),
        ("Solarize", bin_of(255.0, 0.0), False),
        ("AutoContrast", 0.0, False),
        ("Equalize", 0.0, False),
    ]


_MPL_MAX_LEVEL = 10.0


def _mult_to_arg(level: float, multiplier: float) -> int:
    # MPL: int32(float32(level) / 10 * multiplier), computed in float32.
    value = torch.tensor(level, dtype=torch.float32) / _MPL_MAX_LEVEL * multiplier
    return int(value.to(torch.int32).item())


def _mpl_table(translate_const: Callable[[int], int], cutout_const: Callable[[int, int], int]):
    def table(level: float, num_bins: int, height: int, width: int) -> list[Entry]:
        del num_bins  # MPL levels are continuous
        enhance = level / _MPL_MAX_LEVEL * 1.8 + 0.1 - 1.0
        shear = level / _MPL_MAX_LEVEL * 0.3
        return [
            ("AutoContrast", 0.0, False),
            ("Equalize", 0.0, False),
            ("Invert", 0.0, False),
            ("Rotate", level / _MPL_MAX_LEVEL * 30.0, True),
            ("Posterize", float(min(max(_mult_to_arg(level, 4), 0), 8)), False),
            ("Solarize", float(_mult_to_arg(level, 256) % 256), False),  # MPL's uint8 cast wraps
            ("Color", enhance, False),
            ("Contrast", enhance, False),
            ("Brightness", enhance, False),
            ("Sharpness", enhance, False),
            ("ShearX", shear, True),
            ("ShearY", shear, True),
            ("TranslateX", level / _MPL_MAX_LEVEL * translate_const(width), True),
            ("TranslateY", level / _MPL_MAX_LEVEL * translate_const(height), True),
            ("Cutout", float(2 * _mult_to_arg(level, cutout_const(height, width))), False),
        ]

    return table


POLICIES: dict[str, Policy] = {
    "torchvision": Policy("torchvision", torchvision_table, fill=0, apply_probability=None,
                          needs_integer_magnitude=True),
    "mpl": Policy("mpl", _mpl_table(lambda side: side // 8, lambda h, w: min(h, w) // 8), fill=128,
                  apply_probability=(0.2, 0.8), needs_integer_magnitude=False),
    "mpl-imagenet": Policy("mpl-imagenet", _mpl_table(lambda side: 100, lambda h, w: 40), fill=128,
                           apply_probability=(0.2, 0.8), needs_integer_magnitude=False),
}


def get_policy(name: str) -> Policy:
    """The policy called ``name`` (ValueError naming the choices otherwise)."""
    if name not in POLICIES:
        raise ValueError(f"mpl_fast: `policy` must be one of {sorted(POLICIES)}, got {name!r}")
    return POLICIES[name]
