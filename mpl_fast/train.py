"""The trainer: ``python -m mpl_fast.train [--preset digits] [--method mpl] [...]``.

With no arguments it trains MPL on scikit-learn's bundled 8x8 digits on the CPU (about a
minute) and prints the test accuracies of the student, its EMA, the teacher and the
finetuned student. Every number of a preset can be overridden by a flag named after its
place in the configuration tree (``--teacher.lr 0.1``, ``--mpl.uda-weight 2``,
``--data.labels-per-class 4``; see ``--help``; the parser is mpl_fast.cli, ``--dry-run``'s report
mpl_fast.parallel.plan).

The run writes to ``--output-dir`` (default runs/<preset>-<method>-<timestamp>):
config.json, split.json, metrics.jsonl (one line per log interval and per evaluation),
checkpoint.pt (atomic; every ``--checkpoint-every`` steps, at the end and on SIGINT/SIGTERM)
and summary.json.

``torchrun --nproc_per_node=N -m mpl_fast.train ...`` trains data parallel: every rank runs
``run``; batch sizes are per rank; rank 0 alone writes, prints and evaluates (README,
"Multi-process / multi-node"; mpl_fast.parallel.data_parallel for the gradient averaging).
``--fsdp`` (under torchrun) shards teacher, student and EMA over all ranks with FSDP2
(mpl_fast.parallel.sharding); evaluation gathers full copies on rank 0.
``--model-parallel`` puts the teacher and the student on different devices of one process, or
under ``torchrun --nproc_per_node=2`` on two ranks (rank 0 the teacher, rank 1 the student;
mpl_fast.parallel.model_parallel), or under ``--nproc_per_node=2k`` on two groups of k ranks
(ranks 0..k-1 the teacher, k..2k-1 the student, each group data parallel over its k shards of
the global batch; with ``--fsdp`` each network sharded over its group).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import sys
import time
import typing

import torch
import torch.distributed as dist

from mpl_fast import checkpoint as ckpt
from mpl_fast.algo import MPL, Schedules, finetune, larger_batches
from mpl_fast.cli import build_parser, config_from_args
from mpl_fast.config import TrainConfig, from_dict, to_dict, validate
from mpl_fast.models import create_model
from mpl_fast.models.checkpointing import enable_activation_checkpointing
from mpl_fast.models.speed import compile_modules, to_channels_last, use_channels_last
from mpl_fast.optim import FusedSGD
from mpl_fast.parallel import model_parallel
from mpl_fast.parallel import sharding
from mpl_fast.parallel.data_parallel import (GradientAverager, NoGradientSync, ShardedSync, StopAgreement,
                                             broadcast_from_rank0)
from mpl_fast.parallel.distributed import DistContext, init_from_env, shutdown
from mpl_fast.parallel.plan import dry_run_report
from mpl_fast.parallel.precision import PrecisionPolicy, resolve_precision

__all__ = ["run", "main", "build_mpl", "build_parser", "config_from_args", "dry_run_report", "accuracy",
           "TrainingStopped", "DataParallelFailure"]


class TrainingStopped(RuntimeError):
    """Raised when too many consecutive steps were not finite."""


# ----------------------------------------------------------------------------- pieces

def _build_streams(cfg: TrainConfig, ctx: DistContext | None = None, device: str | None = None):
    """The data streams for ``cfg`` (batches on ``device``, default this rank's); under data
    parallel, ``ctx``'s shard of them (layout (b)'s model-parallel ranks pass no ``ctx``: the same
    batches; layout (c)'s pass their shard index and k)."""
    from mpl_fast.data import build_streams  # noqa: PLC0415

    ctx = ctx or DistContext(device=torch.device(cfg.device))
    try:
        return build_streams(cfg.data, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                             device=device or _device_name(cfg, ctx))
    except ModuleNotFoundError as exc:
        if "mpl_fast.data.files" in str(exc):
            raise SystemExit(f"error: preset {cfg.preset!r} reads {cfg.data.dataset} files from disk, and the "
                             f"file-based data sets (mpl_fast.data.files) are not in this build of mpl_fast yet; "
                             f"the embedded presets (digits, two-moons) work without them.") from None
        raise
    except (FileNotFoundError, NotADirectoryError) as exc:  # missing or malformed data directory
        raise SystemExit(f"error: {exc}") from None


def _device_name(cfg: TrainConfig, ctx: DistContext) -> str:
    """cfg.device in a single process; this rank's device (cuda:LOCAL_RANK) under torchrun."""
    return str(ctx.device) if ctx.distributed else cfg.device


def _make_model(cfg: TrainConfig, streams, device: str) -> torch.nn.Module:
    shape = streams.input_shape
    in_channels = shape[0] if len(shape) == 3 else 1
    model = create_model(cfg.model.name, streams.num_classes, dropout=cfg.model.dropout,
                         in_channels=in_channels).to(device)
    # The layout is set before the optimizers, the step guard and the EMA see the tensors.
    # FSDP2 shards contiguous parameters only: --fsdp keeps NCHW.
    if use_channels_last(model, device, cfg.channels_last and not cfg.fsdp):
        model = to_channels_last(model)
    if cfg.activation_checkpointing:  # on the final layout; before torch.compile (refused) and fully_shard
        try:
            enable_activation_checkpointing(model)
        except ValueError as exc:
            raise SystemExit(f"error: --activation-checkpointing: {exc}") from None
    return model


def _sgd(model: torch.nn.Module, opt) -> torch.optim.Optimizer:
    # torch.optim.SGD's math in one fused pass per step; it leaves p.grad untouched, so the
    # grad-dot feedback can still read g_u from .grad after the student's step.
    return FusedSGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                    nesterov=opt.nesterov and opt.momentum > 0, weight_decay=opt.weight_decay)


