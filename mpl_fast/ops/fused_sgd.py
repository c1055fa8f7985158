"""``fused_sgd_``: torch.optim.SGD's step over whole lists of parameters in one pass.

Each parameter, gradient and momentum buffer is read once; the parameter, the buffer and
(when asked) the applied update are written in the same pass. Per element, in fp32 (fp64 for
fp64 parameters), exactly torch.optim.SGD's order of operations::

    d   = -g if maximize else g
    d   = d + weight_decay * p
    buf = d if first_step else momentum * buf + (1 - dampening) * d     (momentum != 0 only)
    d   = d + momentum * buf if nesterov else buf                       (momentum != 0 only)
    p   = p - lr * d

What is written where:

- ``update_out[i]`` (optional) receives Δθ = θ_new − θ_old, the difference between the value
  actually stored in ``params[i]`` and the old one, computed in fp32 and rounded to the
  parameter's dtype (it must have the parameter's dtype and layout). It is zero for a skipped step.
- ``momentum_buffers``: one per parameter when momentum != 0 (else empty). "Not initialised
  yet" is expressed without any host sync: pass ``first_step=True`` (buf = d, as torch does on
  its first step) or, equivalently for dampening 0, buffers full of zeros (momentum * 0 + d = d).
  FusedSGD creates zero buffers and passes first_step on its first step, so a first step skipped
  by ``found_inf`` leaves zeros behind and the next step is still exact (for dampening 0).
- ``found_inf`` (input, optional one-element float32 tensor on the parameters' device): when
  non-zero the whole step is a no-op on the device (params and buffers untouched,
  ``update_out`` zeroed) — pass a GradScaler's or ``multi_tensor_dot``'s flag here.
- ``found_inf_out`` (output, optional): set to 1 when any gradient or any new parameter value is
  inf/nan (so a non-finite parameter, momentum buffer or lr, or an overflow, is reported too),
  never cleared. The step itself still runs: a flag cannot be both detected and acted on in the same pass
  (blocks that already wrote would not see the others' findings), so detecting and skipping are
  two calls. ``found_inf`` and ``found_inf_out`` must therefore be different tensors.

``lr`` is a float or a one-element tensor (on the parameters' device or the CPU), so a
scheduler can change it without recompiling a graph or syncing.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from mpl_fast.ops import extension
from mpl_fast.ops.multi_tensor_dot import _FLOAT_DTYPES, _check_flag

_OP = "fused_sgd_"


def _err(msg: str) -> ValueError:
    return ValueError(f"mpl_fast.{_OP}: {msg}")


def is_dense(t: torch.Tensor) -> bool:
    """The elements fill one block of memory with no gaps and no overlap, in any dimension
    order: what the kernel updates in place."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_strides(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Strides equal wherever they matter (a dimension of size 1 never moves through memory)."""
    return a.dim() == b.dim() and all(s == 1 or x == y for s, x, y in zip(a.shape, a.stride(), b.stride()))


