"""The optimizer's parameter groups: weight decay on every parameter but the normalization
layers' scales and shifts (as the official code, which skips batch- and layer-norm variables)."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# Normalization layers whose affine parameters get no weight decay (timm's norm layers subclass these).
NORM_LAYERS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def weight_decay_groups(model: nn.Module, weight_decay: float, decay_norm: bool = False) -> list[dict]:
    """Parameter groups for ``model``: ``weight_decay`` on all parameters, except those of
    normalization layers (0) unless ``decay_norm``. Empty groups are left out; every parameter
    appears once, in ``model.parameters()`` order within its group."""
    if decay_norm:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    norm_ids = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    params = list(model.parameters())
    decayed = [p for p in params if id(p) not in norm_ids]
    undecayed = [p for p in params if id(p) in norm_ids]
    groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
