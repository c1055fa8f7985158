"""Where teacher and student live in a run: the layout, resolved once from the flags and
torchrun's environment, and everything that depends on it.

  single-device   one process; or, under torchrun, data-parallel replicas (--fsdp: FSDP
                  shards) of both networks over all ranks, each rank reading its own shard
  two-devices     one process, the teacher and the student on two devices (--model-parallel
                  --teacher-device ... --student-device ...)
  rank-pair       torchrun with 2 ranks and --model-parallel: rank 0 the teacher, rank 1 the
                  student, both reading the same batches
  rank-groups     torchrun with 2k ranks and --model-parallel: ranks 0..k-1 the teacher, k..2k-1
                  the student, each group data parallel (--fsdp: sharded) over its k shards

``Topology`` answers the questions the trainer has about its layout: placement, data shards,
gradient sync, which replicas start equal, per-rank seeds, who evaluates, and a description.
mpl_fast.parallel implements the pieces (links, gradient averaging, sharding, groups).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from mpl_fast.algo import GradientSync
from mpl_fast.parallel import model_parallel
from mpl_fast.parallel.data_parallel import GradientAverager, ShardedSync, broadcast_from_rank0
from mpl_fast.parallel.distributed import DistContext, env_int, init_from_env
from mpl_fast.train.config import TrainConfig

LAYOUTS = ("single-device", "two-devices", "rank-pair", "rank-groups")


def env_world_size() -> int:
    """torchrun's WORLD_SIZE (1 when unset or empty; a malformed value counts as 1 here: the
    placement check (resolve_placement) and init_from_env report it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1").strip() or 1)
    except ValueError:
        return 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of a rank's own random stream (dropout, sampled pseudo labels) after the shared start."""
    return seed + 7_919 * rank


@dataclass(frozen=True)
class Topology:
    """The resolved layout of a run, from this process's point of view."""

    layout: str                              # one of LAYOUTS
    placement: model_parallel.Placement      # this process's devices and role
    rank: int = 0
    world_size: int = 1
    fsdp: bool = False

    @property
    def split(self) -> bool:
        """Teacher and student on different ranks (rank-pair, rank-groups)."""
        return self.placement.role != "both"

    @property
    def replicas(self) -> int:
        """How many ranks hold (a replica or shard of) the same network and average its gradients."""
        if self.split:
            return self.placement.per_half
        return self.world_size

    @property
    def shards_data(self) -> bool:
        """Whether ranks read different shards of each global batch (and so save their own stream positions)."""
        return self.replicas > 1

    @property
    def shard(self) -> tuple[int, int]:
        """(index, count): which shard of each global batch this rank reads."""
        if self.split:
            return self.placement.shard, self.placement.per_half
        return self.rank, self.world_size

    @property
    def evaluates(self) -> bool:
        """Rank 0 evaluates; with the networks split over ranks, also the student's first rank
        (rank k), each measuring the networks its group holds."""
        return self.rank == 0 or (self.split and self.rank == self.placement.per_half)

    def shard_context(self, ctx: DistContext) -> DistContext | None:
        """The DistContext the data streams shard by (None: the whole stream, as one process reads it)."""
        if not self.shards_data:
            return None
        index, count = self.shard
        return ctx if not self.split else DistContext(rank=index, world_size=count, local_rank=ctx.local_rank,
                                                      device=ctx.device)

    def make_groups(self) -> model_parallel.HalfGroups | None:
        """The teacher's and the student's process groups (collective: every rank calls it, in the
        same order); None unless the networks are split over ranks."""
        return model_parallel.HalfGroups.create(self.world_size, self.rank) if self.split else None

    def rank_sync(self, groups: model_parallel.HalfGroups | None) -> model_parallel.RankSync:
        return model_parallel.RankSync(self.placement, groups)

    def grad_sync(self, groups: model_parallel.HalfGroups | None) -> GradientSync | None:
        """The gradient averaging over this rank's replicas (None: nothing to average): over all
        ranks, or over its own group of a rank-groups layout; --fsdp: the losses only."""
        if self.replicas < 2:
            return None
        group = groups.half_group if self.split else None
        return ShardedSync(group) if self.fsdp else GradientAverager(group)

    def equalize(self, networks, groups: model_parallel.HalfGroups | None) -> None:
        """Replicas start from rank 0's (the group's first rank's) weights; sharded networks were
        made equal before sharding (build.shard_networks)."""
        if self.replicas > 1 and not self.fsdp:
            broadcast_from_rank0(networks, groups.half_group if self.split else None)

    def own_seed(self, seed: int) -> int | None:
        """The seed of this rank's random stream after the networks are built, or None to keep the
        run's: every replica but the first gets its own (dropout, sampled pseudo labels)."""
        return rank_seed(seed, self.rank) if self.replicas > 1 and self.shard[0] > 0 else None

    def describe(self, cfg: TrainConfig) -> str | None:
        """One line for the log (None for one process on one device)."""
        unlabeled = ("a share of the whole unlabeled pool" if cfg.data.full_unlabeled_batch
                     else f"{cfg.data.mu * cfg.data.batch_size} unlabeled")
        per_rank = f"{cfg.data.batch_size} labeled + {unlabeled} per rank per step"
        k = self.placement.per_half
        if self.layout == "rank-groups":
            return (f"rank groups: teacher on ranks 0..{k - 1}, student on ranks {k}..{self.world_size - 1} "
                    f"({dist.get_backend()}); each group data parallel over {k} shards of {per_rank}"
                    + (f"; each network sharded over its group's {k} ranks (FSDP2)" if self.fsdp else ""))
        if self.layout == "rank-pair":
            return "rank pair: teacher on rank 0, student on rank 1"
        if self.layout == "two-devices":
            return f"two devices: teacher on {self.placement.teacher_device}, student on {self.placement.student_device}"
        if self.world_size > 1:
            return (f"data parallel: {self.world_size} ranks ({dist.get_backend()}), {per_rank}"
                    + (f"; teacher, student and EMA sharded over the {self.world_size} ranks (FSDP2)"
                       if self.fsdp else ""))
        return None


