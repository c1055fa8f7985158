"""Where this process stands in a run: one process, or a rank of a torchrun job."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from mpl_fast.parallel.distributed import DistContext, init_from_env
from mpl_fast.train.config import TrainConfig


def env_world_size() -> int:
    """torchrun's WORLD_SIZE (1 when unset or empty; a malformed value counts as 1 here: the
    placement check (resolve_placement) and init_from_env report it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1").strip() or 1)
    except ValueError:
        return 1


def join_process_group(cfg: TrainConfig, timeout_s: float) -> tuple[DistContext, bool]:
    """This process's place in a torchrun job, and whether this call created the process group
    (then the run also destroys it). A single process touches no torch.distributed state."""
    if env_world_size() == 1 and not dist.is_initialized():
        return DistContext(device=torch.device(cfg.device)), False
    owns = not dist.is_initialized()
    ctx = init_from_env(torch.device(cfg.device).type, timeout_s=timeout_s)
    if ctx.world_size != dist.get_world_size():
        raise SystemExit(f"error: WORLD_SIZE={ctx.world_size} but the process group has {dist.get_world_size()} ranks")
    return ctx, owns


def rank_seed(cfg: TrainConfig, ctx: DistContext) -> int:
    """The seed of a rank's own random stream (dropout, sampled pseudo labels) after the shared start."""
    return cfg.seed + 7_919 * ctx.rank