def build_mpl(cfg: TrainConfig, streams, placement: model_parallel.Placement | None = None, *,
              grad_sync: NoGradientSync | None = None, groups: model_parallel.HalfGroups | None = None) -> MPL:
    """Teacher, student (distinct random inits), optimizers and the MPL step object for ``cfg``.

    ``placement`` (default: both on ``cfg.device``) puts each network on its device; a process
    that holds one half of a model-parallel run builds only that network. ``grad_sync``
    averages gradients under data parallel. ``groups``: this rank's place among model-parallel
    ranks (its peer; with --fsdp, its half's group shards the network)."""
    placement = placement or _placement(cfg)
    # The teacher's process of layout (b) builds the student too (on the CPU, then drops it), so
    # that the teacher starts from the same random weights as in one process.
    student = _make_model(cfg, streams, placement.student_device or "cpu")
    teacher = _make_model(cfg, streams, placement.teacher_device) if placement.teacher_device is not None \
        and cfg.method != "supervised" else None
    if placement.student_device is None:
        student = None
    ema_module = None
    if cfg.fsdp:
        ema_module = _shard_networks(cfg, teacher, student, placement.data_device,
                                     groups.half_group if groups is not None else None)
    m = cfg.mpl
    precision = _precision(cfg, placement.data_device)
    schedules = Schedules(
        total_steps=cfg.steps, teacher_lr=cfg.teacher.lr, student_lr=cfg.student.lr,
        teacher_warmup=cfg.teacher.warmup_steps, student_warmup=cfg.student.warmup_steps,
        teacher_schedule=cfg.teacher.schedule, student_schedule=cfg.student.schedule,
        min_lr_ratio=cfg.student.min_lr_ratio,
        student_wait=0 if cfg.method == "supervised" else m.student_wait_steps,
        uda_weight=m.uda_weight if cfg.method in ("mpl", "uda") else 0.0, uda_ramp=m.uda_ramp_steps)
    mpl = MPL(teacher, student, _sgd(teacher, cfg.teacher) if teacher is not None else None,
              _sgd(student, cfg.student) if student is not None else None, schedules,
              method=cfg.method, feedback=m.feedback,
              pseudo_label_kind=m.pseudo_labels, soft_temperature=m.soft_temperature,
              baseline=m.baseline, baseline_decay=m.baseline_decay, mpl_weight=m.mpl_weight, sup_weight=m.sup_weight, uda_temperature=m.uda_temperature,
              uda_threshold=m.uda_threshold, label_smoothing=m.label_smoothing, ema_decay=m.ema_decay,
              grad_clip_teacher=cfg.teacher.grad_clip, grad_clip_student=cfg.student.grad_clip,
              autocast=precision.autocast, grad_sync=grad_sync,
              student_autocast=precision.student_autocast(placement.student_device or "cpu", cfg.amp_student),
              grad_scaler=precision.grad_scaler() if teacher is not None else None,
              student_grad_scaler=(precision.student_grad_scaler(placement.student_device, cfg.amp_student)
                                   if student is not None else None),
              link=model_parallel.make_link(placement, m.pseudo_labels, streams.num_classes, groups),
              ema_module=ema_module)
    if cfg.compile:  # after MPL took the EMA copy: only the teacher's and student's forwards compile
        compile_modules(mpl.teacher, mpl.student)
    return mpl


