"""Memory planning before renting GPUs: build a network on the meta device (no memory, no
download), count its parameters, and estimate the per-device memory of an MPL step.

What one MPL step keeps alive at its peak (the step: docs/algorithm.md):
- for each network: fp32 parameters, their gradients, the SGD momentum buffer;
- the student's saved pseudo-label gradient g_u (one more parameter-sized buffer);
- the teacher's activations over labeled + weak + strong batches, B * (1 + 2 * mu) images: the
  teacher's graph stays alive across the student step, because its MPL term needs h;
- the student's activations over its larger batch, mu * B strong images (its labeled forward
  comes after that graph is freed).

Activations are counted by running the network on meta tensors with hooks on every leaf module
and summing their outputs' sizes: an estimate (it ignores allocator slack, workspaces and the
buffers autograd frees early), good for choosing between layouts, not a guarantee.
With activation checkpointing (--activation-checkpointing) a checkpointed block keeps only its
input until the backward, which recomputes one block at a time: the estimate counts the leaves
outside blocks, every block's input, and the largest block's own leaf outputs once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
LAYOUTS = ("single", "model-parallel", "fsdp")


@dataclass
class NetworkFootprint:
    parameters: int
    activation_elements_per_image: int

    def state_bytes(self, extra_param_buffers: int = 0) -> int:
        """fp32 weights + gradients + momentum (+ extra parameter-sized buffers such as g_u)."""
        return self.parameters * 4 * (3 + extra_param_buffers)


@dataclass
class MemoryPlan:
    layout: str
    devices: int
    precision: str
    teacher_parameters: int
    student_parameters: int
    per_device_bytes: list[int]

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        gib = [f"{b / 2**30:.1f} GiB" for b in self.per_device_bytes]
        return (f"teacher {self.teacher_parameters / 1e6:.1f}M parameters, student "
                f"{self.student_parameters / 1e6:.1f}M parameters; layout {self.layout} on "
                f"{self.devices} device(s), {self.precision} activations: per device " + ", ".join(gib))


def measure_footprint(model: nn.Module, input_shape: tuple[int, ...],
                      activation_checkpointing: bool = False) -> NetworkFootprint:
    """Parameter count and activation elements per image of ``model`` (built on the meta device);
    with ``activation_checkpointing``, what its checkpointed blocks keep instead (module docstring)."""
    from mpl_fast.models.checkpointing import find_checkpoint_units  # noqa: PLC0415

    parameters = sum(p.numel() for p in model.parameters())
    units = find_checkpoint_units(model) if activation_checkpointing else []
    unit_of = {m: i for i, unit in enumerate(units) for m in unit.modules()}
    counted = [0]                      # leaf outputs outside any checkpointed block, and block inputs
    inside = [0] * len(units)          # each block's own leaf outputs (recomputed in the backward)

    def count_output(module, _inputs, output):
        if isinstance(output, torch.Tensor):
            if module in unit_of:
                inside[unit_of[module]] += output.numel()
            else:
                counted[0] += output.numel()

    def count_input(_module, inputs):
        counted[0] += sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(count_output) for m in leaves]
    handles += [unit.register_forward_pre_hook(count_input) for unit in units]
    was_training = model.training
    try:
        model.train()
        with torch.no_grad():
            model(torch.empty((1, *input_shape), device="meta"))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return NetworkFootprint(parameters=parameters, activation_elements_per_image=counted[0] + max(inside, default=0))


def plan_mpl_memory(teacher: NetworkFootprint, student: NetworkFootprint, *, batch_size: int, mu: int,
                    precision: str = "fp32", layout: str = "single", devices: int = 1,
                    sharded: bool = False) -> MemoryPlan:
    """Per-device peak memory of one MPL step for a layout; ``batch_size`` is per device.

    single:         both networks on each device (data parallel replicates this).
    model-parallel: the teacher on one device, the student on another (devices = 2); or on 2k
                    torchrun ranks, the teacher on the first k, the student on the last k, each
                    half data parallel (every device at ``batch_size``), and with ``sharded``
                    (--fsdp) each network's state divided over its k ranks.
    fsdp:           both networks sharded over ``devices`` (states divided; activations not).
    """
    if precision not in BYTES_PER_ELEMENT:
        raise ValueError(f"precision must be one of {tuple(BYTES_PER_ELEMENT)}, got {precision!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if batch_size < 1 or mu < 0 or devices < 1:
        raise ValueError(f"need batch_size >= 1, mu >= 0, devices >= 1; got {batch_size}, {mu}, {devices}")
    act = BYTES_PER_ELEMENT[precision]
    teacher_acts = teacher.activation_elements_per_image * batch_size * (1 + 2 * mu) * act
    student_acts = student.activation_elements_per_image * batch_size * max(mu, 1) * act
    teacher_state = teacher.state_bytes()
    student_state = student.state_bytes(extra_param_buffers=1)  # + g_u
    if layout == "single":
        per_device = [teacher_state + student_state + teacher_acts + student_acts] * devices
    elif layout == "model-parallel":
        if devices < 2 or devices % 2:
            raise ValueError(f"layout 'model-parallel' places teacher and student on 2 devices, or on 2k ranks "
                             f"(k per network): devices must be even, got devices={devices}")
        k = devices // 2
        per_network = k if sharded else 1
        per_device = ([teacher_state // per_network + teacher_acts] * k
                      + [student_state // per_network + student_acts] * k)
    else:
        shard = (teacher_state + student_state) // devices
        per_device = [shard + teacher_acts + student_acts] * devices
    return MemoryPlan(layout=layout, devices=devices, precision=precision,
                      teacher_parameters=teacher.parameters, student_parameters=student.parameters,
                      per_device_bytes=per_device)


def plan_reduced_memory(student: NetworkFootprint, reduced_teacher_parameters: int, num_classes: int, *,
                        batch_size: int, mu: int, precision: str = "fp32", shards: int = 1) -> int:
    """Per-device peak memory of one reduced-MPL step (batch_size per device; data parallel
    replicates it): the student's state, g_u and activations over its mu * B strong images as
    in full MPL; the reduced teacher T_R's state (fp32) and its activations over the batch's
    stored distributions (B * mu fp32 class vectors, a few per layer); no large teacher.
    ``shards`` (--fsdp): the student's and T_R's states divided over that many devices."""
    if precision not in BYTES_PER_ELEMENT:
        raise ValueError(f"precision must be one of {tuple(BYTES_PER_ELEMENT)}, got {precision!r}")
    student_acts = student.activation_elements_per_image * batch_size * max(mu, 1) * BYTES_PER_ELEMENT[precision]
    t_r_state = reduced_teacher_parameters * 4 * 3
    t_r_acts = 4 * batch_size * max(mu, 1) * num_classes * 4  # input, log, residual, output (hidden is smaller)
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    return (student.state_bytes(extra_param_buffers=1) + t_r_state) // shards + student_acts + t_r_acts


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _reduced_report(cfg, model, footprint: NetworkFootprint, num_classes: int, shape, fsdp_devices: int) -> str:
    """--dry-run for --method reduced-mpl: the student, T_R and the student's activations."""
    from mpl_fast.reduced.store import bytes_per_image  # noqa: PLC0415
    from mpl_fast.reduced.teacher import ReducedTeacher  # noqa: PLC0415

    t_r = sum(p.numel() for p in ReducedTeacher(num_classes, cfg.reduced.hidden).parameters())
    lines = [f"{cfg.preset}: reduced MPL, student {cfg.model.name} with {footprint.parameters:,} parameters, "
             f"reduced teacher T_R (MLP, hidden {cfg.reduced.hidden}) with {t_r:,}; input {shape}, labeled batch "
             f"{cfg.data.batch_size}, unlabeled {cfg.data.mu}x that (strong view + the large teacher's stored "
             f"distributions)",
             "estimated peak memory of one reduced-MPL step per device (student weights, gradients, momentum, g_u, "
             "activations; T_R; no large teacher):"]
    for precision in ("fp32", "bf16"):
        reduced = plan_reduced_memory(footprint, t_r, num_classes, batch_size=cfg.data.batch_size, mu=cfg.data.mu,
                                      precision=precision)
        full = plan_mpl_memory(footprint, footprint, batch_size=cfg.data.batch_size, mu=cfg.data.mu,
                               precision=precision).per_device_bytes[0]
        lines.append(f"  {precision:4s} activations, one device (data parallel: the same on each): "
                     f"{_size(reduced)} (full MPL with a teacher of the same architecture: {_size(full)})")
        if cfg.fsdp:
            sharded = plan_reduced_memory(footprint, t_r, num_classes, batch_size=cfg.data.batch_size,
                                          mu=cfg.data.mu, precision=precision, shards=fsdp_devices)
            lines.append(f"  {precision:4s} activations, --fsdp over {fsdp_devices} devices: {_size(sharded)} each "
                         "(student and T_R sharded; for evaluation rank 0 also holds whole fp32 copies of the "
                         "student and its EMA)")
    per_image = bytes_per_image(8, num_classes)
    lines.append(f"the large teacher's labels (python -m mpl_fast.label, top-8): {per_image} bytes an image, "
                 f"{per_image * 100e6 / 1e9:.1f} GB for 100M images, read from disk (memory-mapped)")
    lines.append("an estimate (leaf-module outputs, no allocator slack or workspaces); see mpl_fast/train/plan.py")
    return "\n".join(lines)


