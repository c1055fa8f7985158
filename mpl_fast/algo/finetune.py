"""The last phase of MPL: the student finetuned on the labeled data alone (paper, sec. 3.2)."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import nn

from mpl_fast.algo.losses import cross_entropy


def finetune(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float,
             momentum: float = 0.9, weight_decay: float = 0.0, label_smoothing: float = 0.0,
             on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """``steps`` SGD steps of ``model`` on CE over ``batches``; returns the summed loss (device tensor).
    ``on_step`` is called after each step (the trainer advances a progress bar with it)."""
    for p in model.parameters():  # an EMA copy comes with gradients switched off
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    total = torch.zeros(())
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        loss = cross_entropy(model(x), y, label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total = total.to(loss.device) + loss.detach()
        if on_step is not None:
            on_step()
    return total


def larger_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], batch_size: int):
    """Concatenates consecutive batches of ``batches`` into batches of at least ``batch_size``."""
    while True:
        xs, ys, n = [], [], 0
        while n < batch_size:
            x, y = next(batches)
            xs.append(x)
            ys.append(y)
            n += len(y)
        yield torch.cat(xs), torch.cat(ys)
