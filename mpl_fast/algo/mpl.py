"""One training step of MPL and of the baselines that share its pipeline.

The MPL step (Pham et al. 2021; stated precisely in docs/algorithm.md):

  1. teacher T on [x_l, x_u weak, x_u strong] in ONE forward; y_hat_u from T(x_u strong)
  2. student S steps on CE(y_hat_u, S(x_u strong))                    -> theta_S'
  3. feedback h from the labeled batch (see mpl_fast.algo.feedback)
  4. teacher steps on  CE_smooth(y_l, T(x_l)) + w_uda * UDA + h * CE(y_hat_u, T(x_u strong))
     (the same y_hat_u as in 2)

Methods by name, so they can be compared on the same data and code:
  mpl            all of the above
  uda            h = 0 (no MPL term): a UDA teacher, and a student distilled from its labels
  pseudo-labels  h = 0 and no UDA: a supervised teacher labels data for the student
  supervised     the student on CE(y_l, S(x_l)) alone; no teacher
  reduced-mpl    Reduced MPL (the paper's Appendix E): the "teacher" is the reduced teacher T_R
                 (mpl_fast.reduced.teacher), the unlabeled batch is (p_us, x_us) with p_us the
                 large teacher's stored distributions of x_us; 1. becomes t_us = T_R(p_us) (no
                 forward over images, no supervised or UDA term), 2.-4. are unchanged: the student
                 learns T_R's pseudo labels and T_R steps on h * CE(y_hat_u, T_R(p_us)), same sign.

No host sync: losses, h and the step's ``ok`` flag stay on the device. A step whose losses or
h are not finite is undone on the device (teacher, student, momentum, EMA, baseline), and
counted; the schedule clock the trainer passes in is the number of applied steps.

The teacher half (1., 4.) and the student half (2., 3.) meet through a *link*
(mpl_fast.algo.interfaces.Link): y_hat goes to the student, h and the student's loss come
back, the verdict ``ok`` goes to the student. One device, two devices in one process, a
teacher rank and a student rank, or a teacher rank group and a student rank group (each data
parallel over its k ranks, with a gradient sync over its own group): the same step code, only
the link and the sync differ (mpl_fast.parallel implements them for torchrun ranks).
"""

from __future__ import annotations

import torch
from torch import nn

from mpl_fast.algo import feedback as fb
from mpl_fast.algo.config import METHODS, Method, MPLConfig, check_choices
from mpl_fast.algo.ema import ModelEMA
from mpl_fast.algo.guard import StepGuard
from mpl_fast.algo.interfaces import GradientSync, InProcessLink, Link, NoGradientSync
from mpl_fast.algo.losses import cross_entropy, pseudo_labels
from mpl_fast.algo.schedules import Schedules, set_lr
from mpl_fast.algo.uda import uda_consistency
from mpl_fast.algo.update import GradClip, StepPrecision, clip_, clip_and_step, enabled_scaler
from mpl_fast.shards import load_module_state, load_optimizer_state, local

LOG_KEYS = ("loss_teacher", "loss_sup", "loss_uda", "uda_mask", "loss_mpl", "loss_student", "h", "skipped")


