"""Learning-rate schedules: linear warm-up, then cosine decay (or constant); the student's
schedule starts only after its wait (its rate is exactly 0 before)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mpl_fast.algo.config import MPLConfig, OptimConfig


def warmup_cosine(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0,
                  schedule: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """The rate at ``step`` (0-based) of a run of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def delayed(step: int, wait_steps: int, total_steps: int, base_lr: float, **kwargs) -> float:
    """``warmup_cosine`` started at ``wait_steps``: 0 before, then its own warm-up and decay."""
    if step < wait_steps:
        return 0.0
    return warmup_cosine(step - wait_steps, max(1, total_steps - wait_steps), base_lr, **kwargs)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def linear_ramp(step: int, ramp_steps: int, weight: float) -> float:
    """UDA's weight ramp: weight * min(1, step / ramp_steps)."""
    return weight if ramp_steps <= 0 else weight * min(1.0, step / ramp_steps)


@dataclass
class Schedules:
    """Base rates and shapes of the two learning-rate schedules and of the UDA ramp."""

    total_steps: int
    teacher_lr: float
    student_lr: float
    teacher_warmup: int = 0
    student_warmup: int = 0
    teacher_schedule: str = "cosine"
    student_schedule: str = "cosine"
    teacher_min_lr_ratio: float = 0.0
    student_min_lr_ratio: float = 0.0
    student_wait: int = 0
    uda_weight: float = 0.0
    uda_ramp: int = 0

    @classmethod
    def for_run(cls, total_steps: int, method: str, teacher: OptimConfig, student: OptimConfig,
                mpl: MPLConfig) -> "Schedules":
        """The schedules of a run of ``method``: the supervised student does not wait, and only
        MPL and UDA weigh in UDA's consistency loss."""
        return cls(total_steps=total_steps, teacher_lr=teacher.lr, student_lr=student.lr,
                   teacher_warmup=teacher.warmup_steps, student_warmup=student.warmup_steps,
                   teacher_schedule=teacher.schedule, student_schedule=student.schedule,
                   teacher_min_lr_ratio=teacher.min_lr_ratio, student_min_lr_ratio=student.min_lr_ratio,
                   student_wait=0 if method == "supervised" else mpl.student_wait_steps,
                   uda_weight=mpl.uda_weight if method in ("mpl", "uda") else 0.0, uda_ramp=mpl.uda_ramp_steps)

    def teacher(self, clock: int) -> float:
        return warmup_cosine(clock, self.total_steps, self.teacher_lr, self.teacher_warmup,
                             self.teacher_schedule, self.teacher_min_lr_ratio)

    def student(self, clock: int) -> float:
        return delayed(clock, self.student_wait, self.total_steps, self.student_lr,
                       warmup_steps=self.student_warmup, schedule=self.student_schedule,
                       min_lr_ratio=self.student_min_lr_ratio)

    def uda(self, clock: int) -> float:
        return linear_ramp(clock, self.uda_ramp, self.uda_weight)
