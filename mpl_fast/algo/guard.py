"""Skipping a non-finite step without a host sync.

Before a step, ``save()`` copies every parameter, buffer and momentum buffer of the models
into preallocated storage (one multi-tensor copy); after it, ``restore_unless(ok)`` puts them
back where the 0-dim bool ``ok`` is False. The GPU never waits for the host inside the step:

- ``ok`` on the CPU: reading it is not a device sync, so the host decides, and an applied step
  (the usual case) costs nothing; a skipped one is one multi-tensor copy back.
- ``ok`` on an accelerator: a masked copy on the device (``torch.where`` into the live tensor,
  one kernel per tensor and no allocation); the host never learns whether the step was skipped.
  A multi-tensor masked-copy kernel would make this one launch (not written yet).

The trainer reads the skip counters at its log interval.
"""

from __future__ import annotations

import torch
from torch import nn

from mpl_fast.shards import local


def init_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Creates SGD's momentum buffers as zeros now (SGD's first step gives the same result:
    0.9 * 0 + g = g), so that they exist before the first step and can be saved."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def host_flag(flag: torch.Tensor) -> bool | None:
    """``bool(flag)`` when ``flag`` lives on the CPU (reading it is free), else None: the
    caller must then decide on the device."""
    return bool(flag) if flag.device.type == "cpu" else None


class StepGuard:
    """Saves and conditionally restores the state one step may change."""

    def __init__(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]):
        for opt in optimizers:
            init_momentum_buffers(opt)
        # Sharded (--fsdp) parameters and momentum buffers: this rank's shards (views), saved locally.
        live: list[torch.Tensor] = []
        for m in modules:
            live.extend(local(p.data) for p in m.parameters())
            live.extend(m.buffers())
        for opt in optimizers:
            for state in opt.state.values():
                live.extend(local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        self.live = live
        self.saved = [torch.empty_like(t) for t in live]

    @torch.no_grad()
    def save(self) -> None:
        torch._foreach_copy_(self.saved, self.live)  # one multi-tensor copy, not one op per tensor

    @torch.no_grad()
    def restore_unless(self, ok: torch.Tensor) -> None:
        """Puts the saved state back unless ``ok`` (a 0-dim bool tensor)."""
        applied = host_flag(ok)
        if applied is None:
            self.restore_on_device_unless(ok)
        elif not applied:
            torch._foreach_copy_(self.live, self.saved)

    @torch.no_grad()
    def restore_on_device_unless(self, ok: torch.Tensor) -> None:
        """The sync-free restore: live = where(ok, live, saved), written in place."""
        for s, t in zip(self.saved, self.live):
            torch.where(ok, t, s, out=t)