def _shard_networks(cfg: TrainConfig, teacher, student, device, group=None) -> torch.nn.Module | None:
    """--fsdp: every rank starts from its group's first rank's weights, the EMA's copy of the
    student is taken (a sharded module cannot be deep-copied), then teacher, student and EMA are
    sharded in place over the ranks of ``group`` (default: all ranks; a model-parallel half's
    group under --model-parallel). Returns the EMA's copy (None without an EMA or a student)."""
    networks = [net for net in (teacher, student) if net is not None]
    broadcast_from_rank0(networks, group)
    ema = copy.deepcopy(student) if cfg.mpl.ema_decay > 0 and student is not None else None
    mesh = sharding.device_mesh(device, group)
    for net in networks + ([ema] if ema is not None else []):
        sharding.shard_model(net, mesh)
    return ema


def _placement(cfg: TrainConfig, device: str | None = None) -> model_parallel.Placement:
    """Where teacher and student go (--model-parallel, --teacher-device, --student-device);
    without --model-parallel both on ``device`` (default cfg.device)."""
    if cfg.model_parallel and cfg.method == "supervised":
        raise SystemExit("error: --model-parallel places the teacher and the student on different devices, and "
                         "--method supervised has no teacher")
    try:
        return model_parallel.resolve_placement(cfg.model_parallel, device or cfg.device, cfg.teacher_device,
                                                cfg.student_device)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def _precision(cfg: TrainConfig, teacher_device=None) -> PrecisionPolicy:
    """--amp [--amp-dtype]: autocast of the teacher's forward, bf16 where supported (CPU and GPU),
    else fp16 with loss scaling (GPU only). MPL_FAST_ALLOW_CPU_FP16=1 lets tests run fp16 on a CPU."""
    try:
        return resolve_precision(cfg.amp, cfg.amp_dtype, teacher_device or cfg.device,
                                 allow_cpu_fp16=os.environ.get("MPL_FAST_ALLOW_CPU_FP16") == "1")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches) -> float | None:
    """Top-1 accuracy in percent over a finite iterable of batches (None when it is empty)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # model-parallel: the data may live on the other device
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for x, y in batches:
        correct += (model(x.to(device)).argmax(1) == y.to(device)).sum()
        total += len(y)
    model.train(was_training)
    return None if total == 0 else 100.0 * int(correct) / total


def _selection_model(cfg: TrainConfig) -> str:
    """The model whose best-validation weights are kept (and finetuned)."""
    if cfg.method == "uda":
        return "teacher"
    return "ema" if cfg.mpl.ema_decay > 0 else "student"


def _headline_model(cfg: TrainConfig) -> str:
    """What a method delivers: UDA's teacher; otherwise the selected student, finetuned when
    the preset finetunes."""
    if cfg.method != "uda" and cfg.finetune.steps > 0:
        return "finetuned"
    return _selection_model(cfg)


def _default_output_dir(cfg: TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.preset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


class _Signals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the run

class DataParallelFailure(RuntimeError):
    """A collective failed: another rank died, or did not answer within the timeout."""


@dataclasses.dataclass
class _Session:
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
    # Model-parallel ranks (layout (b)) meet at evaluations and checkpoints; identity otherwise.
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


def run(cfg: TrainConfig, *, resume: str | None = None, progress: bool = True, quiet: bool = False,
        stop_after: int | None = None, dist_timeout: float = 600.0) -> dict:
    """Trains per ``cfg`` and returns the summary (also written to summary.json).

    Under torchrun (WORLD_SIZE > 1 in the environment) every rank calls this: the ranks train
    data parallel (see mpl_fast.parallel.data_parallel), rank 0 alone writes files, prints and
    evaluates, and the other ranks return ``{"rank": r, "step": ..., "output_dir": ...}``.
    Collectives time out after ``dist_timeout`` seconds. ``stop_after`` (tests) behaves like a
    SIGTERM after that many steps: checkpoint and return.
    """
    cfg, state = _load_resume(cfg, resume)
    _check_config(cfg)
    ctx, owns_group = _join_process_group(cfg, dist_timeout)
    sess = None
    try:
        sess = _setup(cfg, state, ctx, quiet, dist_timeout)
        del state
        step, interrupted, seconds = _train_loop(sess, progress, stop_after)
        return _end(sess, step, interrupted, seconds)
    except RuntimeError as exc:
        if ctx.distributed and _is_collective_failure(exc):
            raise DataParallelFailure(
                f"rank {ctx.rank} of {ctx.world_size}: a collective operation failed, so another rank has "
                f"probably died or stalled (see its own error above; timeout {dist_timeout:g} s). "
                f"Cause: {str(exc).strip().splitlines()[0][:300]}") from exc
        raise
    finally:
        if sess is not None and sess.metrics is not None:
            sess.metrics.close()
        del sess  # models and optimizers go before the process group (see shutdown())
        if owns_group:
            shutdown()


def _is_collective_failure(exc: BaseException) -> bool:
    """True for the errors torch.distributed raises when a peer is gone or a collective times out."""
    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc).lower()  # gloo raises plain RuntimeErrors whose text names its source file
    return "gloo" in text or "nccl" in text


def _load_resume(cfg: TrainConfig, resume: str | None) -> tuple[TrainConfig, dict | None]:
    """(config, checkpoint) of the run to continue, or (cfg, None) for a fresh run."""
    if resume is None:
        return cfg, None
    path = os.path.join(resume, "checkpoint.pt") if os.path.isdir(resume) else resume
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume {resume}: no checkpoint.pt there")
    state = ckpt.load(path)
    cfg = from_dict(state["config"])
    cfg.output_dir = os.path.dirname(os.path.abspath(path))
    return cfg, state


def _check_config(cfg: TrainConfig) -> None:
    """Refuses what cannot run, before any work starts."""
    validate(cfg)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {cfg.device}: no CUDA GPU is visible to torch on this machine "
                         f"(use --device cpu)")
    if cfg.fsdp and _env_world_size() < 2 and not (dist.is_initialized() and dist.get_world_size() > 1):
        raise SystemExit("error: --fsdp shards the networks over torchrun ranks: launch it with "
                         "torchrun --nproc_per_node=N -m mpl_fast.train --fsdp ... with N >= 2 "
                         "(one process holds the whole networks anyway: drop --fsdp)")
    placement = _placement(cfg)  # a model-parallel layout that cannot work is refused before joining any group
    if cfg.fsdp and placement.layout == "ranks" and placement.per_half < 2:
        raise SystemExit("error: --fsdp --model-parallel shards each network over its half of the torchrun ranks: "
                         "it needs 2k >= 4 processes (with 2, each rank holds its whole network anyway: drop --fsdp)")
    _precision(cfg, placement.data_device)  # e.g. fp16 on a CPU


def _env_world_size() -> int:
    """torchrun's WORLD_SIZE (1 when unset or empty; a malformed value counts as 1 here: the
    placement check (resolve_placement) and init_from_env report it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1").strip() or 1)
    except ValueError:
        return 1


