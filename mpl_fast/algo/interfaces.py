"""What the MPL step needs from outside itself, as Protocols, with the one-process defaults.

The step is written as a teacher half and a student half that meet at three points; a *link*
carries what crosses between them:

  teacher --y_hat--> student               the pseudo labels of the unlabeled (strong) batch
  teacher <--h, loss_student-- student     the feedback h and the student's loss
  teacher --ok--> student                  whether the step is applied (both sides skip it together)

and a *gradient sync* averages gradients and losses over the processes that share a network
(data parallel). ``InProcessLink`` and ``NoGradientSync`` are the one-process versions;
mpl_fast.parallel implements both for torchrun ranks (DistributedLink, GradientAverager,
ShardedSync). A link method takes the value where this process computes it (None where it
does not) and returns it on the side that needs it (None on a process that does not).
"""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import torch
from torch import nn


class Link(Protocol):
    """Joins the teacher half and the student half of one step."""

    holds_teacher: bool
    holds_student: bool

    def student_inputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The student's batch tensors where the student computes."""

    def pseudo_labels(self, y_hat: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        """The teacher's y_hat, on the student's side."""

    def feedback(self, h: torch.Tensor | None, loss_student: torch.Tensor | None):
        """The student's (h, loss_student), on the teacher's side."""

    def verdict(self, ok: torch.Tensor | None) -> torch.Tensor | None:
        """The teacher's verdict ``ok``, on the student's side."""


class GradientSync(Protocol):
    """Averages what the step needs averaged over the processes that share a network."""

    world_size: int
    active: bool

    def average_(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Replaces each tensor by its mean over the processes."""

    def average_grads_(self, grads: Iterable[torch.Tensor | None]) -> None:
        """Gradients, averaged like ``average_`` (nothing where the backward already did it)."""

    def average_grads_and_values(self, module: nn.Module, values: Sequence[torch.Tensor]) -> tuple:
        """Averages ``module``'s gradients in place and returns ``values`` averaged."""

    def sum_partial_(self, t: torch.Tensor) -> torch.Tensor:
        """A dot product over this process's part of the tensors, summed over the processes."""


class InProcessLink:
    """Both halves in this process; values cross devices with ``.to``. With equal teacher and
    student devices this is the ordinary single-device step (the moves are no-ops); with two
    devices the student's inputs (x_l, y_l, x_u strong) also move from the data's device to the
    student's."""

    holds_teacher = True
    holds_student = True

    def __init__(self, teacher_device: torch.device | str, student_device: torch.device | str):
        self.teacher_device = torch.device(teacher_device)
        self.student_device = torch.device(student_device)

    def student_inputs(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The student's batch tensors on the student's device."""
        return tuple(_move(t, self.student_device) for t in tensors)

    def pseudo_labels(self, y_hat: torch.Tensor | None, rows: int) -> torch.Tensor:
        return _move(y_hat, self.student_device)

    def feedback(self, h: torch.Tensor | None, loss_student: torch.Tensor | None):
        return _move(h, self.teacher_device), _move(loss_student, self.teacher_device)

    def verdict(self, ok: torch.Tensor | None) -> torch.Tensor:
        return _move(ok, self.student_device)


def _move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; a no-op on its own device. Asynchronous towards a GPU (stream-ordered);
    towards the CPU it waits for the value (a non-blocking copy to the host could be read before
    it lands), which is the one host sync a CPU half imposes on a GPU half."""
    return t.to(device, non_blocking=device.type == "cuda")


class NoGradientSync:
    """The single-process averager: every method hands its input back untouched."""

    world_size = 1
    active = False

    def average_(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Nothing to average with one process."""

    def average_grads_(self, grads: Iterable[torch.Tensor | None]) -> None:
        """Gradients, averaged like ``average_`` (nothing to do with one process)."""
        self.average_(grads)

    def average_grads_and_values(self, module: nn.Module, values: Sequence[torch.Tensor]) -> tuple:
        """``values`` as given (the single-process step is unchanged)."""
        return tuple(values)

    def sum_partial_(self, t: torch.Tensor) -> torch.Tensor:
        """A dot product over this rank's part of the tensors, summed over ranks: ``t`` itself
        when every rank holds whole tensors (here, and under GradientAverager)."""
        return t
