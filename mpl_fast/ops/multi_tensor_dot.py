"""``multi_tensor_dot``: sum_i <xs[i], ys[i]> over whole lists of tensors, as one 0-dim fp32
tensor on the inputs' device. It is the teacher feedback h = lr_S * <g_l', g_u> of MPL."""

from __future__ import annotations

from typing import Sequence

import torch

from mpl_fast.ops import _extension


def _check_lists(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"mpl_fast.multi_tensor_dot: `xs` has {len(xs)} tensors but `ys` has {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.shape != y.shape:
            raise ValueError(f"mpl_fast.multi_tensor_dot: `ys[{i}]` must have the shape of `xs[{i}]` "
                             f"{tuple(x.shape)}, got {tuple(y.shape)}")
        for name, t in (("xs", x), ("ys", y)):
            if not t.is_floating_point():
                raise ValueError(f"mpl_fast.multi_tensor_dot: `{name}[{i}]` must be floating point, got {t.dtype}")
        if x.device != y.device or x.device != xs[0].device:
            raise ValueError(f"mpl_fast.multi_tensor_dot: `xs[{i}]` ({x.device}) and `ys[{i}]` ({y.device}) "
                             f"must be on the device of `xs[0]` ({xs[0].device})")


def multi_tensor_dot_reference(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """The specification: products in fp32 (fp64 stays fp64 until the end), summed, fp32 result."""
    _check_lists(xs, ys)
    if len(xs) == 0:
        return torch.zeros((), dtype=torch.float32)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (*xs, *ys)) else torch.float32
    total = torch.zeros((), dtype=acc, device=xs[0].device)
    for x, y in zip(xs, ys):
        total = total + torch.sum(x.reshape(-1).to(acc) * y.reshape(-1).to(acc))
    return total.to(torch.float32)


def multi_tensor_dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """Returns sum over i of dot(xs[i].flatten(), ys[i].flatten()) as a 0-dim fp32 tensor."""
    xs, ys = list(xs), list(ys)
    if xs and _extension.use_kernel(xs[0].device) and hasattr(torch.ops.mpl_fast, "multi_tensor_dot"):
        return torch.ops.mpl_fast.multi_tensor_dot.default(xs, ys)
    return multi_tensor_dot_reference(xs, ys)
