"""``scaled_add``: out = x + alpha * y. A deliberately tiny op that proves the whole path
(C++ schema, CPU and CUDA kernels, fake kernel, Python reference) before the real ops."""

from __future__ import annotations

import torch

from mpl_fast.ops import extension


def scaled_add_reference(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """The specification: computed in fp32 (or fp64 for fp64 inputs), cast back."""
    acc = torch.promote_types(x.dtype, torch.float32)
    return (x.to(acc) + alpha * y.to(acc)).to(x.dtype)


def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Returns ``x + alpha * y`` (same shape and dtype as ``x``)."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError("mpl_fast.ops.scaled_add: `x` and `y` must be tensors")
    if extension.use_kernel(x.device):
        return torch.ops.mpl_fast.scaled_add.default(x, y, float(alpha))
    if x.shape != y.shape:
        raise ValueError(f"mpl_fast: `y` must have the shape of `x` {tuple(x.shape)}, got {tuple(y.shape)}")
    return scaled_add_reference(x, y, alpha)


@extension.register_fake("scaled_add")
def _scaled_add_fake(x, y, alpha):
    torch._check(x.shape == y.shape, lambda: f"`y` must have the shape of `x` {x.shape}, got {y.shape}")
    torch._check(x.dtype == y.dtype, lambda: "`y` must have the dtype of `x`")
    return torch.empty_like(x, memory_format=torch.contiguous_format)
