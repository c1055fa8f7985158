"""What one run holds between setup, the loop and the end, and how it is set up: the output
folder, the data, the networks (equal on every rank) and the resumed state if any."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import typing

import torch
import torch.distributed as dist

from mpl_fast.algo import MPL
from mpl_fast.parallel import model_parallel
from mpl_fast.parallel.data_parallel import GradientAverager, ShardedSync, StopAgreement, broadcast_from_rank0
from mpl_fast.parallel.distributed import DistContext
from mpl_fast.train.build import build_model, build_mpl, build_placement, build_precision, build_streams, device_name
from mpl_fast.train.checkpointing import restore, truncate_metrics
from mpl_fast.train.config import TrainConfig, to_dict, validate
from mpl_fast.train.topology import env_world_size, rank_seed


@dataclasses.dataclass
class Session:
    """What one run holds between setup, the loop and the end."""

    cfg: TrainConfig
    ctx: DistContext
    out_dir: str
    say: typing.Callable
    streams: typing.Any
    mpl: MPL
    start_step: int = 0
    clock_offset: int = 0
    best: dict = dataclasses.field(default_factory=lambda: {"val": -1.0, "step": -1, "state": None})
    elapsed_before: float = 0.0
    metrics: typing.Any = None  # the open metrics.jsonl on rank 0; None on the other ranks
    stop_agreement: StopAgreement | None = None  # torchrun: when to act on a signal
    # --fsdp: rank 0's unsharded copies of the networks, for evaluation (built on first use).
    make_replica: typing.Callable | None = None
    replicas: dict = dataclasses.field(default_factory=dict)
    evaluated_models: dict = dataclasses.field(default_factory=dict)  # what the last evaluation measured
    # Model-parallel ranks (a rank pair or rank groups) meet at evaluations and checkpoints; identity otherwise.
    sync: model_parallel.RankSync = dataclasses.field(
        default_factory=lambda: model_parallel.RankSync(model_parallel.Placement("single", "both", None, None)))

    @property
    def evaluates(self) -> bool:
        """Rank 0 evaluates for data parallel; each model-parallel half's leader (rank 0, rank k)
        measures the networks its half holds."""
        return self.ctx.is_main or (self.sync.distributed and self.sync.is_leader)

    @property
    def joins_evaluation(self) -> bool:
        """Under --fsdp every rank takes part (the networks' weights are gathered from all ranks)."""
        return self.evaluates or self.cfg.fsdp

    @property
    def data_parallel(self) -> bool:
        """torchrun ranks that each read their own shard (not model-parallel halves of one step)."""
        return self.ctx.distributed and not self.sync.distributed

    @property
    def shards_data(self) -> bool:
        """Ranks that read their own shard of each global batch: data parallel, and model-parallel
        halves of more than one rank (peers i and k+i read shard i)."""
        return self.data_parallel or (self.sync.distributed and self.sync.groups.per_half > 1)

    @property
    def resumable(self) -> bool:
        return all(hasattr(getattr(self.streams, n), "state_dict") for n in ("labeled", "unlabeled"))

    def write_metrics(self, line: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(line) + "\n")
            self.metrics.flush()


def check_config(cfg: TrainConfig) -> None:
    """Refuses what cannot run, before any work starts."""
    validate(cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {cfg.device}: no CUDA GPU is visible to torch on this machine "
                         f"(use --device cpu)")
    if cfg.fsdp and env_world_size() < 2 and not (dist.is_initialized() and dist.get_world_size() > 1):
        raise SystemExit("error: --fsdp shards the networks over torchrun ranks: launch it with "
                         "torchrun --nproc_per_node=N -m mpl_fast.train --fsdp ... with N >= 2 "
                         "(one process holds the whole networks anyway: drop --fsdp)")
    placement = build_placement(cfg)  # a model-parallel layout that cannot work is refused before joining any group
    if cfg.fsdp and placement.layout == "ranks" and placement.per_half < 2:
        raise SystemExit("error: --fsdp --model-parallel shards each network over its half of the torchrun ranks: "
                         "it needs 2k >= 4 processes (with 2, each rank holds its whole network anyway: drop --fsdp)")
    build_precision(cfg, placement.data_device)  # e.g. fp16 on a CPU


def default_output_dir(cfg: TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.preset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def setup(cfg: TrainConfig, state: dict | None, ctx: DistContext, quiet: bool, dist_timeout: float) -> Session:
    """Output folder, data, models (equal on every rank), and the resumed state if any."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = cfg.output_dir or default_output_dir(cfg)
    if ctx.distributed:  # rank 0's timestamp names the folder for everyone
        shared = [out_dir]
        dist.broadcast_object_list(shared, src=0)
        out_dir = shared[0]
    cfg.output_dir = out_dir
    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
    say = (lambda *a: None) if quiet or not ctx.is_main else (lambda *a: print(*a, flush=True))
    if cfg.method != "supervised" and cfg.mpl.student_wait_steps >= cfg.steps:
        say(f"warning: the student waits {cfg.mpl.student_wait_steps} steps (--mpl.student-wait-steps) and the run "
            f"has {cfg.steps} (--steps): the student never trains, only the teacher does")

    torch.manual_seed(cfg.seed)
    placement = build_placement(cfg, device_name(cfg, ctx))
    # Model-parallel ranks: every rank creates the halves' process groups, in the same order.
    groups = (model_parallel.HalfGroups.create(ctx.world_size, ctx.rank) if placement.layout == "ranks"
              else None)
    sync = model_parallel.RankSync(placement, groups)
    data_parallel = ctx.distributed and not sync.distributed
    grouped = groups is not None and groups.per_half > 1  # rank groups: each half data parallel
    # Model-parallel peers read the same batches (only y_hat and h travel); with k ranks per half,
    # peers i and k+i read shard i of k, as data-parallel rank i of k would.
    shard_ctx = ctx if data_parallel else None
    if grouped:
        shard_ctx = DistContext(rank=groups.index, world_size=groups.per_half, local_rank=ctx.local_rank,
                                device=ctx.device)
    streams = build_streams(cfg, shard_ctx, device=str(placement.data_device))
    grad_sync = (ShardedSync() if cfg.fsdp else GradientAverager()) if data_parallel else None
    if grouped:  # over its own half's group only
        grad_sync = (ShardedSync if cfg.fsdp else GradientAverager)(groups.half_group)
    mpl = build_mpl(cfg, streams, placement, grad_sync=grad_sync, groups=groups)
    if grouped:
        if not cfg.fsdp:  # (sharded networks were made equal before sharding, in build_mpl)
            broadcast_from_rank0(mpl.models().values(), groups.half_group)
        if groups.index > 0:  # dropout and sampled pseudo labels: a different random stream per shard
            torch.manual_seed(rank_seed(cfg, ctx))
        say(f"model parallel x data parallel: teacher on ranks 0..{groups.per_half - 1}, student on ranks "
            f"{groups.per_half}..{ctx.world_size - 1} ({dist.get_backend()}); each half data parallel over "
            f"{groups.per_half} shards of {cfg.data.batch_size} labeled + {cfg.data.mu * cfg.data.batch_size} "
            f"unlabeled per rank per step"
            + (f"; each network sharded over its half's {groups.per_half} ranks (FSDP2)" if cfg.fsdp else ""))
    elif data_parallel:
        if not cfg.fsdp:  # (sharded networks were made equal before sharding, in build_mpl)
            broadcast_from_rank0(mpl.models().values())
        if ctx.rank > 0:  # dropout and sampled pseudo labels: a different random stream per rank
            torch.manual_seed(rank_seed(cfg, ctx))
        say(f"data parallel: {ctx.world_size} ranks ({dist.get_backend()}), {cfg.data.batch_size} labeled + "
            f"{cfg.data.mu * cfg.data.batch_size} unlabeled per rank per step"
            + (f"; teacher, student and EMA sharded over the {ctx.world_size} ranks (FSDP2)" if cfg.fsdp else ""))
    elif placement.layout != "single":
        say(f"model parallel: teacher on {'rank 0' if sync.distributed else placement.teacher_device}, "
            f"student on {'rank 1' if sync.distributed else placement.student_device}")
    sess = Session(cfg=cfg, ctx=ctx, out_dir=out_dir, say=say, streams=streams, mpl=mpl, sync=sync,
                   stop_agreement=StopAgreement(dist_timeout) if ctx.distributed else None)
    if cfg.fsdp and sess.evaluates:
        sess.make_replica = lambda: build_model(cfg, streams, str(placement.data_device))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if state is not None:
        restore(sess, state)
        if ctx.is_main:
            truncate_metrics(metrics_path, sess.start_step)
        say(f"resumed {out_dir} at step {sess.start_step}")
    elif ctx.is_main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        with open(os.path.join(out_dir, "split.json"), "w") as f:
            json.dump(streams.split, f)
        open(metrics_path, "w").close()
    if ctx.is_main:
        sess.metrics = open(metrics_path, "a")
    return sess
