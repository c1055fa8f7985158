"""The MPL step against a hand-written reference of its math, the sign of h, h == 0 at lr 0,
non-finite skipping, deterministic feedback forwards, schedules, EMA."""

import copy

import pytest
import torch
import torch.nn.functional as F
from mpl_testing import assert_state_unchanged, reference_student_step_and_h, toy_batches
from torch import nn

from mpl_fast.algo import MPL, MPLConfig, Schedules, deterministic_forward, pseudo_labels, uda_consistency
from mpl_fast.algo.schedules import delayed, warmup_cosine

MODES = ("grad-dot", "update-dot", "finite-diff")


def _mlp(seed: int, bn: bool = True, dropout: float = 0.3) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)]
    return nn.Sequential(*layers)


def _mpl(teacher, student, *, lr_t=0.1, lr_s=0.1, momentum=0.0, weight_decay=0.0, feedback="grad-dot",
         method="mpl", uda_weight=1.0, label_smoothing=0.1, ema_decay=0.0, baseline="off", wait=0, **kw):
    t_opt = torch.optim.SGD(teacher.parameters(), lr=lr_t, momentum=momentum, weight_decay=weight_decay)
    s_opt = torch.optim.SGD(student.parameters(), lr=lr_s, momentum=momentum, weight_decay=weight_decay)
    sched = Schedules(total_steps=100, teacher_lr=lr_t, student_lr=lr_s, teacher_schedule="constant",
                      student_schedule="constant", student_wait=wait, uda_weight=uda_weight, uda_ramp=0)
    return MPL(teacher, student, t_opt, s_opt, sched,
               MPLConfig(feedback=feedback, label_smoothing=label_smoothing, ema_decay=ema_decay, baseline=baseline,
                         uda_temperature=0.7, uda_threshold=0.0, **kw), method=method)


