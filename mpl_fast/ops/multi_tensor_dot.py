"""``multi_tensor_dot``: sum_i <xs[i], ys[i]> over whole lists of tensors, as one 0-dim fp32
tensor on the inputs' device. It is the teacher feedback h = lr_S * <g_l', g_u> of MPL.

Contract (kernels and reference alike):

- products accumulated in fp32 (fp64 when a pair holds an fp64 tensor), whatever the input
  dtypes; a pair may mix float32/float16/bfloat16/float64;
- deterministic: fixed-size chunks, each reduced into its own partial, partials summed in order,
  so the same inputs give the same bits on every run, whatever the thread count;
- no host synchronisation; the result stays on the device;
- ``found_inf`` (optional, a one-element float32 tensor on the inputs' device) is set to 1 when
  the result is non-finite and never cleared. A non-finite input always makes the sum non-finite
  (inf*0 and inf-inf are nan), so every inf/nan input is reported; an fp32 overflow of finite
  values is reported too;
- non-contiguous inputs are read correctly: a pair whose two tensors are dense with the same
  strides (contiguous, channels_last, ...) is read in place, any other pair through a contiguous
  temporary copy.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from mpl_fast.ops import extension

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_flag(flag: Optional[torch.Tensor], name: str, device: torch.device, op: str) -> None:
    if flag is None:
        return
    if flag.dtype != torch.float32 or flag.numel() != 1:
        raise ValueError(f"mpl_fast.{op}: `{name}` must be a float32 tensor with one element, "
                         f"got {flag.dtype} with {flag.numel()} elements")
    if flag.device != device:
        raise ValueError(f"mpl_fast.{op}: `{name}` is on {flag.device} but the tensors are on {device}")


def _check_lists(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor],
                 found_inf: Optional[torch.Tensor] = None) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"mpl_fast.multi_tensor_dot: `xs` has {len(xs)} tensors but `ys` has {len(ys)}")
    for i, (x, y) in enumerate(zip(xs, ys)):
        for name, t in (("xs", x), ("ys", y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"mpl_fast.multi_tensor_dot: `{name}[{i}]` must be a tensor, got {type(t).__name__}")
            if t.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"mpl_fast.multi_tensor_dot: `{name}[{i}]` must be float32, float64, "
                                 f"float16 or bfloat16, got {t.dtype}")
        if x.shape != y.shape:
            raise ValueError(f"mpl_fast.multi_tensor_dot: `ys[{i}]` must have the shape of `xs[{i}]` "
                             f"{tuple(x.shape)}, got {tuple(y.shape)}")
        if x.device != y.device or x.device != xs[0].device:
            raise ValueError(f"mpl_fast.multi_tensor_dot: `xs[{i}]` ({x.device}) and `ys[{i}]` ({y.device}) "
                             f"must be on the device of `xs[0]` ({xs[0].device})")
    if xs:
        _check_flag(found_inf, "found_inf", xs[0].device, "multi_tensor_dot")


def multi_tensor_dot_reference(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
                               found_inf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The specification: products in fp32 (fp64 stays fp64 until the end), summed, fp32 result.

    Sets ``found_inf`` (when given) to 1 if the result is non-finite; never clears it.
    """
    _check_lists(xs, ys, found_inf)
    if len(xs) == 0:
        device = found_inf.device if found_inf is not None else None
        return torch.zeros((), dtype=torch.float32, device=device)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (*xs, *ys)) else torch.float32
    total = torch.zeros((), dtype=acc, device=xs[0].device)
    for x, y in zip(xs, ys):
        total = total + torch.sum(x.reshape(-1).to(acc) * y.reshape(-1).to(acc))
    result = total.to(torch.float32)
    if found_inf is not None:
        found_inf.masked_fill_(~torch.isfinite(result), 1.0)
    return result