def _join_process_group(cfg: TrainConfig, timeout_s: float) -> tuple[DistContext, bool]:
    """This process's place in a torchrun job, and whether this call created the process group
    (then the run also destroys it). A single process touches no torch.distributed state."""
    if _env_world_size() == 1 and not dist.is_initialized():
        return DistContext(device=torch.device(cfg.device)), False
    owns = not dist.is_initialized()
    ctx = init_from_env(torch.device(cfg.device).type, timeout_s=timeout_s)
    if ctx.world_size != dist.get_world_size():
        raise SystemExit(f"error: WORLD_SIZE={ctx.world_size} but the process group has {dist.get_world_size()} ranks")
    return ctx, owns


def _setup(cfg: TrainConfig, state: dict | None, ctx: DistContext, quiet: bool, dist_timeout: float) -> _Session:
    """Output folder, data, models (equal on every rank), and the resumed state if any."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = cfg.output_dir or _default_output_dir(cfg)
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
    placement = _placement(cfg, _device_name(cfg, ctx))
    # Model-parallel ranks: every rank creates the halves' process groups, in the same order.
    groups = (model_parallel.HalfGroups.create(ctx.world_size, ctx.rank) if placement.layout == "ranks"
              else None)
    sync = model_parallel.RankSync(placement, groups)
    data_parallel = ctx.distributed and not sync.distributed
    grouped = groups is not None and groups.per_half > 1  # layout (c): each half data parallel
    # Model-parallel peers read the same batches (only y_hat and h travel); with k ranks per half,
    # peers i and k+i read shard i of k, as data-parallel rank i of k would.
    shard_ctx = ctx if data_parallel else None
    if grouped:
        shard_ctx = DistContext(rank=groups.index, world_size=groups.per_half, local_rank=ctx.local_rank,
                                device=ctx.device)
    streams = _build_streams(cfg, shard_ctx, device=str(placement.data_device))
    grad_sync = (ShardedSync() if cfg.fsdp else GradientAverager()) if data_parallel else None
    if grouped:  # over its own half's group only
        grad_sync = (ShardedSync if cfg.fsdp else GradientAverager)(groups.half_group)
    mpl = build_mpl(cfg, streams, placement, grad_sync=grad_sync, groups=groups)
    if grouped:
        if not cfg.fsdp:  # (sharded networks were made equal before sharding, in build_mpl)
            broadcast_from_rank0(mpl.models().values(), groups.half_group)
        if groups.index > 0:  # dropout and sampled pseudo labels: a different random stream per shard
            torch.manual_seed(_rank_seed(cfg, ctx))
        say(f"model parallel x data parallel: teacher on ranks 0..{groups.per_half - 1}, student on ranks "
            f"{groups.per_half}..{ctx.world_size - 1} ({dist.get_backend()}); each half data parallel over "
            f"{groups.per_half} shards of {cfg.data.batch_size} labeled + {cfg.data.mu * cfg.data.batch_size} "
            f"unlabeled per rank per step"
            + (f"; each network sharded over its half's {groups.per_half} ranks (FSDP2)" if cfg.fsdp else ""))
    elif data_parallel:
        if not cfg.fsdp:  # (sharded networks were made equal before sharding, in build_mpl)
            broadcast_from_rank0(mpl.models().values())
        if ctx.rank > 0:  # dropout and sampled pseudo labels: a different random stream per rank
            torch.manual_seed(_rank_seed(cfg, ctx))
        say(f"data parallel: {ctx.world_size} ranks ({dist.get_backend()}), {cfg.data.batch_size} labeled + "
            f"{cfg.data.mu * cfg.data.batch_size} unlabeled per rank per step"
            + (f"; teacher, student and EMA sharded over the {ctx.world_size} ranks (FSDP2)" if cfg.fsdp else ""))
    elif placement.layout != "single":
        say(f"model parallel: teacher on {'rank 0' if sync.distributed else placement.teacher_device}, "
            f"student on {'rank 1' if sync.distributed else placement.student_device}")
    sess = _Session(cfg=cfg, ctx=ctx, out_dir=out_dir, say=say, streams=streams, mpl=mpl, sync=sync,
                    stop_agreement=StopAgreement(dist_timeout) if ctx.distributed else None)
    if cfg.fsdp and sess.evaluates:
        sess.make_replica = lambda: _make_model(cfg, streams, str(placement.data_device))
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if state is not None:
        _restore(sess, state)
        if ctx.is_main:
            _truncate_metrics(metrics_path, sess.start_step)
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


def _rank_seed(cfg: TrainConfig, ctx: DistContext) -> int:
    return cfg.seed + 7_919 * ctx.rank


def _restore(sess: _Session, state: dict) -> None:
    """Loads a checkpoint into the session (every rank reads the same file)."""
    mpl, streams, ctx = sess.mpl, sess.streams, sess.ctx
    mpl.load_state_dict(state["mpl"])
    if state["streams"] is not None:
        saved = _own_stream_state(sess, state)
        for name in ("labeled", "unlabeled"):
            getattr(streams, name).load_state_dict(saved[name])
    else:
        sess.say("warning: this checkpoint holds no data-stream position (written before the DALI streams "
                 "could save theirs): the resumed run starts its data streams from the first batch again")
    rng = state["rng"]
    if ctx.distributed:
        per_rank = state.get("rng_per_rank") or []
        rng = per_rank[ctx.rank] if len(per_rank) == ctx.world_size else None
        if rng is None:  # saved by another number of ranks: fresh per-rank streams
            torch.manual_seed(_rank_seed(cfg=sess.cfg, ctx=ctx) + int(state["step"]))
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda"):
            torch.cuda.set_rng_state_all(rng["cuda"])
    sess.start_step, sess.clock_offset = int(state["step"]), int(state["clock_offset"])
    sess.best = state["best"]
    sess.elapsed_before = float(state["elapsed"])


def _own_stream_state(sess: _Session, state: dict) -> dict:
    """This rank's saved stream states: its own under data parallel when the checkpoint holds
    one per rank for this many ranks; else rank 0's (a DALI stream of another shard then skips
    ahead, exact but decoding the consumed batches again)."""
    per_rank = state.get("streams_per_rank") or []
    if not sess.shards_data or not per_rank:
        return state["streams"]
    if len(per_rank) == sess.ctx.world_size:
        return per_rank[sess.ctx.rank]
    sess.say(f"note: the checkpoint was written by {len(per_rank)} ranks and this run has {sess.ctx.world_size}: "
             f"the data streams start from rank 0's saved position (a DALI stream of another shard skips "
             f"ahead, decoding the batches consumed so far again)")
    return state["streams"]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _checkpoint(sess: _Session, step: int, elapsed: float) -> None:
    """Rank 0 writes checkpoint.pt atomically; under torchrun every rank calls this (rank 0
    gathers each rank's RNG state and, for data parallel, each rank's stream states) and waits
    at a barrier until the file is written."""
    rng, streams = _rng_state(), _stream_states(sess)
    per_rank = _gather_per_rank(sess, rng, streams)
    state = None
    if sess.sync.distributed:  # model-parallel ranks: rank 0 gathers the student's half from rank k
        # --fsdp: each half all-gathers its network's shards first (collective within the half)
        mpl_state = sharding.full_state_dict(sess.mpl.state_dict()) if sess.cfg.fsdp else None
        state = sess.sync.gather_checkpoint(_checkpoint_state(sess, step, elapsed, rng, streams, mpl_state),
                                            student_extra={"best": sess.best, "rng": rng})
    elif sess.cfg.fsdp:  # every rank all-gathers its shards; rank 0 writes a one-process checkpoint
        mpl_state = sharding.full_state_dict(sess.mpl.state_dict())
        if sess.ctx.is_main:
            state = _checkpoint_state(sess, step, elapsed, rng, streams, mpl_state)
    elif sess.ctx.is_main:
        state = _checkpoint_state(sess, step, elapsed, rng, streams)
    if state is not None:
        if per_rank is not None:
            state["rng_per_rank"] = [mine["rng"] for mine in per_rank]
            if sess.shards_data and streams is not None:
                state["streams_per_rank"] = [mine["streams"] for mine in per_rank]
        sd = state["mpl"]
        if ckpt.all_finite([sd["student"], sd["teacher"] or {}, sd["ema"] or {}]):
            ckpt.save_atomic(state, os.path.join(sess.out_dir, "checkpoint.pt"))
        else:
            sess.say(f"warning: not checkpointing step {step}: the weights are not finite")
    if sess.ctx.distributed:
        dist.barrier()


def _stream_states(sess: _Session) -> dict | None:
    """This rank's positions in its training streams (None for a pipeline that cannot save one)."""
    if not sess.resumable:
        return None
    return {n: getattr(sess.streams, n).state_dict() for n in ("labeled", "unlabeled")}


