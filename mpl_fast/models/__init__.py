"""Models by name: Wide ResNets (wrn28-2, wrn28-8, any wrnD-W with D = 6n+4), the two-moons MLP,
a digits CNN, and timm's families.

``create_model(name, num_classes, ...)`` never downloads anything: timm models are built
with ``pretrained=False``.
"""

from __future__ import annotations

import re

from torch import nn

from mpl_fast.models.small import DigitsCNN, TwoMoonsMLP
from mpl_fast.models.wrn import WideResNet

MODEL_NAMES = ("wrn28-2", "wrn28-8", "two-moons-mlp", "digits-cnn")
TIMM_FAMILIES = ("efficientnet", "tf_efficientnet", "resnet")
_WRN = re.compile(r"wrn(\d+)-(\d+)")  # WRN-depth-width: wrn10-2 is the CPU-scale CIFAR preset's


def is_model_name(name: str) -> bool:
    """``name`` is one of ours (MODEL_NAMES or a valid wrnD-W), not a timm name."""
    wrn = _WRN.fullmatch(name)
    return name in MODEL_NAMES or (wrn is not None and (int(wrn[1]) - 4) % 6 == 0 and int(wrn[1]) >= 10
                                   and int(wrn[2]) >= 1)


def create_model(name: str, num_classes: int, *, dropout: float = 0.0, in_channels: int = 3) -> nn.Module:
    """The model called ``name`` (one of MODEL_NAMES, or a timm EfficientNet/ResNet name)."""
    wrn = _WRN.fullmatch(name)
    if wrn is not None and is_model_name(name):
        return WideResNet(num_classes, int(wrn[1]), int(wrn[2]), dropout, in_channels)
    if name == "two-moons-mlp":
        return TwoMoonsMLP(num_classes)
    if name == "digits-cnn":
        return DigitsCNN(num_classes, in_channels, dropout)
    if name.startswith(TIMM_FAMILIES):
        import timm  # noqa: PLC0415 - timm imports are slow; only pay for them when used

        if not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r} (see timm.list_models('efficientnet*') "
                             f"or timm.list_models('resnet*'))")
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                 drop_rate=dropout)
    raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES} or a timm name starting "
                     f"with one of {TIMM_FAMILIES}")


__all__ = ["create_model", "is_model_name", "MODEL_NAMES", "DigitsCNN", "TwoMoonsMLP", "WideResNet"]
