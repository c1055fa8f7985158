"""Random draws of a RandAugment plan, all on the CPU from one random stream.

Drawing every random number here, into small (N, num_ops) tensors, and handing them to one
kernel call keeps the kernels deterministic and makes CPU and CUDA produce the same images for
the same seed. Draw order (fixed, so a seed fixes the plan): op indices (N, K), signs (N, K),
then for policies with an apply probability p per image (N,) and the uniforms (N, K) that decide
each step, then Cutout centres rows (N, K) and columns (N, K), then the final cutout's centre.

Under torch.compile: with ``generator=None`` (torch's global CPU generator) the draws are
ordinary tensor ops and compile with ``fullgraph=True``; torch.compile cannot trace a
``torch.Generator`` object, so with one the draws run eagerly (one graph break; fullgraph=True
then fails). Inductor draws with its own random numbers unless
``torch._inductor.config.fallback_random = True``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from mpl_fast.augment.policies import get_policy
from mpl_fast.ops import CUTOUT, OP_INDEX, AugmentPlan, KernelCode, box_params, plan_to_kernel_args


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


def check_sampling_args(num_ops, magnitude, num_magnitude_bins, policy_name: str) -> None:
    """ValueError naming the argument for anything rand_augment cannot draw from."""
    policy = get_policy(policy_name)
    if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
        raise ValueError(f"mpl_fast: `num_ops` must be a non-negative int, got {num_ops!r}")
    if isinstance(num_magnitude_bins, bool) or not isinstance(num_magnitude_bins, int) or num_magnitude_bins < 2:
        raise ValueError(f"mpl_fast: `num_magnitude_bins` must be an int >= 2, got {num_magnitude_bins!r}")
    if isinstance(magnitude, bool) or not isinstance(magnitude, (int, float)) or not math.isfinite(magnitude) \
            or magnitude < 0:
        raise ValueError(f"mpl_fast: `magnitude` must be a finite non-negative number, got {magnitude!r}")
    if policy.needs_integer_magnitude and (int(magnitude) != magnitude or magnitude >= num_magnitude_bins):
        raise ValueError(f"mpl_fast: `magnitude` must be a bin index in [0, {num_magnitude_bins - 1}] for "
                         f"policy {policy.name!r}, got {magnitude!r}")


_ENTRIES: dict = {}


@torch.compiler.assume_constant_result  # host-side numbers: constants to a compiled graph
def _table_entries(policy_name: str, magnitude: float, num_bins: int, height: int, width: int):
    """The policy's table as Python tuples (op index, magnitude, signed), computed once."""
    key = (policy_name, magnitude, num_bins, height, width)
    if key not in _ENTRIES:
        if len(_ENTRIES) >= 64:  # a bound, as for _PAIR_TABLES: sizes vary in some pipelines
            _ENTRIES.clear()
        table = get_policy(policy_name).table(magnitude, num_bins, height, width)
        _ENTRIES[key] = (tuple(CUTOUT if name == "Cutout" else OP_INDEX[name] for name, _, _ in table),
                         tuple(float(value) for _, value, _ in table), tuple(bool(s) for _, _, s in table))
    return _ENTRIES[key]


def _pair_tables(ids: tuple, mags: tuple, signed: tuple, height: int, width: int):
    """Tensors of the table, plus the kernel arguments of each (entry, sign) pair: policies
    have few distinct (op, magnitude) pairs, so their parameters are computed once per table
    and gathered per image. Row 2 * entry + negated, and a last row for Identity (a skipped step)."""
    ids_t = torch.tensor(ids, dtype=torch.int64)
    mags_t = torch.tensor(mags, dtype=torch.float64)
    signed_t = torch.tensor(signed, dtype=torch.bool)
    pair_ids = torch.cat([ids_t.repeat_interleave(2), torch.tensor([OP_INDEX["Identity"]])])
    pair_mags = torch.cat([torch.stack([mags_t, -mags_t], dim=1).reshape(-1), torch.zeros(1, dtype=torch.float64)])
    pair_plan = AugmentPlan(pair_ids.view(-1, 1), pair_mags.view(-1, 1),
                            torch.zeros(pair_ids.shape[0], 1, 4, dtype=torch.float64))
    codes, params = plan_to_kernel_args(pair_plan, height, width)
    return ids_t, mags_t, signed_t, codes.view(-1), params.view(-1, params.shape[-1])


