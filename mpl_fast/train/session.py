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
from mpl_fast.metrics_log import MetricsLog
from mpl_fast.parallel import model_parallel
from mpl_fast.parallel.data_parallel import StopAgreement
from mpl_fast.parallel.distributed import DistContext
from mpl_fast.train import run_folder
from mpl_fast.train.build import build_model, build_mpl, build_precision, build_streams
from mpl_fast.train.checkpointing import restore, resume_metrics
from mpl_fast.train.config import TrainConfig, to_dict, validate
from mpl_fast.train.curves import Curves, plotting_enabled
from mpl_fast.train.tensorboard_log import TensorBoardLog, check_available
from mpl_fast.train.topology import Topology, resolve_topology
from mpl_fast.train.validate import check_data_dir


@dataclasses.dataclass
class Session:
    """What one run holds between setup, the loop and the end."""

    cfg: TrainConfig
    ctx: DistContext
    out_dir: str
    say: typing.Callable
    streams: typing.Any
    mpl: MPL
    topology: Topology
    sync: model_parallel.RankSync  # teacher and student on different ranks meet here; identity otherwise
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
    curves: Curves | None = None  # metrics.png, on the rank that writes metrics.jsonl
    tensorboard: TensorBoardLog | None = None  # --tensorboard, on that rank too

    @property
    def evaluates(self) -> bool:
        return self.topology.evaluates

    @property
    def joins_evaluation(self) -> bool:
        """Under --fsdp every rank takes part (the networks' weights are gathered from all ranks)."""
        return self.evaluates or self.cfg.fsdp

    @property
    def shards_data(self) -> bool:
        return self.topology.shards_data

    @property
    def resumable(self) -> bool:
        return all(hasattr(getattr(self.streams, n), "state_dict") for n in ("labeled", "unlabeled"))

    def write_metrics(self, line: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(line)  # strict JSON: a NaN/inf is written as null
        if self.tensorboard is not None:
            self.tensorboard.write(line)


def check_config(cfg: TrainConfig) -> Topology:
    """Refuses what cannot run, before any work starts (and before joining any process group);
    returns the run's layout."""
    validate(cfg)
    check_data_dir(cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {cfg.device}: no CUDA GPU is visible to torch on this machine "
                         f"(use --device cpu)")
    topology = resolve_topology(cfg)
    build_precision(cfg, topology.placement.data_device)  # e.g. fp16 on a CPU
    if cfg.tensorboard:
        check_available()
    return topology


def default_output_dir(cfg: TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.preset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def setup(cfg: TrainConfig, state: dict | None, ctx: DistContext, topology: Topology, quiet: bool,
          dist_timeout: float) -> Session:
    """Output folder, data, models (equal on every rank), and the resumed state if any."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = cfg.output_dir or default_output_dir(cfg)
    if ctx.distributed:  # rank 0's timestamp names the folder for everyone
        shared = [out_dir]
        dist.broadcast_object_list(shared, src=0)
        out_dir = shared[0]
    cfg.output_dir = out_dir
    say = (lambda *a: None) if quiet or not ctx.is_main else (lambda *a: print(*a, flush=True))
    if cfg.method != "supervised" and cfg.mpl.student_wait_steps >= cfg.steps:
        say(f"warning: the student waits {cfg.mpl.student_wait_steps} steps (--mpl.student-wait-steps) and the run "
            f"has {cfg.steps} (--steps): the student never trains, only the teacher does")

    torch.manual_seed(cfg.seed)
    placement = topology.placement
    groups = topology.make_groups()  # collective where teacher and student are on different ranks
    streams = build_streams(cfg, topology.shard_context(ctx), device=str(placement.data_device))
    mpl = build_mpl(cfg, streams, placement, grad_sync=topology.grad_sync(groups), groups=groups)
    topology.equalize(mpl.models().values(), groups)
    seed = topology.own_seed(cfg.seed)
    if seed is not None:
        torch.manual_seed(seed)
    description = topology.describe(cfg)
    if description:
        say(description)
    sess = Session(cfg=cfg, ctx=ctx, out_dir=out_dir, say=say, streams=streams, mpl=mpl, topology=topology,
                   sync=topology.rank_sync(groups),
                   stop_agreement=StopAgreement(dist_timeout) if ctx.distributed else None)
    if cfg.fsdp and sess.evaluates:
        sess.make_replica = lambda: build_model(cfg, streams, str(placement.data_device))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if ctx.is_main:  # only now: a run whose inputs fail leaves no half-made folder
        for path in run_folder.create(out_dir, fresh=state is None):
            say(f"removed {path}")
    if state is not None:
        restore(sess, state)
        if ctx.is_main:
            resume_metrics(metrics_path, sess.start_step, finished_part=sess.start_step >= cfg.steps)
        say(f"resumed {out_dir} at step {sess.start_step}")
    elif ctx.is_main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        with open(os.path.join(out_dir, "split.json"), "w") as f:
            json.dump(streams.split, f)
    if ctx.is_main:
        sess.metrics = MetricsLog(metrics_path, append=state is not None)
        if plotting_enabled(cfg.plot):
            sess.curves = Curves(out_dir, say)
        if cfg.tensorboard:
            sess.tensorboard = TensorBoardLog(out_dir, sess.start_step if state is not None else None)
    return sess
