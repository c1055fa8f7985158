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
    was, without a host sync.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.num_updates = 0

    def _pairs(self, model: nn.Module):
        yield from zip(self.module.parameters(), model.parameters())
        yield from zip(self.module.buffers(), model.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module, ok: torch.Tensor | None = None) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        self.num_updates += 1
        for e, m in self._pairs(model):
            if e.is_floating_point():
                new = torch.lerp(e, m.detach(), 1.0 - d)
            else:
                new = m
            e.copy_(new if ok is None else torch.where(ok, new, e))

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state["decay"])
