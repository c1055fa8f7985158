"""Learning-rate schedules: linear warm-up, then cosine decay (or constant); the student's
schedule starts only after its wait (its rate is exactly 0 before)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
                  schedule: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """The rate at ``step`` (0-based) of a run of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def delayed(step: int, wait_steps: int, total_steps: int, base_lr: float, **kwargs) -> float:
    """``warmup_cosine`` started at ``wait_steps``: 0 before, then its own warm-up and decay."""
    if step < wait_steps:
        return 0.0
    return warmup_cosine(step - wait_steps, max(1, total_steps - wait_steps), base_lr, **kwargs)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def linear_ramp(step: int, ramp_steps: int, weight: float) -> float:
    """UDA's weight ramp: weight * min(1, step / ramp_steps)."""
    return weight if ramp_steps <= 0 else weight * min(1.0, step / ramp_steps)
