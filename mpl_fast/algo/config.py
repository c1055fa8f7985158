"""The algorithm's own settings: which method, which feedback, which pseudo labels, the
optimizers' schedules and the numbers of the MPL step. The choices are declared once, as
Literal types on the fields; the trainer's flags take their choices from these types and
``check_choices`` checks any config tree against them."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Literal

Method = Literal["mpl", "uda", "pseudo-labels", "supervised", "reduced-mpl"]
Feedback = Literal["grad-dot", "update-dot", "finite-diff"]
PseudoLabels = Literal["hard", "soft", "sample"]
Baseline = Literal["auto", "on", "off"]
Schedule = Literal["cosine", "constant"]

METHODS: tuple[str, ...] = typing.get_args(Method)
FEEDBACK_MODES: tuple[str, ...] = typing.get_args(Feedback)
PSEUDO_LABEL_KINDS: tuple[str, ...] = typing.get_args(PseudoLabels)


@dataclass
class OptimConfig:
    """SGD (Nesterov) with linear warm-up then cosine decay (or a constant rate)."""

    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    schedule: Schedule = "cosine"
    min_lr_ratio: float = 0.0       # cosine ends at lr * min_lr_ratio
    grad_clip: float = 0.0          # global-norm clip (0 = off)


@dataclass
class MPLConfig:
    """The MPL step: pseudo labels, feedback h, UDA on the teacher, label smoothing, the EMA.

    The defaults are the plain algorithm (no label smoothing, no EMA); the trainer's presets
    set every number of a recipe."""

    feedback: Feedback = "grad-dot"
    pseudo_labels: PseudoLabels = "hard"  # the same label for the student and the MPL term
    soft_temperature: float = 0.5   # soft pseudo labels = softmax(T(x_strong) / soft_temperature)
    baseline: Baseline = "auto"     # subtract a moving average of h ("auto": for finite-diff only)
    baseline_decay: float = 0.99    # decay of that moving average
    mpl_weight: float = 1.0         # multiplies the MPL term h * CE(y_hat, T(x_strong))
    sup_weight: float = 1.0         # multiplies the teacher's supervised CE (0: feedback-only teacher)
    uda_weight: float = 8.0         # 0 disables UDA consistency on the teacher
    uda_ramp_steps: int = 5000      # linear ramp of the UDA weight
    uda_temperature: float = 0.7
    uda_threshold: float = 0.6
    label_smoothing: float = 0.0    # on the teacher's supervised CE
    student_wait_steps: int = 3000  # the student (and so h) starts after this many steps
    ema_decay: float = 0.0          # student EMA (0 disables)


def literal_choices(tp) -> tuple | None:
    """The values of a Literal type (also inside ``X | None``), else None."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp):
        if typing.get_origin(arg) is Literal:
            return typing.get_args(arg)
    return None


def check_choices(cfg, prefix: str = "") -> None:
    """Refuses a value outside its field's Literal choices, anywhere in a dataclass tree, with
    one sentence naming the field (dotted from ``prefix``)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            check_choices(value, name + ".")
            continue
        choices = literal_choices(hints[f.name])
        if choices is not None and value not in choices and not (value is None and type(None) in
                                                                 typing.get_args(hints[f.name])):
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