# Classes and input shape per data set, for --dry-run (which reads no data); image folders are
# taken to be ImageNet.
_DRY_RUN_SHAPES = {"digits": (10, (1, 8, 8)), "two-moons": (2, (2,)), "cifar10": (10, (3, 32, 32)),
                   "cifar100": (100, (3, 32, 32)), "svhn": (10, (3, 32, 32)), "imagefolder": (1000, (3, 224, 224))}


def dry_run_report(cfg, fsdp_devices: int = 8, model_parallel_ranks: int = 2, sharded_halves: bool = False) -> str:
    """``--dry-run``: parameter counts and per-device memory of one MPL step for ``cfg`` (a
    TrainConfig), from meta-device models. ``model_parallel_ranks`` (2k, under torchrun with
    --model-parallel) plans rank groups; ``sharded_halves`` with --fsdp."""
    from mpl_fast.models import create_model  # noqa: PLC0415 - models import timm: only when asked
    from mpl_fast.models.checkpointing import find_checkpoint_units  # noqa: PLC0415

    num_classes, shape = _DRY_RUN_SHAPES[cfg.data.dataset]
    if cfg.data.image_size and len(shape) == 3:
        shape = (shape[0], cfg.data.image_size, cfg.data.image_size)
    with torch.device("meta"):
        model = create_model(cfg.model.name, num_classes, dropout=cfg.model.dropout,
                             in_channels=shape[0] if len(shape) == 3 else 1)
    checkpointing = getattr(cfg, "activation_checkpointing", False)
    # teacher and student share the architecture
    footprint = measure_footprint(model, shape, activation_checkpointing=checkpointing)
    if cfg.method == "reduced-mpl":
        return _reduced_report(cfg, model, footprint, num_classes, shape, fsdp_devices)
    unlabeled = (f"unlabeled: the whole pool each step (--data.full-unlabeled-batch; the estimate counts only "
                 f"{cfg.data.mu}x the labeled batch)" if cfg.data.full_unlabeled_batch
                 else f"unlabeled {cfg.data.mu}x that (weak + strong)")
    lines = [f"{cfg.preset}: {cfg.model.name}, {footprint.parameters:,} parameters per network "
             f"(teacher and student), input {shape}, labeled batch {cfg.data.batch_size}, {unlabeled}",
             "estimated peak memory of one MPL step per device (weights, gradients, momentum, g_u, activations):"]
    if checkpointing:
        plain = measure_footprint(model, shape)
        lines.insert(1, f"activation checkpointing: {len(find_checkpoint_units(model))} blocks keep only their "
                        f"inputs: {footprint.activation_elements_per_image:,} activation values per image instead "
                        f"of {plain.activation_elements_per_image:,}")
    for precision in ("fp32", "bf16"):
        for layout, devices in (("single", 1), ("model-parallel", model_parallel_ranks), ("fsdp", fsdp_devices)):
            plan = plan_mpl_memory(footprint, footprint, batch_size=cfg.data.batch_size, mu=cfg.data.mu,
                                   precision=precision, layout=layout, devices=devices,
                                   sharded=sharded_halves and layout == "model-parallel")
            if layout == "model-parallel":  # the teacher's and the student's devices differ: say which is which
                teacher_b, student_b = plan.per_device_bytes[0], plan.per_device_bytes[-1]
                per_device = f"{teacher_b / 2**30:.1f}, {student_b / 2**30:.1f} GiB (teacher, student)"
                if devices > 2:
                    per_device = per_device[:-1] + f"; each of {devices // 2} ranks per network)"
            else:
                per_device = ", ".join(f"{b / 2**30:.1f}" for b in sorted(set(plan.per_device_bytes), reverse=True))
                per_device += " GiB"
            lines.append(f"  {precision:4s} activations, {layout:14s} on {devices} device(s): {per_device}")
    if model_parallel_ranks > 2:
        k = model_parallel_ranks // 2
        lines.append(f"model-parallel on {model_parallel_ranks} torchrun ranks: ranks 0..{k - 1} the teacher, "
                     f"{k}..{model_parallel_ranks - 1} the student, each rank at batch {cfg.data.batch_size} (the "
                     f"global batch is {k}x that); each network "
                     + (f"sharded over its {k} ranks (--fsdp): 1/{k} of its state per rank (for evaluation "
                        f"rank 0 also gathers a whole teacher, rank {k} a whole student and EMA)"
                        if sharded_halves else "whole on every rank of its half (--fsdp would divide it by "
                        f"{k})"))
    else:
        lines.append("model-parallel: the same on two devices of one process (--model-parallel --teacher-device ... "
                     "--student-device ...) or on two torchrun ranks (rank 0 the teacher, rank 1 the student)")
    lines.append("fsdp (--fsdp under torchrun): the training step's share per rank; for evaluation rank 0 also "
                 "holds one whole fp32 copy each of student, EMA and teacher, and one network's forward")
    lines.append("an estimate (leaf-module outputs, no allocator slack or workspaces); see mpl_fast/train/plan.py")
    return "\n".join(lines)