def _check_args(params, grads, bufs, updates, lr, momentum, dampening, nesterov,
                found_inf, found_inf_out) -> None:
    n = len(params)
    if len(grads) != n:
        raise _err(f"`grads` has {len(grads)} tensors but `params` has {n}")
    if momentum != 0 and len(bufs) != n:
        raise _err(f"momentum is {momentum} so `momentum_buffers` needs one tensor per parameter "
                   f"({n}), got {len(bufs)}")
    if momentum == 0 and bufs:
        raise _err(f"momentum is 0 so `momentum_buffers` must be empty, got {len(bufs)} tensors")
    if updates and len(updates) != n:
        raise _err(f"`update_out` has {len(updates)} tensors but `params` has {n} (pass None for none)")
    if not isinstance(lr, torch.Tensor) and lr < 0:
        raise _err(f"`lr` must be >= 0, got {lr}")
    if momentum < 0:
        raise _err(f"`momentum` must be >= 0, got {momentum}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise _err(f"`nesterov` needs momentum > 0 and dampening == 0, got momentum {momentum} "
                   f"and dampening {dampening}")
    if n == 0:
        return
    device = params[0].device
    _check_flag(found_inf, "found_inf", device, _OP)
    _check_flag(found_inf_out, "found_inf_out", device, _OP)
    if found_inf is not None and found_inf_out is not None and found_inf.data_ptr() == found_inf_out.data_ptr():
        raise _err("`found_inf` and `found_inf_out` must be different tensors: a flag cannot be "
                   "both detected and acted on in one pass")
    lists = [("grads", grads)] + ([("momentum_buffers", bufs)] if momentum != 0 else []) + \
            ([("update_out", updates)] if updates else [])
    for name, ts in (("params", params), ("grads", grads), ("momentum_buffers", bufs), ("update_out", updates)):
        for i, t in enumerate(ts):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"mpl_fast.{_OP}: `{name}[{i}]` must be a tensor, got {type(t).__name__}")
    for i, p in enumerate(params):
        if p.dtype not in _FLOAT_DTYPES:
            raise _err(f"`params[{i}]` must be float32, float64, float16 or bfloat16, got {p.dtype}")
        if p.device != device:
            raise _err(f"`params[{i}]` is on {p.device} but `params[0]` is on {device}")
        for name, ts in lists:
            t = ts[i]
            if t.shape != p.shape:
                raise _err(f"`{name}[{i}]` must have the shape of `params[{i}]` {tuple(p.shape)}, got {tuple(t.shape)}")
            if t.dtype != p.dtype:
                raise _err(f"`{name}[{i}]` must have the dtype of `params[{i}]` ({p.dtype}), got {t.dtype}")
            if t.device != device:
                raise _err(f"`{name}[{i}]` is on {t.device} but the first tensor of the lists is on {device}")
        # The kernel's layout rules, so that both backends accept the same calls.
        if not is_dense(p):
            raise _err(f"`params[{i}]` must be non-overlapping and dense (it is updated in place), got strides "
                       f"{p.stride()}")
        for name, ts in lists[1:]:
            if not _same_strides(ts[i], p):
                raise _err(f"`{name}[{i}]` must have the dtype ({p.dtype}) and strides {p.stride()} of "
                           f"`params[{i}]`, got {ts[i].dtype} with strides {ts[i].stride()}")


def _check_not_autograd_leaves(params, bufs, updates) -> None:
    """torch's in-place ops refuse to write a leaf that requires grad while autograd records:
    the op writes in place, so it refuses the same (optimizers step under torch.no_grad())."""
    if not torch.is_grad_enabled():
        return
    for name, ts in (("params", params), ("momentum_buffers", bufs), ("update_out", updates)):
        for i, t in enumerate(ts):
            if isinstance(t, torch.Tensor) and t.requires_grad and t.is_leaf:
                raise RuntimeError(f"mpl_fast.{_OP}: `{name}[{i}]` is a leaf tensor that requires grad, which an "
                                   "in-place op may not write while autograd records; call it under "
                                   "torch.no_grad() (as optimizers do)")


def fused_sgd_reference_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         momentum_buffers: Optional[Sequence[torch.Tensor]] = None, *,
                         lr: Union[float, torch.Tensor], momentum: float = 0.0, dampening: float = 0.0,
                         weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                         first_step: bool = False, update_out: Optional[Sequence[torch.Tensor]] = None,
                         found_inf: Optional[torch.Tensor] = None,
                         found_inf_out: Optional[torch.Tensor] = None) -> None:
    """The specification of :func:`fused_sgd_`, one tensor at a time in plain PyTorch (no sync)."""
    params, grads = list(params), list(grads)
    bufs = list(momentum_buffers or [])
    updates = list(update_out or [])
    _check_args(params, grads, bufs, updates, lr, momentum, dampening, nesterov, found_inf, found_inf_out)
    _check_not_autograd_leaves(params, bufs, updates)
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, p in enumerate(params):
        acc = torch.promote_types(p.dtype, torch.float32)
        p_old = p.detach().to(acc)
        g = grads[i].to(acc)
        d = -g if maximize else g
        if weight_decay != 0:
            d = d + weight_decay * p_old
        if momentum != 0:
            buf = d if first_step else momentum * bufs[i].to(acc) + (1 - dampening) * d
            d = d + momentum * buf if nesterov else buf
            buf = buf.to(p.dtype)
            bufs[i].copy_(buf if skip is None else torch.where(skip, bufs[i], buf))
        lr_acc = lr.to(device=p.device, dtype=acc).reshape(()) if isinstance(lr, torch.Tensor) else lr
        p_new = (p_old - lr_acc * d).to(p.dtype)
        if skip is not None:
            p_new = torch.where(skip, p.detach(), p_new)
        if updates:
            updates[i].copy_((p_new.to(acc) - p_old).to(p.dtype))
        if found_inf_out is not None:
            finite = torch.isfinite(grads[i]).all() & torch.isfinite(p_new).all()
            found_inf_out.masked_fill_(~finite, 1.0)
        with torch.no_grad():
            p.copy_(p_new)