def _gather_per_rank(sess: _Session, rng: dict, streams: dict | None) -> list | None:
    """Under torchrun, on rank 0: every rank's {"rng", "streams"} in one gather (stream states
    only where each rank reads its own shard: data parallel, model-parallel halves of k > 1
    ranks; the 2 ranks of layout (b) read the same streams, so rank 0's state is right for both).
    None in one process and on other ranks."""
    if not sess.ctx.distributed:
        return None
    mine = {"rng": rng, "streams": streams if sess.shards_data else None}
    gathered = [None] * sess.ctx.world_size if sess.ctx.is_main else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered


def _checkpoint_state(sess: _Session, step: int, elapsed: float, rng: dict, streams: dict | None,
                      mpl_state: dict | None = None) -> dict:
    return {
        "config": to_dict(sess.cfg), "step": step, "clock_offset": sess.clock_offset,
        "mpl": sess.mpl.state_dict() if mpl_state is None else mpl_state,
        "streams": streams, "rng": rng, "best": sess.best, "elapsed": elapsed,
    }


def _train_loop(sess: _Session, progress: bool, stop_after: int | None) -> tuple[int, int | None, float]:
    """Steps until cfg.steps, a signal or ``stop_after``; returns (step, signal or None, seconds)."""
    cfg, mpl, ctx = sess.cfg, sess.mpl, sess.ctx
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=cfg.steps, initial=sess.start_step, desc=f"{cfg.method} {cfg.preset}",
                   dynamic_ncols=True, disable=None)
    t0 = time.perf_counter()
    clock = {"t_log": t0, "step_log": sess.start_step, "t0": t0}
    labeled, unlabeled = sess.streams.labeled, sess.streams.unlabeled
    interrupted = None
    step = sess.start_step
    try:
        with _Signals() as signals:
            while step < cfg.steps:
                mpl.step(next(labeled), next(unlabeled), clock=step - sess.clock_offset)
                step += 1
                if step % cfg.log_every == 0 or step == cfg.steps:
                    _log_interval(sess, step, clock, bar)
                if bar is not None:
                    bar.update(1)
                if step % cfg.eval_every == 0 and step < cfg.steps and sess.joins_evaluation:
                    _evaluate(sess, step, sess.elapsed_before + time.perf_counter() - t0)
                # One process acts on a signal after the step it came in; data-parallel ranks
                # must agree on the step, so they act on it one step later (StopAgreement).
                if ctx.distributed:
                    stop_requested = sess.stop_agreement.poll(signals.received is not None)
                else:
                    stop_requested = signals.received is not None
                if stop_requested or (stop_after is not None and step - sess.start_step >= stop_after):
                    interrupted = signals.received or signal.SIGTERM
                    break
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    _checkpoint(sess, step, sess.elapsed_before + time.perf_counter() - t0)
        if sess.stop_agreement is not None:
            sess.stop_agreement.drain()  # the last flag every rank posted
    finally:
        if bar is not None:
            bar.close()
    return step, interrupted, sess.elapsed_before + time.perf_counter() - t0


