"""``FusedSGD``: a drop-in torch.optim.SGD whose step is one ``mpl_fast.ops.fused_sgd_`` pass.

Same constructor arguments, param groups and state (``state[p]["momentum_buffer"]``) as
torch.optim.SGD, so state dicts load in both directions. Two additions for MPL and AMP:

- ``keep_update=True``: after each step, ``state[p]["last_update"]`` (or
  :meth:`FusedSGD.last_updates`) holds the applied update Δθ = θ_new − θ_old of every parameter
  (zero for a parameter that had no gradient or a skipped step), for code that needs the
  update a step really applied (momentum and weight decay included). It is written by the same
  fused pass (no extra kernel) and is left out of ``state_dict()`` (it is recomputed by the next
  step). The trainer does not use it: its ``update-dot`` feedback takes Δθ from its own copy of
  θ before the step, and the step never modifies ``p.grad``.
- ``step(found_inf=flag)``: a one-element float32 device tensor; when it is non-zero the step
  is a no-op on the device (no host sync), e.g. a flag filled by ``multi_tensor_dot`` or by
  ``torch._amp_foreach_non_finite_check_and_unscale_``. Momentum buffers are created as zeros,
  so a skipped first step leaves them equivalent to "not initialised" (exact for dampening 0).

Anything torch.optim.SGD steps, this steps: sparse gradients (as their dense equivalent),
non-dense parameters (through a dense copy), layouts changed after steps (buffers follow the
parameter's strides). Every parameter is checked before any tensor is written.

With AMP, ``scaler.step(opt)`` works as for any optimizer (GradScaler then reads its inf flag
on the host once). The sync-free sequence (tested in tests/ops/test_fused_sgd.py)::

    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    found_inf = sum(scaler._found_inf_per_device(opt).values())  # device tensor, no sync
    opt.step(found_inf=found_inf)
    scaler.update()

(``_found_inf_per_device`` is GradScaler's own, private, accessor of the flags ``unscale_`` filled.)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Optional

import torch

from mpl_fast.ops.fused_sgd import fused_sgd_, is_dense
from mpl_fast.shards import local


class FusedSGD(torch.optim.Optimizer):
    """torch.optim.SGD (momentum, dampening, weight decay, Nesterov, maximize) in one fused pass.

    ``foreach`` and ``fused`` are accepted for signature compatibility and ignored (the step is
    always fused); ``differentiable=True`` is refused. See the module docstring for
    ``keep_update`` and ``found_inf``.
    """

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0,
                 dampening: float = 0, weight_decay: float = 0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, differentiable: bool = False,
                 fused: Optional[bool] = None, keep_update: bool = False) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise RuntimeError("FusedSGD does not support differentiable=True (use torch.optim.SGD)")
        # The very keys of torch.optim.SGD's defaults, so param groups round-trip between the two.
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
                    "foreach": foreach, "differentiable": differentiable, "fused": fused}
        super().__init__(params, defaults)
        self.keep_update = keep_update

    def __getstate__(self):
        # torch.optim.Optimizer pickles only defaults, state and param_groups: keep our flag too
        # (copy.deepcopy and pickle of a FusedSGD would otherwise lose it).
        return {**super().__getstate__(), "keep_update": self.keep_update}

    def __setstate__(self, state):
        # load_state_dict() calls this with torch's two keys only: keep the flag this object has.
        state.setdefault("keep_update", getattr(self, "keep_update", False))
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def last_updates(self, params: Optional[Iterable[torch.Tensor]] = None) -> list[Optional[torch.Tensor]]:
        """Δθ of the last step for ``params`` (default: every parameter, in group order);
        zero for a parameter without a gradient in that step, None before the first step.
        Needs ``keep_update=True``."""
        if not self.keep_update:
            raise RuntimeError("FusedSGD.last_updates needs FusedSGD(..., keep_update=True)")
        if params is None:
            params = [p for group in self.param_groups for p in group["params"]]
        return [self.state[p].get("last_update") if p in self.state else None for p in params]

    def state_dict(self) -> dict:
        """As torch's, without ``last_update`` (scratch for the feedback, recomputed by the next
        step). A method rather than a hook: hooks are not copied by deepcopy, pickle or torch.save."""
        return _drop_last_update(super().state_dict())

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None, *,
             found_inf: Optional[torch.Tensor] = None):
        """One SGD step over every parameter with a gradient (skipped on device if ``found_inf``).

        Every parameter is checked before any tensor is written, so a refused step leaves the
        parameters and the state as they were."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g, group in enumerate(self.param_groups):
            for i, p in enumerate(group["params"]):
                _check_param(p, f"param_groups[{g}]['params'][{i}]")
        for group in self.param_groups:
            self._step_group(group, found_inf)
        return loss

    def _step_group(self, group: dict, found_inf: Optional[torch.Tensor]) -> None:
        momentum = group["momentum"]
        # One fused call per (device, first step or not): the kernel handles mixed dtypes.
        batches: dict = defaultdict(lambda: ([], [], [], []))
        write_back = []  # (parameter, its dense working copy) for non-dense parameters
        for p in group["params"]:
            # Like torch.optim.SGD, touch self.state only for what is stored (an empty entry
            # would show up in state_dict()).
            state = self.state[p] if (momentum != 0 and p.grad is not None) or self.keep_update else {}
            if p.grad is None:  # the parameter does not move: Δθ = 0
                if self.keep_update:
                    if "last_update" in state:
                        state["last_update"].zero_()
                    else:
                        state["last_update"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                continue
            # The kernel walks a parameter, its buffers and Δθ in one memory order: a non-dense
            # parameter steps through a dense copy, written back after the pass.
            work = local(p)
            if not is_dense(work):
                work = work.contiguous()
                write_back.append((local(p), work))
            # A sparse gradient (nn.Embedding(sparse=True)) steps as its dense equivalent: SGD
            # with the zeros made explicit is the same arithmetic torch.optim.SGD does.
            grad = local(p.grad).to_dense() if p.grad.is_sparse else local(p.grad)
            first = False
            if momentum != 0:
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    first = True
                state["momentum_buffer"] = _in_layout_of(work, state["momentum_buffer"])
            params, grads, bufs, updates = batches[(p.device, first)]
            # FSDP2 (--fsdp): parameters, gradients and buffers are DTensors; the fused pass
            # updates this rank's shards in place (local() is a view; a plain tensor as is).
            params.append(work)
            grads.append(grad)
            if momentum != 0:
                bufs.append(local(state["momentum_buffer"]))
            if self.keep_update:
                if "last_update" not in state:
                    state["last_update"] = torch.empty_like(p, memory_format=torch.preserve_format)
                state["last_update"] = _in_layout_of(work, state["last_update"])
                updates.append(local(state["last_update"]))
        for (device, first), (params, grads, bufs, updates) in batches.items():
            flag = found_inf
            if flag is not None and flag.device != device:
                flag = flag.to(device, non_blocking=True)
            fused_sgd_(params, grads, bufs, lr=group["lr"], momentum=momentum,
                       dampening=group["dampening"], weight_decay=group["weight_decay"],
                       nesterov=group["nesterov"], maximize=group["maximize"], first_step=first,
                       update_out=updates or None, found_inf=flag)
        for p, work in write_back:
            p.copy_(work)


def _check_param(p: torch.Tensor, where: str) -> None:
    """Refuses what torch.optim.SGD cannot step either, naming the parameter."""
    if p.grad is None:
        return
    if torch._debug_has_internal_overlap(local(p)) == 1:
        raise ValueError(f"FusedSGD: {where} overlaps itself in memory (an expanded view), so an in-place "
                         "update is undefined; torch.optim.SGD refuses it too. Pass a parameter that owns "
                         "its elements (e.g. .clone()).")
    if p.grad.shape != p.shape:
        raise ValueError(f"FusedSGD: {where} has shape {tuple(p.shape)} but its .grad has shape "
                         f"{tuple(p.grad.shape)}")


def _in_layout_of(work: torch.Tensor, state_tensor: torch.Tensor) -> torch.Tensor:
    """``state_tensor`` with the strides of ``work``: a copy only after a layout change, e.g.
    ``model.to(memory_format=torch.channels_last)`` once buffers exist (a DTensor is kept)."""
    if local(state_tensor) is not state_tensor or state_tensor.stride() == work.stride():
        return state_tensor
    return torch.empty_like(work).copy_(state_tensor)


def _drop_last_update(state_dict: dict) -> dict:
    """Δθ is scratch for the feedback, not optimizer state worth saving."""
    # The packed per-parameter dicts are the live state objects: copy, never pop from them.
    state_dict["state"] = {key: {name: value for name, value in param_state.items() if name != "last_update"}
                           for key, param_state in state_dict["state"].items()}
    return state_dict
