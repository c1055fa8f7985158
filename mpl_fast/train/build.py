"""The trainer's builders, public so that tests and benchmarks build exactly what a run builds:
data streams, networks, optimizers, precision and the MPL step object (the placement comes
from mpl_fast.train.topology)."""

from __future__ import annotations

import copy
import os

import torch

from mpl_fast.algo import MPL, GradClip, GradientSync, OptimConfig, Schedules, StepPrecision
from mpl_fast.algo.param_groups import weight_decay_groups
from mpl_fast.models import create_model
from mpl_fast.models.checkpointing import enable_activation_checkpointing
from mpl_fast.models.speed import compile_modules, to_channels_last, use_channels_last
from mpl_fast.optim import FusedSGD
from mpl_fast.parallel import model_parallel, sharding
from mpl_fast.parallel.data_parallel import broadcast_from_rank0
from mpl_fast.parallel.distributed import DistContext
from mpl_fast.train.config import ModelConfig, TrainConfig
from mpl_fast.train.precision import PrecisionPolicy, resolve_precision
from mpl_fast.train.topology import resolve_topology


def build_streams(cfg: TrainConfig, ctx: DistContext | None = None, device: str | None = None):
    """The data streams for ``cfg`` (batches on ``device``, default this rank's); under data
    parallel, ``ctx``'s shard of them (a rank pair's ranks pass no ``ctx``: the same batches;
    rank groups' ranks pass their shard index and k)."""
    from mpl_fast.data import build_streams as data_streams  # noqa: PLC0415

    ctx = ctx or DistContext(device=torch.device(cfg.device))
    reduced = cfg.method == "reduced-mpl"
    try:
        streams = data_streams(cfg.data, seed=cfg.seed, rank=ctx.rank, world_size=ctx.world_size,
                               device=device or device_name(cfg, ctx), with_indices=reduced)
        return with_stored_labels(cfg, streams) if reduced else streams
    except ModuleNotFoundError as exc:
        if "mpl_fast.data.files" in str(exc):
            raise SystemExit(f"error: preset {cfg.preset!r} reads {cfg.data.dataset} files from disk, and the "
                             f"file-based data sets (mpl_fast.data.files) are not in this build of mpl_fast yet; "
                             f"the embedded presets (digits, two-moons) work without them.") from None
        raise
    except (FileNotFoundError, NotADirectoryError) as exc:  # missing or malformed data directory
        raise SystemExit(f"error: {exc}") from None


def with_stored_labels(cfg: TrainConfig, streams):
    """Reduced MPL: the unlabeled stream yields (p, strong), p the large teacher's stored
    distributions of the batch's images, after the store was checked against the images this
    run's unlabeled stream draws (--data.unlabeled-dir's, else the training set's) and its class
    count (one sentence if it does not belong to them)."""
    from mpl_fast.reduced.stream import StoredTeacherInputs, open_store_for_run  # noqa: PLC0415

    if cfg.reduced.labels is None:  # (not refused by validate: --dry-run needs no labels)
        raise SystemExit("error: --method reduced-mpl reads the large teacher's stored labels: pass --reduced.labels "
                         "DIR (written by python -m mpl_fast.label)")
    try:
        store = open_store_for_run(cfg.reduced.labels, cfg.data, streams.num_classes)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:  # StoreError is a ValueError
        named = "--reduced.labels" in str(exc) or "--data.unlabeled-dir" in str(exc)
        message = str(exc) if named else f"--reduced.labels: {exc}"
        raise SystemExit(f"error: {message}") from None
    streams.unlabeled = StoredTeacherInputs(streams.unlabeled, store)
    return streams


def build_reduced_teacher(cfg: TrainConfig, streams, device) -> torch.nn.Module:
    """T_R for --method reduced-mpl: identity at init, fp32, on the student's device."""
    from mpl_fast.reduced.teacher import ReducedTeacher  # noqa: PLC0415

    try:
        return ReducedTeacher(streams.num_classes, cfg.reduced.hidden, cfg.reduced.min_prob).to(device)
    except ValueError as exc:
        raise SystemExit(f"error: --reduced.*: {exc}") from None


def device_name(cfg: TrainConfig, ctx: DistContext) -> str:
    """cfg.device in a single process; this rank's device (cuda:LOCAL_RANK) under torchrun."""
    return str(ctx.device) if ctx.distributed else cfg.device


def input_channels(input_shape: tuple) -> int:
    """The channels of one example: C of a (C, H, W) image, else 1 (points, flat features)."""
    return input_shape[0] if len(input_shape) == 3 else 1


