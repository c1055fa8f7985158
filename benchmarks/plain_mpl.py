"""The MPL step written the way the popular PyTorch ports write it: the baseline of bench_step.py.

Same math as ``mpl_fast.algo.mpl.MPL`` with ``method="mpl"`` and ``feedback="grad-dot"``:

  1. one teacher forward over [x_l, x_u weak, x_u strong] (BatchNorm statistics depend on the
     batching, so the plain path batches exactly as ours does), y_hat = argmax T(x_u strong)
  2. a separate student forward on x_u strong, backward, g_u copied out, torch.optim.SGD step
  3. the feedback by re-running the labeled batch through the updated student (dropout off,
     BatchNorm on batch statistics without touching its running statistics), its gradient
     g_l', and h = lr_S * sum_i torch.dot(g_l'[i], g_u[i]): one dot per tensor in a Python loop
  4. teacher loss = smoothed CE(y_l, T(x_l)) + w_uda * UDA + h * CE(y_hat, T(x_u strong)),
     backward, torch.optim.SGD step; then the student EMA, one parameter at a time.

What makes it "plain": per-tensor Python loops (dot, EMA, gradient copies), single-tensor
optimizers (``foreach=False``), h read to the host with ``.item()`` and multiplied in as a Python
float, and the losses read with ``.item()`` every step for logging. None of this changes the
numbers (``.item()`` of an fp32 scalar is exact), so both paths agree to round-off
(tests/algo/test_step_equivalence.py). What it leaves out: the fast path's non-finite guard (a no-op
when every value is finite), the other feedback modes and methods, gradient clipping.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mpl_fast.algo.feedback import deterministic_forward
from mpl_fast.algo.schedules import Schedules


def plain_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float, nesterov: bool) -> torch.optim.SGD:
    """torch.optim.SGD with its single-tensor loop (``foreach=False``), as the ports run it."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=nesterov and momentum > 0, foreach=False)


class PlainMPL:
    """Teacher, student, torch.optim.SGD for each, and an EMA copy of the student.

    ``step(labeled, unlabeled, clock)`` returns a dict of Python floats (the ports log every
    step), with the keys of ``mpl_fast.algo.LOG_KEYS`` that this path computes.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_opt: torch.optim.Optimizer,
                 student_opt: torch.optim.Optimizer, schedules: Schedules, *, uda_temperature: float = 0.7,
                 uda_threshold: float = 0.6, label_smoothing: float = 0.0, ema_decay: float = 0.0,
                 mpl_weight: float = 1.0, sup_weight: float = 1.0):
        self.teacher, self.student = teacher, student
        self.teacher_opt, self.student_opt = teacher_opt, student_opt
        self.schedules = schedules
        self.uda_temperature, self.uda_threshold = uda_temperature, uda_threshold
        self.label_smoothing, self.mpl_weight, self.sup_weight = label_smoothing, mpl_weight, sup_weight
        self.ema_decay = ema_decay
        self.ema = None
        if ema_decay > 0:
            self.ema = copy.deepcopy(student).eval()
            for p in self.ema.parameters():
                p.requires_grad_(False)
        self.ema_updates = 0

    def step(self, labeled, unlabeled, clock: int) -> dict[str, float]:
        (x_l, y_l), (x_uw, x_us) = labeled, unlabeled
        lr_t, lr_s = self.schedules.teacher(clock), self.schedules.student(clock)
        for group in self.teacher_opt.param_groups:
            group["lr"] = lr_t
        for group in self.student_opt.param_groups:
            group["lr"] = lr_s
        uda_weight = self.schedules.uda(clock)
        student_active = clock >= self.schedules.student_wait
        b, u = x_l.shape[0], x_uw.shape[0]

        # 1. Teacher on labeled + weak + strong, one forward.
        self.teacher.train()
        logits = self.teacher(torch.cat([x_l, x_uw, x_us]))
        t_l, t_uw, t_us = logits[:b], logits[b:b + u], logits[b + u:]
        loss_sup = F.cross_entropy(t_l, y_l, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            weak = t_uw.float()
            soft_target = torch.softmax(weak / self.uda_temperature, dim=-1)
            max_prob = torch.softmax(weak, dim=-1).max(dim=-1)[0]
            mask = max_prob.ge(self.uda_threshold).float()
        loss_uda = torch.mean(-(soft_target * torch.log_softmax(t_us.float(), dim=-1)).sum(dim=-1) * mask)
        loss_teacher = self.sup_weight * loss_sup
        if uda_weight > 0:
            loss_teacher = loss_teacher + uda_weight * loss_uda

        h, loss_student_value, loss_mpl_value = 0.0, 0.0, 0.0
        if student_active:
            y_hat = t_us.detach().float().argmax(dim=-1)
            # 2. Student step on the pseudo labels; keep a copy of g_u.
            self.student.train()
            loss_student = F.cross_entropy(self.student(x_us), y_hat)
            self.student_opt.zero_grad()
            loss_student.backward()
            params = [p for p in self.student.parameters() if p.requires_grad]
            g_u = [p.grad.detach().clone() for p in params]
            self.student_opt.step()
            loss_student_value = loss_student.item()

            # 3. Feedback: re-run the labeled batch through the updated student.
            with deterministic_forward(self.student):  # the mode is part of the math, not its speed
                loss_new = F.cross_entropy(self.student(x_l), y_l)
                g_l_new = torch.autograd.grad(loss_new, params)
            h = lr_s * self._feedback_dot(g_l_new, g_u).item()

            # 4. The MPL term, on the same y_hat.
            loss_mpl = F.cross_entropy(t_us, y_hat)
            loss_teacher = loss_teacher + self.mpl_weight * h * loss_mpl
            loss_mpl_value = loss_mpl.item()

        self.teacher_opt.zero_grad()
        loss_teacher.backward()
        self.teacher_opt.step()

        if self.ema is not None and student_active:
            self._update_ema()
        return {"loss_teacher": loss_teacher.item(), "loss_sup": loss_sup.item(), "loss_uda": loss_uda.item(),
                "uda_mask": mask.mean().item(), "loss_mpl": loss_mpl_value, "loss_student": loss_student_value,
                "h": h}

    @staticmethod
    def _feedback_dot(g_l_new, g_u) -> torch.Tensor:
        """<g_l', g_u>: one torch.dot per parameter tensor, summed in a Python loop."""
        dot = torch.zeros((), device=g_u[0].device)
        for a, c in zip(g_l_new, g_u):
            dot = dot + torch.dot(a.reshape(-1), c.reshape(-1))
        return dot

    @torch.no_grad()
    def _update_ema(self) -> None:
        d = min(self.ema_decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        self.ema_updates += 1
        for e, p in zip(self.ema.parameters(), self.student.parameters()):
            e.mul_(d).add_(p.detach(), alpha=1 - d)
        for e, buf in zip(self.ema.buffers(), self.student.buffers()):
            if e.is_floating_point():
                e.mul_(d).add_(buf, alpha=1 - d)
            else:
                e.copy_(buf)
