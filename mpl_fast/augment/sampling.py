"""Random draws of a RandAugment plan, all on the CPU from one torch.Generator.

Drawing every random number here, into small (N, num_ops) tensors, and handing them to one
kernel call keeps the kernels deterministic and makes CPU and CUDA produce the same images for
the same seed. Draw order (fixed, so a seed fixes the plan): op indices (N, K), signs (N, K),
then for policies with an apply probability p per image (N,) and the uniforms (N, K) that decide
each step, then Cutout centres rows (N, K) and columns (N, K), then the final cutout's centre.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from mpl_fast.augment.policies import get_policy
from mpl_fast.ops.augment import CUTOUT, OP_INDEX, AugmentPlan


def cutout_boxes(n: int, k: int, height: int, width: int, sizes: torch.Tensor,
                 generator: Optional[torch.Generator]) -> torch.Tensor:
    """(n, k, 4) float64 boxes ``(y0, y1, x0, x1)``: squares of side ``sizes`` (n, k) at uniform
    pixel centres, starting ``size // 2`` before the centre, clipped to the image."""
    cy = torch.randint(max(height, 1), (n, k), generator=generator, dtype=torch.int64).to(torch.float64)
    cx = torch.randint(max(width, 1), (n, k), generator=generator, dtype=torch.int64).to(torch.float64)
    before = torch.floor(sizes / 2)
    y0, x0 = cy - before, cx - before
    y1, x1 = y0 + sizes, x0 + sizes
    return torch.stack([y0.clamp(0, height), y1.clamp(0, height), x0.clamp(0, width), x1.clamp(0, width)], dim=-1)


def _check_sampling_args(num_ops, magnitude, num_magnitude_bins, policy) -> None:
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"mpl_fast: `num_ops` must be a non-negative int, got {num_ops!r}")
    if isinstance(num_magnitude_bins, bool) or not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
        raise ValueError(f"mpl_fast: `num_magnitude_bins` must be an int >= 2, got {num_magnitude_bins!r}")
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not math.isfinite(magnitude) \
            or magnitude < 0:
        raise ValueError(f"mpl_fast: `magnitude` must be a non-negative number, got {magnitude!r}")
    if policy.needs_integer_magnitude and (int(magnitude) != magnitude or magnitude >= num_magnitude_bins):
        raise ValueError(f"mpl_fast: `magnitude` must be a bin index in [0, {num_magnitude_bins - 1}] for "
                         f"policy {policy.name!r}, got {magnitude!r}")


def sample_plan(shape, num_ops: int, magnitude: float, num_magnitude_bins: int, policy_name: str,
                generator: Optional[torch.Generator], final_cutout: int = 0) -> tuple[AugmentPlan, int]:
    """Draws a plan for a batch of ``shape`` (N, C, H, W); returns it and the policy's fill."""
    policy = get_policy(policy_name)
    _check_sampling_args(num_ops, magnitude, num_magnitude_bins, policy)
    n, _, height, width = shape
    table = policy.table(magnitude, num_magnitude_bins, height, width)
    table_ids = torch.tensor([CUTOUT if name == "Cutout" else OP_INDEX[name] for name, _, _ in table])
    table_mags = torch.tensor([value for _, value, _ in table], dtype=torch.float64)
    table_signed = torch.tensor([signed for _, _, signed in table])

    choice = torch.randint(len(table), (n, num_ops), generator=generator)
    negate = torch.randint(2, (n, num_ops), generator=generator).bool() & table_signed[choice]
    op_ids = table_ids[choice]
    mags = torch.where(negate, -table_mags[choice], table_mags[choice])
    if policy.apply_probability is not None:
        lo, hi = policy.apply_probability
        p = lo + (hi - lo) * torch.rand(n, 1, generator=generator, dtype=torch.float64)
        skipped = torch.rand(n, num_ops, generator=generator, dtype=torch.float64) > p
        op_ids = torch.where(skipped, OP_INDEX["Identity"], op_ids)
        mags = torch.where(skipped, 0.0, mags)
    boxes = cutout_boxes(n, num_ops, height, width, torch.where(op_ids == CUTOUT, mags, 0.0), generator)
    mags = torch.where(op_ids == CUTOUT, 0.0, mags)
    if final_cutout > 0:
        sizes = torch.full((n, 1), float(final_cutout), dtype=torch.float64)
        op_ids = torch.cat([op_ids, torch.full((n, 1), CUTOUT)], dim=1)
        mags = torch.cat([mags, torch.zeros(n, 1, dtype=torch.float64)], dim=1)
        boxes = torch.cat([boxes, cutout_boxes(n, 1, height, width, sizes, generator)], dim=1)
    return AugmentPlan(op_ids, mags, boxes), policy.fill
