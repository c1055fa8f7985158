"""The step guard and the EMA: both decision paths (the host reads a CPU flag; an accelerator
decides on the device) undo a skipped step exactly and agree on an applied one."""

import copy

import pytest
import torch
from mpl_testing import assert_state_unchanged, toy_batches
from torch import nn

from mpl_fast.algo import MPL, MPLConfig, Schedules
from mpl_fast.algo import ema as ema_module
from mpl_fast.algo import guard as guard_module
from mpl_fast.algo.ema import ModelEMA
from mpl_fast.algo.guard import StepGuard


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))


def _mpl() -> MPL:
    teacher, student = _net(0), _net(1)
    opt = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)  # noqa: E731
    sched = Schedules(total_steps=100, teacher_lr=0.1, student_lr=0.1, teacher_schedule="constant",
                      student_schedule="constant", uda_weight=1.0)
    return MPL(teacher, student, opt(teacher), opt(student), sched, MPLConfig(ema_decay=0.9, uda_threshold=0.0))


@pytest.fixture(params=["host", "device"])
def decision_path(request, monkeypatch):
    """'device' makes the CPU behave like an accelerator: the flag is never read on the host."""
    if request.param == "device":
        monkeypatch.setattr(guard_module, "host_flag", lambda flag: None)
        monkeypatch.setattr(ema_module, "host_flag", lambda flag: None)
    return request.param


def test_skipped_step_leaves_no_trace_on_either_path(decision_path):
    mpl = _mpl()
    mpl.step(*toy_batches(0), clock=0)
    snap = copy.deepcopy(mpl.state_dict())
    (x_l, y_l), u = toy_batches(1)
    x_l = x_l.clone()
    x_l[0, 0] = float("nan")
    assert mpl.step((x_l, y_l), u, clock=1)["skipped"].item() == 1.0
    after = mpl.state_dict()
    assert_state_unchanged(snap, after)
    assert torch.equal(snap["ema"]["num_updates"], after["ema"]["num_updates"])
    # The next finite step is applied and moves the models again.
    mpl.step(*toy_batches(2), clock=1)
    assert not torch.equal(snap["student"]["0.weight"], mpl.student.state_dict()["0.weight"])
    assert int(mpl.ema.num_updates) == 2


def test_both_paths_compute_the_same_steps(monkeypatch):
    host = _mpl()
    for step in range(3):
        torch.manual_seed(step)
        host.step(*toy_batches(step), clock=step)
    monkeypatch.setattr(guard_module, "host_flag", lambda flag: None)
    monkeypatch.setattr(ema_module, "host_flag", lambda flag: None)
    device = _mpl()
    for step in range(3):
        torch.manual_seed(step)
        device.step(*toy_batches(step), clock=step)
    for a, b in zip(host.state_dict()["ema"]["module"].values(), device.state_dict()["ema"]["module"].values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(host.student.state_dict().values(), device.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ok", [True, False])
def test_guard_restores_exactly_unless_ok(decision_path, ok):
    model = _net(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard([model], [opt])
    before = [t.clone() for t in guard.live]
    guard.save()
    model(torch.randn(4, 5)).sum().backward()
    opt.step()
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")  # a non-finite value must be undone too
    stepped = [t.clone() for t in guard.live]
    guard.restore_unless(torch.tensor(ok))
    expected = stepped if ok else before
    for t, e in zip(guard.live, expected):
        assert torch.equal(t, e)


def test_ema_update_is_the_formula_with_int_buffers_copied(decision_path):
    model = _net(4)
    ema = ModelEMA(model, decay=0.5)
    start = copy.deepcopy(ema.module.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model[1].num_batches_tracked += 7
    ema.update(model, torch.tensor(True))
    d = min(0.5, 1 / 10)
    for name, value in model.state_dict().items():
        got = ema.module.state_dict()[name]
        if value.is_floating_point():
            torch.testing.assert_close(got, d * start[name] + (1 - d) * value)
        else:
            assert torch.equal(got, value), name
