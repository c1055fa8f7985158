"""The trainer's speed options: channels_last by default for conv models, and
``--compile``, whose first steps agree with the eager step to round-off."""

from types import SimpleNamespace

import pytest
import torch

from mpl_fast.algo import MPL, MPLConfig, Schedules
from mpl_fast.models import WideResNet
from mpl_fast.models.speed import compile_modules, use_channels_last
from mpl_fast.optim import FusedSGD
from mpl_fast.train import build_mpl, build_parser, config_from_args


def _streams(shape=(3, 8, 8), classes=5):
    return SimpleNamespace(input_shape=shape, num_classes=classes)


def _conv_weights(model):
    return [p for p in model.parameters() if p.dim() == 4]


@pytest.mark.parametrize("flag,expected", [([], True), (["--channels-last"], True), (["--no-channels-last"], False)])
def test_trainer_lays_conv_models_out_channels_last_unless_told_not_to(flag, expected):
    cfg = config_from_args(build_parser().parse_args(["--preset", "cifar10-4k", *flag]))
    cfg.model.name = "wrn28-2"
    mpl = build_mpl(cfg, _streams((3, 32, 32), 10))
    for model in (mpl.teacher, mpl.student, mpl.ema.module):
        weights = _conv_weights(model)
        assert all(p.is_contiguous(memory_format=torch.channels_last) == expected or p.shape[-2:] == (1, 1)
                   for p in weights)
        assert any(p.is_contiguous() != expected for p in weights)
    # The guard saves the live (channels_last) tensors, not copies made before the conversion.
    live = {t.data_ptr() for t in mpl.student_guard.live}
    assert all(p.data_ptr() in live for p in mpl.student.parameters())


def test_channels_last_only_for_conv_models_on_cpu_or_cuda():
    conv = WideResNet(5, depth=10, width=1)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert use_channels_last(conv, "cpu") and use_channels_last(conv, "cuda:0")
    assert not use_channels_last(conv, "cpu", enabled=False)
    assert not use_channels_last(conv, "meta") and not use_channels_last(mlp, "cpu")


def test_compile_flag_is_accepted_and_compiles_teacher_and_student_only():
    cfg = config_from_args(build_parser().parse_args(["--preset", "digits", "--compile"]))
    mpl = build_mpl(cfg, _streams((1, 8, 8), 10))
    assert mpl.teacher._compiled_call_impl is not None and mpl.student._compiled_call_impl is not None
    assert mpl.ema.module._compiled_call_impl is None  # the EMA copy stays eager
    eager = build_mpl(config_from_args(build_parser().parse_args(["--preset", "digits"])), _streams((1, 8, 8), 10))
    assert eager.student._compiled_call_impl is None


def _tiny_cnn() -> torch.nn.Module:
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(8, 5))


def _small_mpl(seed: int = 0) -> MPL:
    # The layer kinds of WRN (conv, BatchNorm, ReLU, pool, dropout, linear) in the fewest layers:
    # inductor compiles 6 graphs here (teacher; student in train and in feedback mode; fwd + bwd),
    # and on 2 busy cores every kernel it builds costs seconds.
    torch.manual_seed(seed)
    teacher, student = _tiny_cnn(), _tiny_cnn()
    opt = lambda m: FusedSGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)  # noqa: E731
    sched = Schedules(total_steps=20, teacher_lr=0.05, student_lr=0.08, teacher_schedule="constant",
                      student_schedule="constant", uda_weight=8.0)
    return MPL(teacher, student, opt(teacher), opt(student), sched,
               MPLConfig(uda_threshold=0.3, label_smoothing=0.15, ema_decay=0.995))


def _batches(step: int, b: int = 4, u: int = 12):
    g = torch.Generator().manual_seed(100 + step)
    x_l, y_l = torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 5, (b,), generator=g)
    x_uw = torch.randn(u, 3, 8, 8, generator=g)
    return (x_l, y_l), (x_uw, x_uw + 0.5 * torch.randn(u, 3, 8, 8, generator=g))


@pytest.mark.slow
def test_compiled_steps_agree_with_eager_steps():
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    eager, compiled = _small_mpl(), _small_mpl()
    compile_modules(compiled.teacher, compiled.student)
    for step in range(2):
        outs = []
        for mpl in (eager, compiled):
            torch.manual_seed(step)  # the same dropout masks (compile_modules keeps eager RNG)
            outs.append(mpl.step(*_batches(step), clock=step))
        for key, value in outs[0].items():
            torch.testing.assert_close(outs[1][key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{step} {key}: {m}")
        assert outs[0]["h"].item() != 0.0
    for model in ("teacher", "student"):
        for a, b in zip(getattr(eager, model).state_dict().values(), getattr(compiled, model).state_dict().values()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 3  # teacher, student, student in feedback mode
    torch._dynamo.reset()
