"""How the trainer lays out and compiles its models for speed.

- channels_last: convolutions on the CPU (oneDNN) run faster on NHWC activations (the WRN-28-2
  MPL step: benchmarks/RESULTS.md); on a GPU cuDNN's tensor-core kernels are NHWC too.
  Converting the module once is enough: a convolution whose weight is
  channels_last makes its input channels_last too (one conversion per forward, at the stem),
  and every later activation stays NHWC. Only 4-d tensors change; an MLP is untouched. It must
  happen before the optimizers, the step guard and the EMA take their references and copies.
- compile: ``nn.Module.compile()`` in place, so parameters, state_dict keys, optimizers and the
  guard keep pointing at the same tensors; only the forward runs through torch.compile.
  Compile after the EMA copy was taken (the EMA is evaluated rarely; compiling it costs more
  than it saves).

Neither changes the math: channels_last changes the order of the convolutions' sums and compile
fuses elementwise ops, so both differ from the plain step by round-off only (the tests compare
them with the plain step).
"""

from __future__ import annotations

import torch
from torch import nn

CHANNELS_LAST_DEVICES = ("cpu", "cuda")


def has_conv2d(model: nn.Module) -> bool:
    """True if ``model`` holds a 2-d convolution (the layers channels_last speeds up)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def use_channels_last(model: nn.Module, device: str | torch.device, enabled: bool = True) -> bool:
    """Whether ``model`` on ``device`` should be channels_last: ``enabled`` (--channels-last,
    the default), a model with 2-d convolutions, and a CPU or CUDA device."""
    return enabled and torch.device(device).type in CHANNELS_LAST_DEVICES and has_conv2d(model)


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with every 4-d parameter and buffer in channels_last memory format (in place)."""
    return model.to(memory_format=torch.channels_last)


# Random ops (dropout) draw from torch's generator as in eager mode, so a compiled run sees the
# same dropout masks as an eager one from the same seed; costs nothing measurable on WRN/ResNet.
COMPILE_OPTIONS = {"fallback_random": True}


def compile_modules(*modules: nn.Module | None, **kwargs) -> None:
    """``torch.compile`` each module's forward in place (``kwargs`` go to torch.compile; by
    default inductor with ``COMPILE_OPTIONS``). None entries are skipped."""
    kwargs.setdefault("options", COMPILE_OPTIONS)
    for module in modules:
        if module is not None:
            module.compile(**kwargs)
