"""``--fsdp``: teacher and student sharded over all ranks with FSDP2 (``fully_shard``).

Each rank keeps 1/N of every parameter, gradient and momentum buffer (fp32 always: FSDP2's
bf16 MixedPrecisionPolicy fails on the CPU for models with BatchNorm; ``--amp`` autocasts the
teacher's forward instead). Forward and backward all-gather each block's parameters and
reduce-scatter (and average) its gradients, so the MPL step works on LOCAL shards
(mpl_fast.shards: ``local``, and loading whole tensors into sharded modules).

Whole-network state (checkpoints, evaluation on rank 0) goes through ``full_state_dict``
(every rank must call it: it all-gathers).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mpl_fast.checkpoint import map_tensors
from mpl_fast.shards import is_dtensor


def is_sharded(model: nn.Module | None) -> bool:
    """True when ``model``'s parameters are DTensors (e.g. after ``shard_model``)."""
    return model is not None and any(is_dtensor(p) for p in model.parameters())


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _candidate_units(module: nn.Module) -> list[nn.Module]:
    units = []
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            units.extend(_candidate_units(child))
        elif _numel(child) > 0:
            units.append(child)
    return units


def shard_units(model: nn.Module, min_fraction: float = 1 / 64) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one (each all-gathered just before it runs, freed after):
    the modules a model lists in ``fsdp_units()``; else each direct child, containers (Sequential,
    ModuleList, ModuleDict) opened into their children recursively, that holds at least
    ``min_fraction`` of the parameters. So WRN's residual blocks, timm EfficientNet's blocks and
    ResNet's bottlenecks are units; small leftovers (a stem, a norm, a classifier) go with the
    root, which saves one collective each per forward and backward."""
    if hasattr(model, "fsdp_units"):
        return list(model.fsdp_units())
    smallest = min_fraction * _numel(model)
    return [unit for unit in _candidate_units(model) if _numel(unit) >= smallest]


def device_mesh(device: torch.device | str, group: dist.ProcessGroup | None = None):
    """A 1-D device mesh for ``device``'s type over every rank of the default process group, or
    over the ranks of ``group`` (a model-parallel half, mpl_fast.parallel.model_parallel.HalfGroups).

    A group's mesh wraps that very group (DeviceMesh.from_group): the FSDP2 collectives and the
    ShardedSync of the half then run on the same ranks, and no extra groups are created (a 2-D
    init_device_mesh would make its own row and column groups on every rank, on top of the
    half groups the step already uses)."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh  # noqa: PLC0415

    if group is None:
        return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    return DeviceMesh.from_group(group, torch.device(device).type)


def shard_model(model: nn.Module, mesh) -> nn.Module:
    """Applies ``fully_shard`` to each unit of ``shard_units(model)``, then to the root (which
    holds what is left, e.g. a classifier), in place; returns ``model``. Parameters stay fp32.
    Apply activation-checkpoint wrappers before this, never after."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(state: Any) -> Any:
    """A state dict (of a module, an optimizer or a nest of them) whose DTensors are all-gathered
    into whole CPU tensors: the format of an unsharded one-process state dict. Every rank must
    call it, with the same structure (it walks the dicts in their order)."""
    return map_tensors(state, lambda t: t.full_tensor().cpu() if is_dtensor(t) else t)


