import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mpl_testing import free_port

from mpl_fast.parallel.distributed import DistContext, init_from_env, shutdown


def _worker(rank: int, world_size: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    ctx = init_from_env("cpu", timeout_s=60)
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    results[rank] = (ctx.rank, ctx.is_main, value.item())
    shutdown()


def test_two_gloo_ranks_all_reduce():
    port = free_port()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, port, results), nprocs=2, join=True)
        assert dict(results) == {0: (0, True, 3.0), 1: (1, False, 3.0)}


def test_single_process_without_torchrun_env(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_from_env("cpu")
    assert ctx == DistContext() and ctx.is_main and not ctx.distributed
    assert not dist.is_initialized()


def test_bad_env_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        init_from_env("cpu")
