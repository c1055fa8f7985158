"""One network's update inside the MPL step, and its settings: gradient clipping, mixed
precision (autocast contexts, fp16 loss scalers) and the flagged optimizer step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from mpl_fast.optim import FusedSGD


@dataclass(frozen=True)
class GradClip:
    """Global-norm gradient clipping of each network (0 = off)."""

    teacher: float = 0.0
    student: float = 0.0


@dataclass(frozen=True)
class StepPrecision:
    """Mixed precision of the step (default: fp32 throughout).

    ``autocast``: a context for the teacher's forward (e.g. bf16 torch.autocast);
    ``student_autocast``: the same for the student's forward on the unlabeled batch (its update),
    never for the feedback's labeled forward (see MPL._teacher_forward). fp16: each network's
    loss has its own GradScaler, the teacher's and the student's."""

    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    student_autocast: Callable[[], ContextManager] = contextlib.nullcontext
    grad_scaler: torch.amp.GradScaler | None = None
    student_grad_scaler: torch.amp.GradScaler | None = None


def clip_and_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                   max_norm: float) -> torch.Tensor | None:
    """One network's update after its (averaged) backward: clip and step; with an fp16 loss
    scaler, first unscale the gradients in place (filling the scaler's inf/nan flags), step only
    where they are finite and update the scale (halved after an overflow) -- all on the device.
    Returns the scaler's inf/nan flag (nonzero: the caller skips the whole MPL step), or None."""
    if scaler is None:
        clip_(model, max_norm)
        opt.step()
        return None
    scaler.unscale_(opt)
    found_inf = sum(scaler._found_inf_per_device(opt).values())
    clip_(model, max_norm)
    if isinstance(opt, FusedSGD):
        opt.step(found_inf=found_inf)  # a no-op on the device when flagged
    else:
        opt.step()  # the step guard undoes it when flagged
    scaler.update()
    return found_inf


def enabled_scaler(scaler: torch.amp.GradScaler | None) -> torch.amp.GradScaler | None:
    return scaler if scaler is not None and scaler.is_enabled() else None


def clip_(model: nn.Module, max_norm: float) -> None:
    if max_norm > 0:
        # foreach norm + scale with a device-side coefficient: no host sync.
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=None)
