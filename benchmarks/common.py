"""What every benchmark script shares (scripts import it as `common`: they run as
`python benchmarks/<name>.py`, which puts this folder on the path)."""

from __future__ import annotations

import json
import os

import torch

# The CIFAR-10-4K recipe (DESIGN.md) that the MPL-step benchmarks run.
RECIPE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
STEP_KW = dict(uda_temperature=0.7, uda_threshold=0.6, label_smoothing=0.15, ema_decay=0.995)


def write_json(path: str, results) -> None:
    """Writes ``results`` to ``path`` (creating its folder), as every benchmark does with its table."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def step_schedules():
    """Student active from step 0 (the feedback is the point), constant rates, full UDA weight."""
    from mpl_fast.algo import Schedules  # noqa: PLC0415 - scripts put the repo on the path first

    return Schedules(total_steps=10_000, teacher_lr=RECIPE["lr"], student_lr=RECIPE["lr"],
                     teacher_schedule="constant", student_schedule="constant", uda_weight=8.0, uda_ramp=0)


def make_batches(n: int, batch: int, mu: int, size: int, num_classes: int, device: torch.device, seed: int = 1):
    """n (labeled, unlabeled) batches of normalised random images (the step's cost does not
    depend on the pixel values; the data pipeline is timed by the trainer benchmark)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x_l = torch.randn(batch, 3, size, size, generator=g)
        y_l = torch.randint(0, num_classes, (batch,), generator=g)
        x_uw = torch.randn(mu * batch, 3, size, size, generator=g)
        x_us = x_uw + 0.5 * torch.randn(mu * batch, 3, size, size, generator=g)
        out.append(((x_l.to(device), y_l.to(device)), (x_uw.to(device), x_us.to(device))))
    return out


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (timings of asynchronous GPU steps); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