def create_network(model: ModelConfig, num_classes: int, input_shape: tuple) -> torch.nn.Module:
    """A fresh network of the run's architecture for examples of ``input_shape``, on the CPU in
    its default layout: build_model's first step, and how mpl_fast.load rebuilds a saved one."""
    return create_model(model.name, num_classes, dropout=model.dropout, in_channels=input_channels(input_shape))


def build_model(cfg: TrainConfig, streams, device: str) -> torch.nn.Module:
    """One network of the run (teacher and student share the architecture) on ``device``."""
    model = create_network(cfg.model, streams.num_classes, streams.input_shape).to(device)
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


def build_optimizer(model: torch.nn.Module, opt: OptimConfig) -> torch.optim.Optimizer:
    # torch.optim.SGD's math in one fused pass per step; it leaves p.grad untouched, so the
    # grad-dot feedback can still read g_u from .grad after the student's step.
    return FusedSGD(weight_decay_groups(model, opt.weight_decay, opt.decay_norm), lr=opt.lr, momentum=opt.momentum,
                    nesterov=opt.nesterov and opt.momentum > 0, weight_decay=opt.weight_decay)


def build_mpl(cfg: TrainConfig, streams, placement: model_parallel.Placement | None = None, *,
              grad_sync: GradientSync | None = None, groups: model_parallel.HalfGroups | None = None) -> MPL:
    """Teacher, student (distinct random inits), optimizers and the MPL step object for ``cfg``.

    ``placement`` (default: the run's, mpl_fast.train.topology) puts each network on its device; a process
    that holds one half of a model-parallel run builds only that network. ``grad_sync``
    averages gradients under data parallel. ``groups``: this rank's place among model-parallel
    ranks (its peer; with --fsdp, its half's group shards the network)."""
    placement = placement or resolve_topology(cfg).placement
    # The teacher's rank of a rank pair builds the student too (on the CPU, then drops it), so
    # that the teacher starts from the same random weights as in one process.
    student = build_model(cfg, streams, placement.student_device or "cpu")
    reduced = cfg.method == "reduced-mpl"
    if reduced:  # after the student: its random init is the same as in the other methods' runs
        teacher = build_reduced_teacher(cfg, streams, placement.student_device or "cpu")
    else:
        teacher = build_model(cfg, streams, placement.teacher_device) if placement.teacher_device is not None \
            and cfg.method != "supervised" else None
    if placement.student_device is None:
        student = None
    ema_module = None
    if cfg.fsdp:
        ema_module = shard_networks(cfg, teacher, student, placement.data_device,
                                    groups.half_group if groups is not None else None)
    precision = build_precision(cfg, placement.data_device)
    mpl = MPL(teacher, student, build_optimizer(teacher, cfg.teacher) if teacher is not None else None,
              build_optimizer(student, cfg.student) if student is not None else None,
              Schedules.for_run(cfg.steps, cfg.method, cfg.teacher, cfg.student, cfg.mpl), cfg.mpl,
              method=cfg.method, clip=GradClip(teacher=cfg.teacher.grad_clip, student=cfg.student.grad_clip),
              precision=StepPrecision(
                  autocast=precision.autocast,
                  student_autocast=precision.student_autocast(placement.student_device or "cpu", cfg.amp_student),
                  grad_scaler=precision.grad_scaler() if teacher is not None and not reduced else None,
                  student_grad_scaler=(precision.student_grad_scaler(placement.student_device, cfg.amp_student)
                                       if student is not None else None)),
              grad_sync=grad_sync,
              link=model_parallel.make_link(placement, cfg.mpl.pseudo_labels, streams.num_classes, groups),
              ema_module=ema_module)
    if cfg.compile:  # after MPL took the EMA copy: only the teacher's and student's forwards compile
        compile_modules(None if reduced else mpl.teacher, mpl.student)  # T_R is too small to gain
    return mpl


def shard_networks(cfg: TrainConfig, teacher, student, device, group=None) -> torch.nn.Module | None:
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


def build_precision(cfg: TrainConfig, teacher_device=None) -> PrecisionPolicy:
    """--amp [--amp-dtype]: autocast of the teacher's forward, bf16 where supported (CPU and GPU),
    else fp16 with loss scaling (GPU only). MPL_FAST_ALLOW_CPU_FP16=1 lets tests run fp16 on a CPU."""
    try:
        return resolve_precision(cfg.amp, cfg.amp_dtype, teacher_device or cfg.device,
                                 allow_cpu_fp16=os.environ.get("MPL_FAST_ALLOW_CPU_FP16") == "1")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