class MPL:
    """Teacher, student, their optimizers, the student EMA and the feedback state.

    ``step(labeled, unlabeled, clock)`` runs one step and returns nothing; the per-step values
    (``LOG_KEYS``) are summed on the device into ``self.totals`` for the trainer to read.

    ``config`` (MPLConfig) holds the step's choices and numbers, ``clip`` (GradClip) each
    network's gradient clip, ``precision`` (StepPrecision) the autocast contexts and fp16 loss
    scalers; ``grad_sync`` (a GradientSync) averages over data-parallel ranks (default: none).
    ``link`` joins the teacher half and the student half (default: an in-process link between
    the teacher's and the student's devices). A process whose link holds only one half passes
    None for the other network and its optimizer; its totals hold zeros for the other half's
    values except h and the student's loss, which the teacher's side receives.
    """

    def __init__(self, teacher: nn.Module | None, student: nn.Module | None, teacher_opt: torch.optim.Optimizer | None,
                 student_opt: torch.optim.Optimizer | None, schedules: Schedules, config: MPLConfig | None = None, *,
                 method: Method = "mpl", clip: GradClip = GradClip(), precision: StepPrecision = StepPrecision(),
                 grad_sync: GradientSync | None = None, link: Link | None = None, ema_module: nn.Module | None = None):
        config = config if config is not None else MPLConfig()
        check_choices(config)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
        if link is None:
            link = InProcessLink(_device_of(teacher if teacher is not None else student), _device_of(student))
        if method == "supervised" and not (link.holds_teacher and link.holds_student):
            raise ValueError("method 'supervised' has no teacher: it cannot be split between teacher and student")
        if method != "supervised" and link.holds_teacher and (teacher is None or teacher_opt is None):
            raise ValueError(f"method {method!r} needs a teacher and its optimizer")
        if link.holds_student and (student is None or student_opt is None):
            raise ValueError("the student half needs the student and its optimizer")
        if grad_sync is not None and grad_sync.active and not (link.holds_teacher and link.holds_student):
            # Rank groups: a half is data parallel within its own group only (its peers in the
            # other half hold another network: averaging with them would mix the two).
            half_group = getattr(link, "half_group", None)
            if half_group is None or grad_sync.group is not half_group:
                raise ValueError("a process holding one half of the step can be data parallel only within its "
                                 "half's process group: pass a gradient sync over link.half_group "
                                 "(mpl_fast.parallel.model_parallel.HalfGroups)")
        self.link = link
        self.teacher, self.student = teacher, student
        self.teacher_opt, self.student_opt = teacher_opt, student_opt
        self.schedules = schedules
        self.method, self.config = method, config
        self.feedback = config.feedback
        # "auto": the official code's choice, a baseline for finite-diff only.
        self.use_baseline = config.baseline == "on" or (config.baseline == "auto" and config.feedback == "finite-diff")
        self.clip = clip
        self.autocast = precision.autocast  # e.g. bf16 torch.autocast, for the teacher's forward
        # bf16/fp16 for the student's forward on the unlabeled batch (its update); never for the
        # feedback's labeled forward: see _teacher_forward and _student_step_and_feedback.
        self.student_autocast = precision.student_autocast
        # fp16 autocast: each network's loss has its own scaler (the teacher's on its side, the
        # student's on the student's); a disabled scaler is dropped so that the fp32/bf16 step
        # has no scaler calls at all.
        self.grad_scaler = enabled_scaler(precision.grad_scaler)
        self.student_grad_scaler = enabled_scaler(precision.student_grad_scaler)
        # Data parallel: averages gradients and losses across ranks (mpl_fast.parallel implements it).
        self.grad_sync = grad_sync if grad_sync is not None else NoGradientSync()
        self.use_uda = method in ("mpl", "uda") and schedules.uda_weight > 0
        self.uses_feedback = method in ("mpl", "reduced-mpl")  # h is computed and steps the teacher
        # ema_module: the EMA's copy made by the caller (a sharded student cannot be deep-copied)
        self.ema = (ModelEMA(student, config.ema_decay, ema_module) if config.ema_decay > 0 and student is not None
                    else None)
        # Counters and log totals live with the teacher when this process has it: it receives h.
        device = _device_of(teacher if link.holds_teacher and teacher is not None else student)
        self._device = device
        # The finite-diff moving average of h, computed and kept by the student half.
        self.baseline = torch.zeros((), device=_device_of(student) if student is not None else device)
        self.skipped_total = torch.zeros((), dtype=torch.int64, device=device)
        self.consecutive_skips = torch.zeros((), dtype=torch.int64, device=device)
        self.max_consecutive_skips = torch.zeros((), dtype=torch.int64, device=device)
        self.totals = {k: torch.zeros((), device=device) for k in LOG_KEYS}
        self.steps_in_totals = 0
        self._build_guards()

    # ------------------------------------------------------------------ state

    def _build_guards(self) -> None:
        """(Re)binds the guards to the live tensors (after an optimizer's state was loaded)."""
        self.teacher_guard = (StepGuard([self.teacher], [self.teacher_opt]) if self.teacher is not None
                              and self.method != "supervised" else None)
        if self.student is None:
            self.student_guard = None
            return
        self.student_guard = StepGuard([self.student], [self.student_opt])
        params = list(self.student.parameters())
        trainable = [i for i, p in enumerate(params) if p.requires_grad]
        self._student_params = [params[i] for i in trainable]
        # The feedback's dot products read this rank's shards under --fsdp (else the tensors).
        self._student_locals = [local(p) for p in self._student_params]
        # The guard saves parameters first, in order: these copies are theta_S before the step.
        self._student_params_before = [self.student_guard.saved[i] for i in trainable]

    def state_dict(self) -> dict:
        return {
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            "student": None if self.student is None else self.student.state_dict(),
            "teacher_opt": None if self.teacher_opt is None else self.teacher_opt.state_dict(),
            "student_opt": None if self.student_opt is None else self.student_opt.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "baseline": self.baseline.clone(),
            "skipped_total": self.skipped_total.clone(),
            "consecutive_skips": self.consecutive_skips.clone(),
            "max_consecutive_skips": self.max_consecutive_skips.clone(),
            "totals": {k: v.clone() for k, v in self.totals.items()},
            "steps_in_totals": self.steps_in_totals,
            # (reads the scale on the host: fine for a checkpoint, never done inside a step)
            "grad_scaler": None if self.grad_scaler is None else self.grad_scaler.state_dict(),
            "student_grad_scaler": None if self.student_grad_scaler is None else self.student_grad_scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Loads ``state_dict()``'s output; sharded (--fsdp) networks also take whole tensors
        (a one-process checkpoint, or mpl_fast.parallel.sharding.full_state_dict's)."""
        if self.teacher is not None:
            load_module_state(self.teacher, state["teacher"])
            load_optimizer_state(self.teacher_opt, state["teacher_opt"])
        if self.student is not None:
            load_module_state(self.student, state["student"])
            load_optimizer_state(self.student_opt, state["student_opt"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.baseline.copy_(state["baseline"])
        self.skipped_total.copy_(state["skipped_total"])
        self.consecutive_skips.copy_(state["consecutive_skips"])
        self.max_consecutive_skips.copy_(state["max_consecutive_skips"])
        for k, v in state["totals"].items():
            self.totals[k].copy_(v)
        self.steps_in_totals = int(state["steps_in_totals"])
        if self.grad_scaler is not None and state.get("grad_scaler"):  # absent in fp32/bf16 checkpoints
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        if self.student_grad_scaler is not None and state.get("student_grad_scaler"):  # absent in older checkpoints
            self.student_grad_scaler.load_state_dict(state["student_grad_scaler"])
        self._build_guards()

    def models(self) -> dict[str, nn.Module]:
        out = {"student": self.student} if self.student is not None else {}
        if self.ema is not None:
            out["ema"] = self.ema.module
        if self.teacher is not None and self.method not in ("supervised", "reduced-mpl"):
            out["teacher"] = self.teacher  # (T_R reads distributions, not images: not evaluated)
        return out

    def take_totals(self) -> tuple[dict[str, torch.Tensor], int]:
        """The sums since the last call (device tensors) and how many steps they cover; resets them."""
        totals = {k: v.clone() for k, v in self.totals.items()}
        n = self.steps_in_totals
        for v in self.totals.values():
            v.zero_()
        self.steps_in_totals = 0
        return totals, n

    # ------------------------------------------------------------------ the step

    def step(self, labeled: tuple[torch.Tensor, torch.Tensor], unlabeled: tuple[torch.Tensor, torch.Tensor],
             clock: int) -> dict[str, torch.Tensor]:
        """One step at schedule position ``clock``; returns this step's values (device tensors)."""
        lr_t = self.schedules.teacher(clock)
        lr_s = self.schedules.student(clock)
        if self.teacher_opt is not None:
            set_lr(self.teacher_opt, lr_t)
        if self.student_opt is not None:
            set_lr(self.student_opt, lr_s)
        if self.method == "supervised":
            values = self._supervised_step(labeled)
        else:
            values = self._teacher_student_step(labeled, unlabeled, lr_s, self.schedules.uda(clock),
                                                student_active=clock >= self.schedules.student_wait)
        for k, v in values.items():
            self.totals[k] += v.detach().float()
        self.steps_in_totals += 1
        return values

    def _finish(self, ok: torch.Tensor, student_stepped: bool, ok_student: torch.Tensor | None = None) -> torch.Tensor:
        """Undo the step on the device unless ``ok``; update EMA and skip counters.

        ``ok`` lives on the counters' device; ``ok_student`` is the same verdict on the student's
        device (default: ``ok``)."""
        ok_student = ok if ok_student is None else ok_student
        if self.student_guard is not None:
            self.student_guard.restore_unless(ok_student)
        if self.teacher_guard is not None:
            self.teacher_guard.restore_unless(ok)
        if self.ema is not None and student_stepped:
            self.ema.update(self.student, ok_student)
        skipped = (~ok).to(torch.int64)
        self.skipped_total += skipped
        self.consecutive_skips.copy_((self.consecutive_skips + 1) * skipped)
        torch.maximum(self.max_consecutive_skips, self.consecutive_skips, out=self.max_consecutive_skips)
        return skipped.float()

    def _supervised_step(self, labeled) -> dict[str, torch.Tensor]:
        x_l, y_l = labeled
        self.student_guard.save()
        self.student.train()
        loss = cross_entropy(self.student(x_l), y_l, self.config.label_smoothing)
        self.student_opt.zero_grad(set_to_none=True)
        loss.backward()
        (loss,) = self.grad_sync.average_grads_and_values(self.student, [loss])
        clip_(self.student, self.clip.student)
        self.student_opt.step()
        ok = torch.isfinite(loss)
        skipped = self._finish(ok, student_stepped=True)
        zero = torch.zeros_like(loss)
        return {"loss_teacher": zero, "loss_sup": zero, "loss_uda": zero, "uda_mask": zero, "loss_mpl": zero,
                "loss_student": loss.detach(), "h": zero, "skipped": skipped}

    def _teacher_student_step(self, labeled, unlabeled, lr_s: float, uda_weight: float,
                              student_active: bool) -> dict[str, torch.Tensor]:
        link = self.link
        (x_l, y_l), (x_uw, x_us) = labeled, unlabeled
        zero = torch.zeros((), device=self._device)
        if link.holds_student:
            self.student_guard.save()
        if link.holds_teacher:
            self.teacher_guard.save()
            if self.method == "reduced-mpl":  # x_uw holds the stored distributions p_us
                t_us, terms = self._reduced_teacher_losses(x_uw)                          # 1.
            else:
                t_us, terms = self._teacher_losses(x_l, y_l, x_uw, x_us, uda_weight)      # 1.

        h, loss_student, y_hat = zero, zero, None
        if student_active:
            if link.holds_teacher:
                y_hat = pseudo_labels(t_us, self.config.pseudo_labels, self.config.soft_temperature)
            y_hat_student = link.pseudo_labels(y_hat, x_us.shape[0])
            if link.holds_student:                                                      # 2. and 3.
                h, loss_student = self._student_step_and_feedback(*link.student_inputs(x_l, y_l, x_us),
                                                                  y_hat_student, lr_s)
            h, loss_student = link.feedback(h, loss_student)

        ok = None
        if link.holds_teacher:                                                          # 4.
            terms["loss_student"] = loss_student  # averaged with the teacher's terms under data parallel
            found_inf = self._teacher_step(terms, t_us, y_hat, h)
            loss_student = terms.pop("loss_student")
            # (a student fp16 overflow arrives as loss_student = NaN: see _flag_student_overflow)
            ok = torch.isfinite(terms["loss_teacher"]) & torch.isfinite(h) & torch.isfinite(loss_student)
            if found_inf is not None:  # fp16 overflow in the teacher's gradients: skip the whole step
                ok &= found_inf == 0
        ok_student = link.verdict(ok)
        if ok is None:  # a student-only process: its counters follow the teacher's verdict
            ok = ok_student
        if self.use_baseline and student_active and self.uses_feedback and link.holds_student:
            self.baseline.copy_(torch.where(ok_student, self._new_baseline, self.baseline))
        skipped = self._finish(ok, student_stepped=student_active, ok_student=ok_student)
        values = {k: zero for k in LOG_KEYS}
        values.update({k: v.detach() for k, v in terms.items()} if link.holds_teacher else {})
        values.update(loss_student=loss_student.detach(), h=h.detach(), skipped=skipped)
        return values

    def _teacher_losses(self, x_l, y_l, x_uw, x_us, uda_weight: float):
        """1. One teacher forward over labeled + weak + strong; its supervised and UDA losses."""
        b, u = x_l.shape[0], x_uw.shape[0]
        self.teacher.train()
        t_l, t_uw, t_us = self._teacher_forward(torch.cat([x_l, x_uw, x_us])).split([b, u, u])
        loss_sup = cross_entropy(t_l, y_l, self.config.label_smoothing)
        loss_teacher = self.config.sup_weight * loss_sup
        zero = torch.zeros((), device=loss_sup.device)
        loss_uda, uda_mask = zero, zero
        if self.use_uda:
            loss_uda, uda_mask = uda_consistency(t_uw, t_us, self.config.uda_temperature, self.config.uda_threshold)
            loss_teacher = loss_teacher + uda_weight * loss_uda
        return t_us, {"loss_teacher": loss_teacher, "loss_sup": loss_sup, "loss_uda": loss_uda,
                      "uda_mask": uda_mask, "loss_mpl": zero}

    def _reduced_teacher_losses(self, p_us: torch.Tensor):
        """1. of reduced MPL: T_R's logits from the stored distributions (fp32, no autocast: T_R
        is small). Its loss is the MPL term alone; ``0 * sum(t_us)`` keeps a graph to backpropagate
        while the student waits (T_R then moves by weight decay only)."""
        self.teacher.train()
        t_us = self.teacher(p_us)
        zero = torch.zeros((), device=t_us.device)
        return t_us, {"loss_teacher": t_us.sum() * 0.0, "loss_sup": zero, "loss_uda": zero,
                      "uda_mask": zero, "loss_mpl": zero}

    def _teacher_step(self, terms: dict, t_us: torch.Tensor, y_hat: torch.Tensor | None,
                      h: torch.Tensor) -> torch.Tensor | None:
        """4. The teacher's step; the MPL term uses the SAME y_hat the student learned from.
        Updates ``terms`` (loss_teacher, loss_mpl; all of them averaged over data-parallel ranks) in place.

        With a loss scaler (fp16): backward of the scaled loss, unscale before clipping, and
        returns the scaler's device-side inf/nan flag (nonzero: the caller skips the whole step);
        the scale is updated here, once per step, from that flag. Without one: returns None."""
        if y_hat is not None and self.uses_feedback:
            terms["loss_mpl"] = cross_entropy(t_us, y_hat)
            terms["loss_teacher"] = terms["loss_teacher"] + self.config.mpl_weight * h.detach() * terms["loss_mpl"]
        scaler = self.grad_scaler
        self.teacher_opt.zero_grad(set_to_none=True)
        (terms["loss_teacher"] if scaler is None else scaler.scale(terms["loss_teacher"])).backward()
        # (3) data parallel: the teacher's gradients and every logged loss, averaged in one all_reduce.
        # (Scaled gradients average the same way: every rank has the same scale.)
        terms.update(zip(terms, self.grad_sync.average_grads_and_values(self.teacher, list(terms.values()))))
        return clip_and_step(self.teacher, self.teacher_opt, scaler, self.clip.teacher)

    def _student_step_and_feedback(self, x_l, y_l, x_us, y_hat, lr_s: float):
        """2. and 3.: the student's step on y_hat, then the feedback h (0 unless method is mpl)."""
        student = self.student
        need_h = self.uses_feedback
        old_loss = None
        if need_h and self.feedback == "finite-diff":
            with torch.no_grad(), fb.deterministic_forward(student):
                old_loss = cross_entropy(student(x_l), y_l)

        student.train()
        with self.student_autocast():  # bf16/fp16 under --amp: g_u only; g_l' below stays fp32
            logits_us = student(x_us)
        loss_student = cross_entropy(logits_us.float(), y_hat)
        found_inf = self._student_update(loss_student)
        g_u = [p.grad for p in self._student_params]  # SGD and FusedSGD leave .grad as it was: this is g_u
        if not need_h:
            h = torch.zeros((), device=loss_student.device)
            return _flag_student_overflow(h, loss_student, found_inf)

        with fb.deterministic_forward(student):
            if self.feedback == "finite-diff":
                with torch.no_grad():
                    new_loss = cross_entropy(student(x_l), y_l)
                self.grad_sync.average_([old_loss, new_loss])
                h = fb.finite_diff(old_loss, new_loss)
            else:
                new_loss = cross_entropy(student(x_l), y_l)
                g_l_new = self._labeled_gradient(new_loss, g_u)
                self.grad_sync.average_grads_(g_l_new)  # (2): the same h on every rank
        sum_partial = self.grad_sync.sum_partial_  # --fsdp: each rank dots its shards; else whole tensors
        if self.feedback == "grad-dot":
            h = fb.grad_dot(lr_s, [local(g) for g in g_l_new], [local(g) for g in g_u], sum_partial=sum_partial)
        elif self.feedback == "update-dot":  # delta theta from the guard's copy of theta_S before the step
            h = fb.update_dot([local(g) for g in g_l_new], self._student_params_before, self._student_locals,
                              sum_partial=sum_partial)
        if self.use_baseline:
            h, self._new_baseline = fb.subtract_baseline(h, self.baseline, self.config.baseline_decay)
        return _flag_student_overflow(h, loss_student, found_inf)

    def _student_update(self, loss_student: torch.Tensor) -> torch.Tensor | None:
        """2. The student's step on its loss; leaves the UNSCALED g_u in .grad.

        With a loss scaler (fp16): as the teacher's step: backward of the scaled loss, the
        data-parallel average of the scaled gradients (every rank has the same scale, and an inf
        anywhere reaches every rank through the average, so all ranks get the same flag), unscale,
        clip, step, update the scale; returns the scaler's device-side inf/nan flag. Else None."""
        scaler = self.student_grad_scaler
        self.student_opt.zero_grad(set_to_none=True)
        (loss_student if scaler is None else scaler.scale(loss_student)).backward()
        self.grad_sync.average_grads_([p.grad for p in self._student_params])  # (1) g_u
        # (unscaled in place: .grad is then g_u; the student's scale is its own, not the teacher's)
        return clip_and_step(self.student, self.student_opt, scaler, self.clip.student)

    def _labeled_gradient(self, new_loss: torch.Tensor, g_u: list[torch.Tensor]) -> list[torch.Tensor]:
        """g_l' by backward() into cleared .grad (g_u is kept aside and put back after): under
        FSDP2 only backward() reduce-scatters and averages gradients (torch.autograd.grad would
        return each rank's whole, unaveraged gradient), and one code path serves every layout."""
        params = self._student_params
        for p in params:
            p.grad = None
        new_loss.backward()
        g_l_new = [p.grad for p in params]
        for p, g in zip(params, g_u):
            p.grad = g
        return g_l_new

    def _teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits under the mixed-precision policy, as fp32 for the losses.

        The teacher's forward (its largest cost: labeled + weak + strong) runs in reduced
        precision, and also the student's forward on the unlabeled batch (``student_autocast``:
        g_u; fp16 with the student's own loss scaler), which moves h only slightly and keeps its
        sign. The feedback's labeled forward (g_l') stays fp32: in bf16 too it flips the sign of
        h (docs/amp.md; benchmarks/RESULTS.md, bench_step).
        """
        with self.autocast():
            return self.teacher(x).float()


def _flag_student_overflow(h: torch.Tensor, loss_student: torch.Tensor,
                           found_inf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, loss_student) as sent to the teacher, carrying a student fp16 overflow with them.

    The teacher's verdict ``ok`` already requires a finite loss_student, so a student overflow
    travels as loss_student := NaN with h := 0 (on the device, no host sync): the step is skipped
    and both guards restore teacher and student, while the teacher's loss and gradients stay
    finite (h = 0 drops the MPL term), so the teacher's scale is not halved for the student's
    overflow. The same pair crosses every link (in one process, and between a teacher rank and a student rank)."""
    if found_inf is None:
        return h, loss_student
    overflow = found_inf != 0
    nan = torch.full_like(loss_student, float("nan"))
    return (torch.where(overflow, torch.zeros_like(h), h),
            torch.where(overflow, nan, loss_student.detach()))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