def _log_interval(sess: _Session, step: int, clock: dict, bar) -> None:
    """Writes one metrics line (rank 0) and checks the skip counters: the one host read per
    interval. Under data parallel the totals are already global-batch averages, equal on every
    rank (the step averages its losses with the teacher's gradients), so no collective is needed."""
    cfg, mpl = sess.cfg, sess.mpl
    totals, n = mpl.take_totals()
    keys = list(totals)
    values = torch.stack([totals[k] for k in keys] + [mpl.skipped_total.float(),
                                                      mpl.max_consecutive_skips.float()]).tolist()
    now = time.perf_counter()
    line = {"step": step, **{k: v / max(n, 1) for k, v in zip(keys, values)},
            "skipped_total": int(values[-2]), "lr_teacher": mpl.schedules.teacher(step - 1 - sess.clock_offset),
            "lr_student": mpl.schedules.student(step - 1 - sess.clock_offset),
            "steps_per_s": (step - clock["step_log"]) / max(now - clock["t_log"], 1e-9),
            "seconds": sess.elapsed_before + now - clock["t0"]}
    if sess.ctx.distributed:
        line["world_size"] = sess.ctx.world_size
    clock["t_log"], clock["step_log"] = now, step
    sess.clock_offset = int(values[-2])  # the schedule clock counts applied steps only
    sess.write_metrics(line)
    if bar is not None:
        bar.set_postfix(sps=f"{line['steps_per_s']:.1f}", lt=f"{line['loss_teacher']:.3f}",
                        ls=f"{line['loss_student']:.3f}", h=f"{line['h']:+.2e}", refresh=False)
    if values[-1] >= cfg.max_nonfinite:
        raise TrainingStopped(
            f"stopped at step {step}: {cfg.max_nonfinite} steps in a row had a non-finite loss or h"
            f"{' or overflowing fp16 gradients' if mpl.grad_scaler or mpl.student_grad_scaler else ''} (all of them skipped; {int(values[-2])} skipped in total). Lower the learning rates "
            f"or check the data; the last checkpoint holds the last finite state.")


