"""Tensors as this process holds them: whole, or (under FSDP2) a DTensor of which this rank
keeps one shard. The step works on LOCAL shards: ``local(t)`` is the rank's shard of a DTensor
(a view: in-place writes land in the sharded parameter) and any other tensor itself, so the
one-process code path is unchanged. ``load_module_state``/``load_optimizer_state`` load whole
tensors (a one-process checkpoint) into sharded modules, each rank keeping its shard, with no
communication. (mpl_fast.parallel.sharding does the sharding itself.) A leaf module: the
algorithm, the optimizer and parallel/ all use it, so it imports nothing of mpl_fast."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def is_dtensor(t: Any) -> bool:
    # No DTensor exists until torch.distributed.tensor is imported: the one-process step
    # (which calls this for every tensor) does not pay for that slow import.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's shard of a DTensor (a detached view of its storage: in-place writes land in
    the DTensor); any other tensor (or None) as is."""
    if is_dtensor(t):
        return t.detach().to_local()
    return t


def _shard_like(full: torch.Tensor, like):
    """``full`` (the same whole tensor on every rank) as a DTensor laid out like the DTensor
    ``like``; no communication (each rank cuts its own shard)."""
    from torch.distributed.tensor import distribute_tensor  # noqa: PLC0415

    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def load_module_state(module: nn.Module, state: dict) -> None:
    """``module.load_state_dict(state)``; for a sharded ``module`` and whole tensors (a
    ``full_state_dict`` or a one-process state dict, the same on every rank), each rank keeps
    its shard of every parameter."""
    live = module.state_dict()
    if any(is_dtensor(v) for v in live.values()) and not any(is_dtensor(v) for v in state.values()):
        state = {k: _shard_like(v, live[k]) if is_dtensor(live.get(k)) else v for k, v in state.items()}
    module.load_state_dict(state)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)``; for sharded parameters and a one-process state dict,
    every per-parameter tensor shaped like its parameter (a momentum buffer) becomes its shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(is_dtensor(p) for p in params):
        ids = [i for group in state["param_groups"] for i in group["params"]]
        by_id = dict(zip(ids, params))

        def shard(key, v):
            p = by_id[key]
            whole = isinstance(v, torch.Tensor) and not is_dtensor(v) and v.shape == p.shape
            return _shard_like(v, p) if is_dtensor(p) and whole else v

        state = {"state": {key: {name: shard(key, v) for name, v in param_state.items()}
                           for key, param_state in state["state"].items()},
                 "param_groups": state["param_groups"]}
    optimizer.load_state_dict(state)
