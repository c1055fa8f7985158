"""Exponential moving average of the student (the model the paper evaluates)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """ema = d * ema + (1 - d) * model over parameters and floating buffers (integer buffers
    are copied), with d = min(decay, (1 + n) / (10 + n)) after n updates so that short runs
    are not dominated by the initial weights.

    ``update(model, ok)`` takes a 0-dim bool tensor: where it is False the EMA is left as it
    was and n does not advance (a skipped step leaves no trace), without a host sync: n lives
    on the device.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        device = next(iter(self.module.parameters())).device
        self.num_updates = torch.zeros((), dtype=torch.int64, device=device)

    def _pairs(self, model: nn.Module):
        yield from zip(self.module.parameters(), model.parameters())
        yield from zip(self.module.buffers(), model.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module, ok: torch.Tensor | None = None) -> None:
        n = self.num_updates.double()
        weight = 1.0 - torch.clamp((1 + n) / (10 + n), max=self.decay)  # 1 - d, on the device
        for e, m in self._pairs(model):
            if e.is_floating_point():
                new = torch.lerp(e, m.detach(), weight.to(e.dtype))
            else:
                new = m
            e.copy_(new if ok is None else torch.where(ok, new, e))
        self.num_updates += 1 if ok is None else ok.to(torch.int64)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates.clone(), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates.fill_(state["num_updates"])  # a tensor, or an int from older checkpoints
        self.decay = float(state["decay"])
