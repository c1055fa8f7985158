"""Process groups for torchrun: who am I, which device is mine, and a clean shutdown.

`torchrun --nproc_per_node=N -m mpl_fast.train ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them the run is a single process and nothing here touches torch.distributed.
Collectives get a timeout, so a rank that dies makes the others fail with a message instead of
hanging forever.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_from_env(device: str = "cpu", timeout_s: float = 600.0) -> DistContext:
    """Joins the torchrun process group if there is one (gloo on CPU, NCCL on CUDA).

    ``device`` is "cpu" or "cuda"; under torchrun each rank takes cuda:LOCAL_RANK.
    """
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", 0)
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but no CUDA GPU is visible")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank} has no GPU: only {torch.cuda.device_count()} visible; "
                             "use --nproc_per_node <= the number of GPUs")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s),
                                rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def shutdown() -> None:
    """Leaves the process group. Callers drop their references to models and optimizers first:
    destroying the group while DDP/FSDP objects are alive aborts the process at exit
    ("terminate called without an active exception") in a fair share of runs."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()