def resolve_topology(cfg: TrainConfig) -> Topology:
    """The run's layout from its flags and torchrun's environment, before any process group is
    joined: a layout that cannot work is refused here, with one sentence naming the flag."""
    world_size = env_world_size()
    if cfg.fsdp and world_size < 2 and not (dist.is_initialized() and dist.get_world_size() > 1):
        raise SystemExit("error: --fsdp shards the networks over torchrun ranks: launch it with "
                         "torchrun --nproc_per_node=N -m mpl_fast.train --fsdp ... with N >= 2 "
                         "(one process holds the whole networks anyway: drop --fsdp)")
    if cfg.model_parallel and cfg.method == "supervised":
        raise SystemExit("error: --model-parallel places the teacher and the student on different devices, and "
                         "--method supervised has no teacher")
    try:
        rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
        device = cfg.device
        if world_size > 1 and torch.device(device).type == "cuda":  # each rank its own GPU (init_from_env)
            device = f"cuda:{local_rank}"
        placement = model_parallel.resolve_placement(cfg.model_parallel, device, cfg.teacher_device,
                                                      cfg.student_device)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if cfg.fsdp and placement.layout == "rank-pair":
        raise SystemExit("error: --fsdp --model-parallel shards each network over its group of torchrun ranks: "
                         "it needs 2k >= 4 processes (with 2, each rank holds its whole network anyway: drop --fsdp)")
    return Topology(placement.layout, placement, rank=rank if world_size > 1 else 0, world_size=world_size,
                    fsdp=cfg.fsdp)


def dry_run_layouts(cfg: TrainConfig, world_size: int) -> dict:
    """What --dry-run plans for under torchrun's WORLD_SIZE: the FSDP ranks, and rank groups of
    2k > 2 ranks (keyword arguments of mpl_fast.train.plan.dry_run_report)."""
    plan_for = {}
    if cfg.fsdp and world_size > 1:
        plan_for["fsdp_devices"] = world_size
    if cfg.model_parallel and world_size > 2 and world_size % 2 == 0:
        plan_for.update(model_parallel_ranks=world_size, sharded_halves=cfg.fsdp)
    return plan_for


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