def fused_sgd_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
               momentum_buffers: Optional[Sequence[torch.Tensor]] = None, *,
               lr: Union[float, torch.Tensor], momentum: float = 0.0, dampening: float = 0.0,
               weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
               first_step: bool = False, update_out: Optional[Sequence[torch.Tensor]] = None,
               found_inf: Optional[torch.Tensor] = None,
               found_inf_out: Optional[torch.Tensor] = None) -> None:
    """One torch.optim.SGD step over lists of tensors, in place, in one pass (see the module doc).

    Args:
        params: parameters, updated in place (non-overlapping and dense; any float dtype).
        grads: one gradient per parameter, same shape and dtype.
        momentum_buffers: one buffer per parameter when ``momentum != 0`` (same dtype and layout
            as the parameter), else None or empty; updated in place.
        lr: learning rate, a float or a one-element tensor (device or CPU).
        momentum, dampening, weight_decay, nesterov, maximize: as in torch.optim.SGD.
        first_step: the buffers hold nothing yet (torch's ``buf = d`` on its first step).
        update_out: optional list receiving Δθ = θ_new − θ_old per parameter.
        found_inf: optional flag; when non-zero the step is a no-op (update_out zeroed).
        found_inf_out: optional flag set to 1 when any gradient or new parameter is non-finite.
    """
    params, grads = list(params), list(grads)
    bufs = list(momentum_buffers or [])
    updates = list(update_out or [])
    _check_not_autograd_leaves(params, bufs, updates)
    if params and isinstance(params[0], torch.Tensor) and extension.use_kernel(params[0].device):
        lr_value, lr_tensor = (0.0, lr) if isinstance(lr, torch.Tensor) else (float(lr), None)
        try:
            torch.ops.mpl_fast.fused_sgd_.default(
                params, grads, bufs, updates, lr=lr_value, lr_tensor=lr_tensor, momentum=float(momentum),
                dampening=float(dampening), weight_decay=float(weight_decay), nesterov=bool(nesterov),
                maximize=bool(maximize), first_step=bool(first_step), found_inf=found_inf,
                found_inf_out=found_inf_out)
        except RuntimeError as exc:
            # The op's argument parser names the list but not the element (e.g. a None gradient):
            # re-check in Python, at no cost to the calls that succeed, to name the index.
            if "Expected a value of type" in str(exc):
                _check_args(params, grads, bufs, updates, lr, momentum, dampening, nesterov,
                            found_inf, found_inf_out)
            raise
        return
    fused_sgd_reference_(params, grads, bufs, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         first_step=first_step, update_out=updates, found_inf=found_inf,
                         found_inf_out=found_inf_out)


@extension.register_fake(_OP)
def _fused_sgd_fake(params, grads, momentum_buffers, update_out, *, lr, lr_tensor=None, momentum=0.0,
                    dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False, first_step=False,
                    found_inf=None, found_inf_out=None):
    n = len(params)
    torch._check(len(grads) == n, lambda: f"`grads` has {len(grads)} tensors but `params` has {n}")
    torch._check(momentum == 0 or len(momentum_buffers) == n,
                 lambda: f"`momentum_buffers` needs one tensor per parameter ({n})")
    torch._check(len(update_out) in (0, n), lambda: f"`update_out` needs one tensor per parameter ({n})")
    for i, p in enumerate(params):
        torch._check(grads[i].shape == p.shape,
                     lambda: f"`grads[{i}]` must have the shape of `params[{i}]` {p.shape}, got {grads[i].shape}")
    return None