def test_one_mpl_step_matches_hand_written_reference():
    """Plain SGD, no BN/dropout: every line of the paper's step written out with autograd."""
    teacher, student = _mlp(0, bn=False, dropout=0.0), _mlp(1, bn=False, dropout=0.0)
    ref_t, ref_s = copy.deepcopy(teacher), copy.deepcopy(student)
    lr_t, lr_s, w_uda, ls = 0.2, 0.3, 1.5, 0.1
    (x_l, y_l), (x_uw, x_us) = toy_batches(3)
    mpl = _mpl(teacher, student, lr_t=lr_t, lr_s=lr_s, uda_weight=w_uda, label_smoothing=ls)
    out = mpl.step((x_l, y_l), (x_uw, x_us), clock=0)

    # Reference.
    tp = list(ref_t.parameters())
    t_l, t_uw, t_us = ref_t(torch.cat([x_l, x_uw, x_us])).split([8, 24, 24])
    y_hat = t_us.detach().argmax(1)
    loss_sup = F.cross_entropy(t_l, y_l, label_smoothing=ls)
    target = torch.softmax(t_uw.detach() / 0.7, 1)
    loss_uda = -(target * F.log_softmax(t_us, 1)).sum(1).mean()          # threshold 0: every sample kept
    h = reference_student_step_and_h(ref_s, x_us, y_hat, x_l, y_l, lr_s)
    loss_t = loss_sup + w_uda * loss_uda + h * F.cross_entropy(t_us, y_hat)
    g_t = torch.autograd.grad(loss_t, tp)
    with torch.no_grad():
        for p, g in zip(tp, g_t):
            p -= lr_t * g

    assert torch.allclose(out["h"], h, rtol=1e-5, atol=1e-8)
    assert torch.allclose(out["loss_teacher"], loss_t, rtol=1e-5)
    for a, b in zip(student.parameters(), ref_s.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(teacher.parameters(), ref_t.parameters()):
        torch.testing.assert_close(a, b)
    assert out["h"].item() != 0.0


@pytest.mark.parametrize("seed", range(6))
def test_feedback_modes_agree_in_sign_and_value_at_small_lr(seed):
    """Taylor: lr*<g_l', g_u> ~ CE_l(theta) - CE_l(theta'): the sign of h is pinned."""
    hs = {}
    (x_l, y_l), (x_uw, x_us) = toy_batches(seed)
    batches = (x_l.double(), y_l), (x_uw.double(), x_us.double())
    for mode in MODES:
        # fp64 so that the finite difference of two losses resolves a change of ~1e-5.
        teacher, student = _mlp(10 + seed).double(), _mlp(20 + seed).double()
        mpl = _mpl(teacher, student, lr_s=1e-3, feedback=mode, baseline="off")
        torch.manual_seed(seed)  # same dropout masks in the student step of every mode
        hs[mode] = mpl.step(*batches, clock=0)["h"].item()
    assert hs["grad-dot"] != 0.0
    for mode in ("update-dot", "finite-diff"):
        assert (hs[mode] > 0) == (hs["grad-dot"] > 0), hs
        assert hs[mode] == pytest.approx(hs["grad-dot"], rel=0.05, abs=1e-9), hs


def test_positive_h_means_the_student_improved():
    """A pseudo label equal to the true label helps the student on that same data: h > 0."""
    teacher, student = _mlp(0), _mlp(1)
    (x_l, y_l), _ = toy_batches(0)
    mpl = _mpl(teacher, student, lr_s=0.05)
    # Unlabeled batch = the labeled batch; make the teacher output the true labels on it.
    bias = teacher[-1].bias
    teacher.forward = lambda x: F.one_hot(torch.cat([y_l, y_l, y_l]), 3).float() * 10 + 0 * bias
    assert mpl.step((x_l, y_l), (x_l, x_l), clock=0)["h"].item() > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_h_is_exactly_zero_when_student_lr_is_zero(mode, momentum):
    teacher, student = _mlp(0), _mlp(1)
    mpl = _mpl(teacher, student, lr_s=0.0, momentum=momentum, weight_decay=5e-4, feedback=mode, baseline="on")
    for i in range(3):
        out = mpl.step(*toy_batches(i), clock=i)
        assert out["h"].item() == 0.0, (mode, i)
    assert mpl.totals["h"].item() == 0.0


def test_deterministic_forward_leaves_no_trace_and_is_repeatable():
    model = _mlp(0, dropout=0.5).train()
    x = torch.randn(16, 5)
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    with deterministic_forward(model):
        a, b = model(x), model(x)
    assert torch.equal(a, b)                                   # dropout off
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    assert model.training and model[3].training and bn.track_running_stats  # flags restored
    # It normalises with batch statistics (as training does), not with the running ones.
    model.train()
    torch.manual_seed(0)
    with deterministic_forward(model):
        batch_stats = model(x)
    model.eval()
    assert not torch.allclose(batch_stats, model(x))


def test_non_finite_step_is_undone_and_counted():
    teacher, student = _mlp(0), _mlp(1)
    mpl = _mpl(teacher, student, momentum=0.9, ema_decay=0.9)
    mpl.step(*toy_batches(0), clock=0)
    snap = copy.deepcopy(mpl.state_dict())
    (x_l, y_l), u = toy_batches(1)
    x_l = x_l.clone()
    x_l[0, 0] = float("nan")
    out = mpl.step((x_l, y_l), u, clock=1)
    assert out["skipped"].item() == 1.0
    after = mpl.state_dict()
    assert_state_unchanged(snap, after)
    assert mpl.skipped_total.item() == 1 and mpl.consecutive_skips.item() == 1
    mpl.step(*toy_batches(2), clock=1)
    assert mpl.consecutive_skips.item() == 0 and mpl.max_consecutive_skips.item() == 1
    assert not torch.equal(snap["student"]["0.weight"], mpl.student.state_dict()["0.weight"])


def test_student_waits_then_learns():
    teacher, student = _mlp(0), _mlp(1)
    mpl = _mpl(teacher, student, wait=2)
    w0 = student[0].weight.clone()
    out = mpl.step(*toy_batches(0), clock=0)
    assert torch.equal(student[0].weight, w0) and out["h"].item() == 0.0
    mpl.step(*toy_batches(1), clock=2)
    assert not torch.equal(student[0].weight, w0)


@pytest.mark.parametrize("method", ["uda", "pseudo-labels", "supervised"])
def test_baselines_run_without_feedback(method):
    teacher, student = _mlp(0), _mlp(1)
    if method == "supervised":
        s_opt = torch.optim.SGD(student.parameters(), lr=0.1)
        mpl = MPL(None, student, None, s_opt, Schedules(100, 0.0, 0.1), method="supervised")
    else:
        mpl = _mpl(teacher, student, method=method)
    out = mpl.step(*toy_batches(0), clock=0)
    assert out["h"].item() == 0.0 and out["loss_mpl"].item() == 0.0
    assert torch.isfinite(out["loss_student"]) and out["loss_student"].item() > 0
    if method == "pseudo-labels":
        assert out["loss_uda"].item() == 0.0


def test_pseudo_label_kinds():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert pseudo_labels(logits, "hard").tolist() == [0, 1]
    soft = pseudo_labels(logits, "soft", 0.5)
    torch.testing.assert_close(soft, torch.softmax(logits / 0.5, 1))
    drawn = pseudo_labels(logits.repeat(500, 1), "sample", generator=torch.Generator().manual_seed(0))
    assert set(drawn.tolist()) == {0, 1, 2}


def test_uda_masks_unconfident_samples():
    weak = torch.tensor([[5.0, 0.0], [0.1, 0.0]])
    strong = torch.zeros(2, 2, requires_grad=True)
    loss, mask = uda_consistency(weak, strong, temperature=0.5, threshold=0.9)
    assert mask.item() == 0.5
    loss.backward()
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0


def test_schedules():
    assert warmup_cosine(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    assert delayed(4, 5, 100, 1.0) == 0.0 and delayed(5, 5, 100, 1.0) == 1.0


@pytest.mark.parametrize("kind", ["hard", "soft", "sample"])
@pytest.mark.parametrize("mode", MODES)
def test_every_pseudo_label_kind_and_feedback_mode_trains_the_teacher_through_h(kind, mode):
    teacher, student = _mlp(0), _mlp(1)
    mpl = _mpl(teacher, student, feedback=mode, pseudo_labels=kind, uda_weight=0.0, label_smoothing=0.0,
               baseline="off")
    mpl.config.sup_weight = 0.0  # the teacher moves only through the MPL term h * CE(y_hat, T(x_strong))
    before = [p.clone() for p in teacher.parameters()]
    out = mpl.step(*toy_batches(0), clock=0)
    assert torch.isfinite(out["h"]) and out["h"].item() != 0.0
    assert any(not torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_ema_skipped_update_leaves_no_trace():
    from mpl_fast.algo.ema import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    skipped, applied = ModelEMA(model, 0.99), ModelEMA(model, 0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    skipped.update(model, torch.tensor(False))
    assert int(skipped.num_updates) == 0
    assert torch.equal(skipped.module.weight, applied.module.weight)
    # After the skip, both follow the same schedule: the skip did not advance the warm-up.
    skipped.update(model, torch.tensor(True))
    applied.update(model, torch.tensor(True))
    assert int(skipped.num_updates) == 1
    assert torch.equal(skipped.module.weight, applied.module.weight)
    d = 1 / 10  # first update: d = min(decay, (1 + 0) / (10 + 0))
    torch.testing.assert_close(applied.module.weight, d * (model.weight - 1.0) + (1 - d) * model.weight)