def _end(sess: _Session, step: int, interrupted: int | None, seconds: float) -> dict:
    """Checkpoint; then, unless interrupted, rank 0 evaluates, finetunes and writes summary.json
    (the student's rank of a model-parallel run evaluates and finetunes what it holds)."""
    if interrupted is not None:
        _checkpoint(sess, step, seconds)
        sess.say(f"stopped by signal {interrupted} at step {step}; checkpoint saved. "
                 f"Continue with: python -m mpl_fast.train --resume {sess.out_dir}")
        return {"interrupted": True, "step": step, "output_dir": sess.out_dir}
    final = _evaluate(sess, step, seconds) if sess.joins_evaluation else None
    _checkpoint(sess, step, seconds)
    summary = _finish(sess, step, seconds, final) if sess.evaluates else None
    if not sess.ctx.is_main:  # the student's rank of a model-parallel run has the summary too
        return summary if summary is not None else {"rank": sess.ctx.rank, "step": step, "output_dir": sess.out_dir}
    with open(os.path.join(sess.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    sess.say(_format_summary(summary))
    return summary


def _models_to_evaluate(sess: _Session) -> dict:
    """The networks as evaluation sees them: the live ones; under --fsdp, every rank all-gathers
    each network's weights and rank 0 loads them into its unsharded replicas (the other ranks get
    nothing). Every forward of a sharded network is collective, so rank 0 alone cannot run one."""
    models = sess.mpl.models()
    if not sess.cfg.fsdp:
        return models
    replicas = {}
    for name, model in models.items():
        state = sharding.full_state_dict(model.state_dict())  # collective: every rank
        if sess.make_replica is None:
            continue
        if name not in sess.replicas:  # built once; its random init must not move the run's RNG
            with torch.random.fork_rng(devices=[]):
                sess.replicas[name] = sess.make_replica()
        sess.replicas[name].load_state_dict(state)
        replicas[name] = sess.replicas[name]
    return replicas


def _evaluate(sess: _Session, step: int, seconds: float) -> dict | None:
    """Validation (selection) and test (report only) accuracy of every model; keeps the best-val weights.
    Model-parallel ranks each measure the networks they hold; rank 0 writes the merged line.
    Under --fsdp every rank calls this (to gather the weights) and only rank 0 measures (the
    others get None)."""
    models = _models_to_evaluate(sess)
    if not sess.evaluates:
        return None
    sess.evaluated_models = models
    cfg, streams, best = sess.cfg, sess.streams, sess.best
    line = {"step": step, "eval": True, "seconds": seconds}
    for name, model in models.items():
        line[f"val_{name}"] = accuracy(model, streams.val)
        line[f"test_{name}"] = accuracy(model, streams.test)
    line = sess.sync.merge(line)
    sel = _selection_model(cfg)
    val = line.get(f"val_{sel}")
    if val is not None and val > best["val"]:
        best.update(val=val, step=step,
                    state={k: v.detach().cpu().clone() for k, v in models[sel].state_dict().items()}
                    if sel in models else None)
    sess.write_metrics(line)
    return line


def _finish(sess: _Session, step: int, seconds: float, final: dict) -> dict:
    """Final accuracies, the finetuned student, and the summary dict. ``final`` is the last
    evaluation's line (every model's accuracies at this step, merged across model-parallel
    ranks): the models have not changed since, so they are not measured again."""
    cfg, mpl, streams, best = sess.cfg, sess.mpl, sess.streams, sess.best
    val = {k[len("val_"):]: v for k, v in final.items() if k.startswith("val_")}
    test = {k[len("test_"):]: v for k, v in final.items() if k.startswith("test_")}
    models = sess.evaluated_models  # what the final evaluation measured (--fsdp: rank 0's replicas)
    if _selection_model(cfg) in models:  # model parallel: on the rank that holds it
        _finish_selected(cfg, models, streams, best, val, test, quiet=not sess.ctx.is_main)
    val, test = sess.sync.merge(val), sess.sync.merge(test)
    headline = _headline_model(cfg)
    if headline == "ema" or headline == "student":
        headline = "selected" if best["step"] >= 0 else headline
    sess.write_metrics({"step": step, "final": True, **{f"val_{k}": v for k, v in val.items()},
                        **{f"test_{k}": v for k, v in test.items()}})
    sel = _selection_model(cfg)
    return {
        "method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "steps": step, "seconds": round(seconds, 2),
        "feedback": cfg.mpl.feedback if cfg.method == "mpl" else None,
        "test_top1": test, "val_top1": val, "selected": {"model": sel, "step": best["step"], "val": best["val"]},
        "headline": {"model": headline, "test_top1": test.get(headline)},
        "skipped_steps": int(mpl.skipped_total), "output_dir": cfg.output_dir,
    }


def _finish_selected(cfg: TrainConfig, models: dict, streams, best: dict, val: dict, test: dict,
                     quiet: bool) -> None:
    """The best-validation weights of the selection model (one of ``models``, unsharded), then
    finetuned; their accuracies into val/test."""
    selected = copy.deepcopy(models[_selection_model(cfg)])
    if best["state"] is not None:  # best on validation (never on test)
        selected.load_state_dict(best["state"])
    val["selected"], test["selected"] = accuracy(selected, streams.val), accuracy(selected, streams.test)
    if cfg.finetune.steps > 0 and cfg.method != "uda":
        from tqdm import tqdm  # noqa: PLC0415

        device = next(selected.parameters()).device  # model-parallel: the student's device
        batches = ((x.to(device), y.to(device)) for x, y in larger_batches(streams.labeled, cfg.finetune.batch_size))
        with tqdm(total=cfg.finetune.steps, desc="finetune student", dynamic_ncols=True,
                  disable=True if quiet else None) as bar:
            finetune(selected, batches, cfg.finetune.steps, cfg.finetune.lr, cfg.finetune.momentum,
                     cfg.finetune.weight_decay, on_step=bar.update)
        val["finetuned"], test["finetuned"] = accuracy(selected, streams.val), accuracy(selected, streams.test)


def _format_summary(s: dict) -> str:
    names = [k for k in ("student", "ema", "teacher", "selected", "finetuned") if k in s["test_top1"]]
    fmt = lambda v: "  -  " if v is None else f"{v:5.1f}"  # noqa: E731
    rows = [f"{'model':<10} {'val':>6} {'test':>6}"]
    rows += [f"{n:<10} {fmt(s['val_top1'][n]):>6} {fmt(s['test_top1'][n]):>6}" for n in names]
    return (f"\n{s['method']} on {s['preset']} (seed {s['seed']}, {s['steps']} steps, {s['seconds']:.1f} s, "
            f"{s['skipped_steps']} skipped)\n" + "\n".join(rows) +
            f"\n=> {s['method']}: test top-1 {s['headline']['test_top1']:.2f}% ({s['headline']['model']})\n"
            f"   written to {s['output_dir']}")


def _truncate_metrics(path: str, step: int) -> None:
    """Drops metric lines written after the checkpoint a run resumes from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        world_size = _env_world_size()
        plan_for = {}
        if cfg.fsdp and world_size > 1:
            plan_for["fsdp_devices"] = world_size
        if cfg.model_parallel and world_size > 2 and world_size % 2 == 0:  # layout (c): 2k ranks
            plan_for.update(model_parallel_ranks=world_size, sharded_halves=cfg.fsdp)
        print(dry_run_report(cfg, **plan_for))
        return 0
    try:
        run(cfg, resume=args.resume, dist_timeout=args.dist_timeout)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except DataParallelFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