def multi_tensor_dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
                     found_inf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Returns sum over i of dot(xs[i].flatten(), ys[i].flatten()) as a 0-dim fp32 tensor.

    Args:
        xs, ys: equally long lists of floating-point tensors, ``ys[i]`` of the shape of ``xs[i]``,
            all on one device. Dtypes may differ within a pair (e.g. fp32 x bf16).
        found_inf: optional one-element float32 tensor on that device, set to 1 when the result
            is non-finite (any inf/nan input, or an fp32 overflow) and never cleared, so one flag
            can collect several checks (e.g. a GradScaler's ``found_inf``).

    Returns a 0-dim float32 tensor on the inputs' device (the CPU, or ``found_inf``'s device,
    for empty lists) without synchronising the host. Raises ValueError naming the argument and
    index for lists of different lengths, shape or device mismatches and non-float dtypes.
    """
    xs, ys = list(xs), list(ys)
    if xs and len(xs) == len(ys) and isinstance(xs[0], torch.Tensor) and extension.use_kernel(xs[0].device):
        try:
            if found_inf is None:
                return torch.ops.mpl_fast.multi_tensor_dot.default(xs, ys)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (*xs, *ys)):
                # The flag overload writes in place, so autograd cannot be registered for it:
                # the differentiable overload, then the flag from its result (the same rule).
                out = torch.ops.mpl_fast.multi_tensor_dot.default(xs, ys)
                found_inf.masked_fill_(~torch.isfinite(out.detach()), 1.0)
                return out
            return torch.ops.mpl_fast.multi_tensor_dot.found_inf(xs, ys, found_inf)
        except RuntimeError as exc:
            # The op's argument parser names the list but not the element (e.g. a None gradient):
            # re-check in Python, at no cost to the calls that succeed, to name the index.
            if "Expected a value of type" in str(exc):
                _check_lists(xs, ys, found_inf)
            raise
    return multi_tensor_dot_reference(xs, ys, found_inf=found_inf)


def _check_devices_and_dtypes(xs, ys, found_inf) -> None:
    """The fake kernel's share of the checks (devices, dtypes: static even under tracing)."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        for name, t in (("xs", x), ("ys", y)):
            if t.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"mpl_fast.multi_tensor_dot: `{name}[{i}]` must be float32, float64, "
                                 f"float16 or bfloat16, got {t.dtype}")
            if t.device != xs[0].device:
                raise ValueError(f"mpl_fast.multi_tensor_dot: `{name}[{i}]` is on {t.device} but `xs[0]` "
                                 f"is on {xs[0].device}")
    if xs:
        _check_flag(found_inf, "found_inf", xs[0].device, "multi_tensor_dot")


def _multi_tensor_dot_fake(xs, ys, found_inf=None):
    torch._check(len(xs) == len(ys), lambda: f"`xs` has {len(xs)} tensors but `ys` has {len(ys)}")
    torch._check(len(xs) > 0, lambda: "`xs` and `ys` are empty")
    _check_devices_and_dtypes(xs, ys, found_inf)
    for i, (x, y) in enumerate(zip(xs, ys)):
        torch._check(x.shape == y.shape,
                     lambda: f"`ys[{i}]` must have the shape of `xs[{i}]` {x.shape}, got {y.shape}")
    return xs[0].new_empty((), dtype=torch.float32)


extension.register_fake("multi_tensor_dot")(_multi_tensor_dot_fake)
extension.register_fake("multi_tensor_dot.found_inf")(_multi_tensor_dot_fake)


# Autograd of the kernel (the reference gets the same from torch's own ops): the sum of dots
# is linear in each list, so d/dxs[i] = g * ys[i] and d/dys[i] = g * xs[i], each in its
# tensor's dtype. found_inf is a flag, not differentiable.
def _dot_setup_context(ctx, inputs, output) -> None:
    xs, ys = inputs[0], inputs[1]
    ctx.save_for_backward(*xs, *ys)
    ctx.n = len(xs)


def _dot_backward(ctx, grad):
    saved = ctx.saved_tensors
    xs, ys = saved[:ctx.n], saved[ctx.n:]
    need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_xs = [(grad * y).to(x.dtype) for x, y in zip(xs, ys)] if need_x else None
    grad_ys = [(grad * x).to(y.dtype) for x, y in zip(xs, ys)] if need_y else None
    return (grad_xs, grad_ys) + (None,) * (len(ctx.needs_input_grad) - 2)


extension.register_autograd("multi_tensor_dot", _dot_backward, _dot_setup_context)
