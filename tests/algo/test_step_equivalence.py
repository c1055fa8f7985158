"""The fast MPL step (mpl_fast.algo.MPL, fused ops) and the plain port-style step of
benchmarks/plain_mpl.py compute the same numbers: a few steps from the same seed agree to
round-off in the teacher's and student's parameters, the EMA, h and the losses. This is what
makes bench_step.py's ratio a comparison of the same work."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))

from plain_mpl import PlainMPL, plain_sgd  # noqa: E402

from mpl_fast.algo import MPL, MPLConfig, Schedules  # noqa: E402
from mpl_fast.models import WideResNet  # noqa: E402
from mpl_fast.models.speed import to_channels_last  # noqa: E402
from mpl_fast.optim import FusedSGD  # noqa: E402

B, U, SIZE, CLASSES = 4, 12, 8, 5
HPARAMS = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _models(seed: int):
    torch.manual_seed(seed)
    teacher = WideResNet(CLASSES, depth=10, width=1, dropout=0.2)
    student = WideResNet(CLASSES, depth=10, width=1, dropout=0.2)
    return teacher, student


def _batches(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x_l = torch.randn(B, 3, SIZE, SIZE, generator=g)
    y_l = torch.randint(0, CLASSES, (B,), generator=g)
    x_uw = torch.randn(U, 3, SIZE, SIZE, generator=g)
    x_us = x_uw + 0.5 * torch.randn(U, 3, SIZE, SIZE, generator=g)
    return (x_l, y_l), (x_uw, x_us)


def _schedules(wait: int) -> Schedules:
    return Schedules(total_steps=20, teacher_lr=0.05, student_lr=0.08, teacher_warmup=2, student_warmup=0,
                     student_wait=wait, uda_weight=8.0, uda_ramp=3)


KW = dict(uda_temperature=0.7, uda_threshold=0.3, label_smoothing=0.15, ema_decay=0.995)


def _fast(optimizer: str, wait: int, channels_last: bool = False) -> MPL:
    teacher, student = _models(0)
    if channels_last:  # as mpl_fast.train lays them out by default; plain stays NCHW
        teacher, student = to_channels_last(teacher), to_channels_last(student)
    opt = (lambda m: FusedSGD(m.parameters(), **HPARAMS)) if optimizer == "fused" else \
          (lambda m: torch.optim.SGD(m.parameters(), **HPARAMS))
    return MPL(teacher, student, opt(teacher), opt(student), _schedules(wait),
               # plain_mpl.py tests UDA's confidence on the plain softmax (UDA's own code's mask)
               MPLConfig(feedback="grad-dot", baseline="off", uda_mask_on="unsharpened", **KW), method="mpl")


def _plain(wait: int) -> PlainMPL:
    teacher, student = _models(0)
    return PlainMPL(teacher, student, plain_sgd(teacher, **HPARAMS), plain_sgd(student, **HPARAMS),
                    _schedules(wait), **KW)


@pytest.mark.parametrize("optimizer,wait,channels_last",
                         [("torch-sgd", 0, False), ("fused", 0, False), ("fused", 1, False), ("fused", 0, True)])
def test_fast_and_plain_steps_agree(optimizer, wait, channels_last):
    fast, plain = _fast(optimizer, wait, channels_last), _plain(wait)
    hs = []
    for step in range(3):
        labeled, unlabeled = _batches(step)
        torch.manual_seed(step)  # the same dropout masks on both paths
        out_fast = fast.step(labeled, unlabeled, clock=step)
        torch.manual_seed(step)
        out_plain = plain.step(labeled, unlabeled, clock=step)
        for key, value in out_plain.items():
            torch.testing.assert_close(out_fast[key].double(), torch.tensor(value, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}, {key}: {m}")
        hs.append(out_plain["h"])
        assert float(out_fast["skipped"]) == 0.0
    # The comparison has teeth: the feedback was live, and the step moved the models.
    assert sum(h != 0.0 for h in hs) == 3 - wait
    for a, b in zip(fast.teacher.state_dict().values(), plain.teacher.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.student.state_dict().values(), plain.student.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.ema.module.state_dict().values(), plain.ema.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = max((a - b).abs().max().item() for a, b in zip(plain.student.parameters(), _models(0)[1].parameters()))
    assert moved > 1e-3
    if channels_last:  # the layout survived the optimizer and the guard: the convs really ran NHWC
        for model in (fast.teacher, fast.student, fast.ema.module):
            convs = [p for p in model.parameters() if p.dim() == 4]
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
            assert any(not p.is_contiguous() for p in convs)  # (1x1 kernels are both layouts at once)


def test_plain_step_detects_a_different_feedback():
    """Negative control: flip the sign of h in the plain path and the teachers part ways."""
    fast, plain = _fast("torch-sgd", 0), _plain(0)
    plain.mpl_weight = -1.0
    for step in range(2):
        labeled, unlabeled = _batches(step)
        torch.manual_seed(step)
        fast.step(labeled, unlabeled, clock=step)
        torch.manual_seed(step)
        plain.step(labeled, unlabeled, clock=step)
    diff = max((a - b).abs().max().item() for a, b in zip(fast.teacher.parameters(), plain.teacher.parameters()))
    assert diff > 1e-3  # round-off alone leaves ~1e-7
