"""Exponential moving average of the student (the model the paper evaluates)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from mpl_fast.algo.guard import host_flag
from mpl_fast.shards import load_module_state, local


class ModelEMA:
    """ema = d * ema + (1 - d) * model over parameters and floating buffers (integer buffers
    are copied), with d = min(decay, (1 + n) / (10 + n)) after n updates so that short runs
    are not dominated by the initial weights.

    ``update(model, ok)`` takes a 0-dim bool tensor: where it is False the EMA is left as it
    was and n does not advance (a skipped step leaves no trace), without a host sync: n lives
    on the device. The update is a few multi-tensor ops over all tensors, not a loop of
    per-tensor ops: on the CPU (where reading n and ok is free) one ``_foreach_lerp_``; on an
    accelerator the weight 1 - d is a device tensor, 0 on a skipped step.

    ``module``: the EMA's own copy, made by the caller, for a model that cannot be deep-copied:
    a sharded student (--fsdp) gets an EMA copied BEFORE sharding and sharded the same way; the
    update then runs on each rank's shards, pair by pair.
    """

    def __init__(self, model: nn.Module, decay: float, module: nn.Module | None = None):
        self.decay = decay
        self.module = (copy.deepcopy(model) if module is None else module).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        device = next(iter(self.module.parameters())).device
        self.num_updates = torch.zeros((), dtype=torch.int64, device=device)

    def _pairs(self, model: nn.Module):
        for e, m in zip(self.module.parameters(), model.parameters()):
            yield local(e), local(m)
        yield from zip(self.module.buffers(), model.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module, ok: torch.Tensor | None = None) -> None:
        if ok is None:
            ok = torch.ones((), dtype=torch.bool, device=self.num_updates.device)
        n = self.num_updates.double()
        weight = 1.0 - torch.clamp((1 + n) / (10 + n), max=self.decay)  # 1 - d, on the device
        floats: dict[torch.dtype, tuple[list, list]] = {}
        ema_ints, model_ints = [], []
        for e, m in self._pairs(model):
            if e.is_floating_point():
                pair = floats.setdefault(e.dtype, ([], []))
                pair[0].append(e)
                pair[1].append(m.detach())
            else:
                ema_ints.append(e)
                model_ints.append(m)
        applied = host_flag(ok)
        if applied is None:
            self._update_on_device(floats, ema_ints, model_ints, weight * ok, ok)
        elif applied:
            w = float(weight)
            for dtype, (ema_t, model_t) in floats.items():
                # lerp rounds its scalar weight to the tensors' dtype, as weight.to(dtype) did
                torch._foreach_lerp_(ema_t, model_t, float(torch.tensor(w, dtype=dtype)))
            if ema_ints:
                torch._foreach_copy_(ema_ints, model_ints)
        self.num_updates += ok.to(torch.int64)

    @staticmethod
    def _update_on_device(floats, ema_ints, model_ints, weight: torch.Tensor, ok: torch.Tensor) -> None:
        """ema += w * (model - ema), w a device tensor (0 when not ok: ema + 0 * finite = ema)."""
        for dtype, (ema_t, model_t) in floats.items():
            diff = torch._foreach_sub(model_t, ema_t)
            torch._foreach_mul_(diff, weight.to(dtype))  # a tensor scalar: no .item()
            torch._foreach_add_(ema_t, diff)
        if ema_ints:
            diff = torch._foreach_sub(model_ints, ema_ints)
            torch._foreach_mul_(diff, ok.to(ema_ints[0].dtype))
            torch._foreach_add_(ema_ints, diff)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates.clone(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        load_module_state(self.module, state["module"])
        self.num_updates.fill_(state["num_updates"])  # a tensor, or an int from older checkpoints
        self.decay = float(state["decay"])