_PAIR_TABLES: dict = {}


def _tables(policy_name: str, magnitude: float, num_bins: int, height: int, width: int):
    entries = _table_entries(policy_name, magnitude, num_bins, height, width)
    if torch.compiler.is_compiling():  # a few small ops in the graph
        return _pair_tables(*entries, height, width)
    key = (policy_name, magnitude, num_bins, height, width)
    if key not in _PAIR_TABLES:
        if len(_PAIR_TABLES) >= 64:
            _PAIR_TABLES.clear()
        _PAIR_TABLES[key] = _pair_tables(*entries, height, width)
    return _PAIR_TABLES[key]


class SampledAugment(NamedTuple):
    """A drawn plan, with the kernel's codes (N, K) and params (N, K, 6) for it."""

    plan: AugmentPlan
    codes: torch.Tensor
    params: torch.Tensor
    fill: int


def sample_plan(shape, num_ops: int, magnitude: float, num_magnitude_bins: int, policy_name: str,
                generator: Optional[torch.Generator], final_cutout: int = 0) -> SampledAugment:
    """Draws a plan for a batch of ``shape`` (N, C, H, W), with its kernel arguments."""
    if generator is not None and torch.compiler.is_compiling():
        return _sample_plan_eagerly(shape, num_ops, magnitude, num_magnitude_bins, policy_name, generator,
                                    final_cutout)
    return _sample_plan(shape, num_ops, magnitude, num_magnitude_bins, policy_name, generator, final_cutout)


def _sample_plan(shape, num_ops, magnitude, num_magnitude_bins, policy_name, generator, final_cutout):
    check_sampling_args(num_ops, magnitude, num_magnitude_bins, policy_name)
    policy = get_policy(policy_name)
    n, _, height, width = shape
    height, width = int(height), int(width)  # the tables depend on them: specialised under compile
    ids, table_mags, table_signed, pair_codes, pair_params = _tables(
        policy_name, float(magnitude), num_magnitude_bins, height, width)
    skip_row = pair_codes.shape[0] - 1

    choice = torch.randint(ids.shape[0], (n, num_ops), generator=generator)
    negate = torch.randint(2, (n, num_ops), generator=generator).bool() & table_signed[choice]
    pair = 2 * choice + negate.long()
    if policy.apply_probability is not None:
        lo, hi = policy.apply_probability
        p = lo + (hi - lo) * torch.rand(n, 1, generator=generator, dtype=torch.float64)
        skipped = torch.rand(n, num_ops, generator=generator, dtype=torch.float64) > p
        pair = torch.where(skipped, skip_row, pair)
    op_ids = torch.where(pair == skip_row, OP_INDEX["Identity"], ids[choice])
    signed_mags = torch.where(negate, -table_mags[choice], table_mags[choice])
    mags = torch.where(op_ids == OP_INDEX["Identity"], 0.0, signed_mags)
    is_cutout = op_ids == CUTOUT
    boxes = cutout_boxes(n, num_ops, height, width, torch.where(is_cutout, mags, 0.0), generator)
    mags = torch.where(is_cutout, 0.0, mags)
    codes, params = pair_codes[pair], pair_params[pair]
    params = torch.where(is_cutout.unsqueeze(-1), box_params(boxes), params)
    if final_cutout > 0:
        sizes = torch.full((n, 1), float(final_cutout), dtype=torch.float64)
        final_boxes = cutout_boxes(n, 1, height, width, sizes, generator)
        op_ids = torch.cat([op_ids, torch.full((n, 1), CUTOUT)], dim=1)
        mags = torch.cat([mags, torch.zeros(n, 1, dtype=torch.float64)], dim=1)
        boxes = torch.cat([boxes, final_boxes], dim=1)
        codes = torch.cat([codes, torch.full((n, 1), int(KernelCode.CUTOUT), dtype=codes.dtype)], 1)
        params = torch.cat([params, box_params(final_boxes)], dim=1)
    return SampledAugment(AugmentPlan(op_ids, mags, boxes), codes.contiguous(), params.contiguous(), policy.fill)


# torch.compile cannot trace a torch.Generator argument: with one, the draws run eagerly.
_sample_plan_eagerly = torch.compiler.disable(_sample_plan)
