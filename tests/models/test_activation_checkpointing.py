"""--activation-checkpointing: which blocks are wrapped, that a checkpointed forward/backward and
a whole MPL step equal the plain ones (BatchNorm statistics, dropout masks, autograd.grad,
bf16 autocast), that the saved activations really shrink, and that copies stay correct."""

import contextlib
import copy

import pytest
import torch
import torchvision
from mpl_testing import set_fields
from torch import nn

from mpl_fast import checkpoint as run_checkpoint
from mpl_fast.algo import MPL, MPLConfig, Schedules, StepPrecision
from mpl_fast.algo.feedback import deterministic_forward
from mpl_fast.models import DigitsCNN, TwoMoonsMLP, WideResNet, create_model
from mpl_fast.models.checkpointing import (
    checkpointed_units,
    enable_activation_checkpointing,
    find_checkpoint_units,
    saved_activation_bytes,
)
from mpl_fast.optim import FusedSGD
from mpl_fast.train import build as train_build
from mpl_fast.train import main, run
from mpl_fast.train.config import preset
from mpl_fast.train.plan import measure_footprint


class _DropoutBlockNet(nn.Module):
    """Dropout and BatchNorm INSIDE the checkpointed units, named by the model itself."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.3))
            for c in (3, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.fc(x.mean((2, 3)))

    def activation_checkpoint_units(self):
        return list(self.stages)


@pytest.mark.parametrize("build,expected", [
    (lambda: WideResNet(10, 28, 2), 12),
    (lambda: DigitsCNN(10, 1), 1),
    (lambda: torchvision.models.resnet18(), 8),
    (lambda: create_model("resnet18", 10), 8),
    (lambda: create_model("efficientnet_b0", 10), 16),
])
def test_the_residual_blocks_are_the_units(build, expected):
    with torch.device("meta"):
        model = build()
    assert len(find_checkpoint_units(model)) == expected


def test_a_model_without_blocks_is_refused_by_name():
    with pytest.raises(ValueError, match="TwoMoonsMLP"):
        enable_activation_checkpointing(TwoMoonsMLP())


def test_checkpointing_twice_is_refused():
    model = WideResNet(5, 10, 1)
    assert enable_activation_checkpointing(model) == 3
    assert len(checkpointed_units(model)) == 3
    with pytest.raises(ValueError, match="already"):
        enable_activation_checkpointing(model)


def _grads_and_buffers(model, x, seed):
    torch.manual_seed(seed)
    model.train()
    loss = model(x).square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads, [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("build", [lambda: WideResNet(5, 10, 1, dropout=0.2), _DropoutBlockNet])
def test_checkpointed_backward_equals_plain(build):
    """Same loss, gradients and BN running statistics (updated once, not twice), and the same
    dropout masks inside a recomputed block, over two forward/backward passes."""
    torch.manual_seed(0)
    plain = build()
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    x = torch.randn(6, 3, 8, 8)
    for seed in (1, 2):
        loss_p, grads_p, bufs_p = _grads_and_buffers(plain, x, seed)
        loss_c, grads_c, bufs_c = _grads_and_buffers(ckpt, x, seed)
        assert torch.equal(loss_p, loss_c)
        for gp, gc in zip(grads_p, grads_c):
            torch.testing.assert_close(gc, gp, rtol=1e-6, atol=1e-7)
        for bp, bc in zip(bufs_p, bufs_c):
            assert torch.equal(bp, bc)
    nbt = [m.num_batches_tracked for m in ckpt.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(n) == 2 for n in nbt)  # two forwards, two recomputes: counted twice, not four times


def test_a_deep_copy_recomputes_its_own_blocks():
    """The EMA and the finetuned model are deep copies: their BatchNorm guard must act on the
    copy's buffers, and the original must be left alone."""
    torch.manual_seed(0)
    original = WideResNet(5, 10, 1)
    enable_activation_checkpointing(original)
    clone = copy.deepcopy(original)
    before = [b.clone() for b in original.buffers()]
    plain = copy.deepcopy(clone)
    for m in plain.modules():  # the same weights without hooks: the reference
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    x = torch.randn(4, 3, 8, 8)
    _, grads_c, bufs_c = _grads_and_buffers(clone, x, 0)
    _, grads_p, bufs_p = _grads_and_buffers(plain, x, 0)
    for gp, gc in zip(grads_p, grads_c):
        torch.testing.assert_close(gc, gp, rtol=1e-6, atol=1e-7)
    for bp, bc in zip(bufs_p, bufs_c):
        assert torch.equal(bp, bc)
    for b0, b1 in zip(before, original.buffers()):
        assert torch.equal(b0, b1)
    with torch.no_grad():  # evaluation of a checkpointed model runs as usual
        clone.eval()
        assert clone(x).shape == (4, 5)


def test_autograd_grad_through_checkpoints_in_deterministic_forward():
    """The feedback's g_l' is torch.autograd.grad under deterministic_forward: BN on batch stats
    without tracking, dropout off; the recompute must see the same flags and touch no buffer."""
    torch.manual_seed(0)
    plain = WideResNet(5, 10, 1, dropout=0.2)
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    x = torch.randn(4, 3, 8, 8)
    grads = []
    for model in (plain, ckpt):
        with deterministic_forward(model):
            grads.append(torch.autograd.grad(model(x).logsumexp(1).mean(), list(model.parameters())))
    for gp, gc in zip(*grads):
        torch.testing.assert_close(gc, gp, rtol=1e-6, atol=1e-7)
    for bp, bc in zip(plain.buffers(), ckpt.buffers()):
        assert torch.equal(bp, bc)


# ------------------------------------------------------------------ the whole MPL step

B, U, SIZE, CLASSES = 4, 12, 8, 5
HPARAMS = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _mpl(feedback: str, checkpointing: bool, autocast, device: str = "cpu") -> MPL:
    torch.manual_seed(0)
    teacher = WideResNet(CLASSES, depth=10, width=1, dropout=0.2).to(device)
    student = WideResNet(CLASSES, depth=10, width=1, dropout=0.2).to(device)
    if checkpointing:
        enable_activation_checkpointing(teacher)
        enable_activation_checkpointing(student)
    schedules = Schedules(total_steps=20, teacher_lr=0.05, student_lr=0.08, teacher_warmup=2, uda_weight=8.0,
                          uda_ramp=3)
    return MPL(teacher, student, FusedSGD(teacher.parameters(), **HPARAMS), FusedSGD(student.parameters(), **HPARAMS),
               schedules, MPLConfig(feedback=feedback, uda_temperature=0.7, uda_threshold=0.3, label_smoothing=0.15,
                                    ema_decay=0.995), precision=StepPrecision(autocast=autocast))


def _batches(step: int):
    g = torch.Generator().manual_seed(100 + step)
    x_l = torch.randn(B, 3, SIZE, SIZE, generator=g)
    y_l = torch.randint(0, CLASSES, (B,), generator=g)
    x_uw = torch.randn(U, 3, SIZE, SIZE, generator=g)
    return (x_l, y_l), (x_uw, x_uw + 0.5 * torch.randn(U, 3, SIZE, SIZE, generator=g))


def _close(a, b, where):
    if isinstance(a, torch.Tensor):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{where}: {m}")
        else:
            assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")


@pytest.mark.parametrize("feedback,amp", [("grad-dot", False), ("update-dot", False), ("finite-diff", False),
                                          ("grad-dot", True)])
def test_mpl_step_with_checkpointing_equals_the_plain_step(feedback, amp):
    """Three MPL steps, teacher and student checkpointed or not: the same h and losses, and the
    same teacher, student (BN running statistics and num_batches_tracked included), momentum,
    EMA and baseline, to round-off. ``amp``: the teacher's forward under bf16 autocast (the
    recompute must run under it too)."""
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if amp else contextlib.nullcontext
    plain, ckpt = _mpl(feedback, False, autocast), _mpl(feedback, True, autocast)
    hs = []
    for step in range(3):
        labeled, unlabeled = _batches(step)
        torch.manual_seed(step)
        out_p = plain.step(labeled, unlabeled, clock=step)
        torch.manual_seed(step)
        out_c = ckpt.step(labeled, unlabeled, clock=step)
        _close(out_p, out_c, f"step {step}")
        hs.append(float(out_p["h"]))
    assert all(h != 0.0 for h in hs[1:])  # the feedback really ran
    _close(plain.state_dict(), ckpt.state_dict(), "state")
    assert float(ckpt.skipped_total) == 0


# ------------------------------------------------------------------ memory, measured

def test_checkpointing_cuts_the_saved_activations_of_wrn28_2():
    """Bytes autograd saves during a training forward of WRN-28-2 at CIFAR size: with every
    block checkpointed only the 12 block inputs (plus stem and head) remain."""
    torch.manual_seed(0)
    plain = WideResNet(10, 28, 2)
    ckpt = copy.deepcopy(plain)
    assert enable_activation_checkpointing(ckpt) == 12
    x = torch.randn(4, 3, 32, 32)
    sizes = []
    for model in (plain, ckpt):
        model.train()
        state = (*model.parameters(), *model.buffers())
        sizes.append(saved_activation_bytes(lambda: model(x), exclude=state))
    plain_bytes, ckpt_bytes = sizes
    # Plain: ~8 saved tensors per block at the block's resolution; checkpointed: ~1.
    assert ckpt_bytes * 4 < plain_bytes, sizes
    assert ckpt_bytes > 0


# ------------------------------------------------------------------ the dry-run plan

def test_plan_counts_block_inputs_and_one_block_when_checkpointed():
    """Leaf outputs outside blocks + every block's input + the largest block's leaf outputs once."""
    with torch.device("meta"):
        model = _DropoutBlockNet()
    plain = measure_footprint(model, (3, 4, 4)).activation_elements_per_image
    ckpt = measure_footprint(model, (3, 4, 4), activation_checkpointing=True).activation_elements_per_image
    per_block = 4 * 8 * 16  # conv, bn, relu, dropout outputs of 8x4x4
    assert plain == 2 * per_block + 4
    assert ckpt == 4 + 3 * 16 + 8 * 16 + per_block


def test_dry_run_reports_the_smaller_activations(capsys):
    gib = {}
    for flag in ([], ["--activation-checkpointing"]):
        assert main(["--preset", "cifar10-4k", "--dry-run", *flag]) == 0
        out = capsys.readouterr().out
        single = next(ln for ln in out.splitlines() if "fp32 activations, single" in ln)
        gib[bool(flag)] = float(single.split(":")[-1].split()[0])
    assert "activation checkpointing: 12 blocks keep only their inputs" in out
    assert gib[True] < 0.6 * gib[False], gib


# ------------------------------------------------------------------ the trainer

def _digits(tmp_path, name, **overrides):
    cfg = preset("digits")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 10, 5, 100, 0
    cfg.mpl.student_wait_steps, cfg.finetune.steps, cfg.threads = 3, 0, 1
    cfg.output_dir = str(tmp_path / name)
    return set_fields(cfg, **overrides)


def test_trainer_with_and_without_the_flag_gives_the_same_weights(tmp_path, monkeypatch):
    """The digits preset (DigitsCNN with BN and dropout, EMA, UDA, grad-dot): 10 steps each way."""
    wrapped = []

    def counting(model):
        wrapped.append(enable_activation_checkpointing(model))
        return wrapped[-1]

    monkeypatch.setattr(train_build, "enable_activation_checkpointing", counting)
    for name, on in (("plain", False), ("ckpt", True)):
        run(_digits(tmp_path, name, activation_checkpointing=on), progress=False, quiet=True)
    assert wrapped == [1, 1]  # the flag reached the trainer: student and teacher, one stage each
    plain = run_checkpoint.load(str(tmp_path / "plain" / "checkpoint.pt"))["mpl"]
    checkpointed = run_checkpoint.load(str(tmp_path / "ckpt" / "checkpoint.pt"))["mpl"]
    for key in ("teacher", "student", "ema", "teacher_opt", "student_opt"):
        _close(plain[key], checkpointed[key], key)
    # BN counted once per training forward, recompute or not: the teacher 10, the student 10 - 3
    # (it waits 3 steps; its feedback forwards do not track)
    assert checkpointed["teacher"]["features.1.num_batches_tracked"] == 10
    assert checkpointed["student"]["features.1.num_batches_tracked"] == 7


def test_trainer_refuses_what_cannot_be_checkpointed(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse error: exit status 2
        main(["--compile", "--activation-checkpointing", "--steps", "1"])
    assert "compile and activation_checkpointing cannot be combined" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="TwoMoonsMLP"):
        run(_digits(tmp_path, "moons", preset="two-moons", model__name="two-moons-mlp", data__dataset="two-moons",
                    activation_checkpointing=True), progress=False, quiet=True)


# ------------------------------------------------------------------ with FSDP2 (fully_shard)

def _fsdp_rank(rank: int, init_file: str, results: str) -> None:
    """One of 2 gloo ranks: a checkpointed WRN sharded with fully_shard (per block, then the root,
    the order FSDP2 wants) against the same model unsharded and unchecked, both stepped twice on
    the same batch (so the ranks' averaged gradient is the single-process one)."""
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        plain = WideResNet(5, 10, 1, dropout=0.2)
        sharded = copy.deepcopy(plain)
        blocks = enable_activation_checkpointing(sharded)
        for block in checkpointed_units(sharded):
            fully_shard(block)
        fully_shard(sharded)
        opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (plain, sharded)]
        x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        for step in range(2):
            for model, opt in zip((plain, sharded), opts):
                torch.manual_seed(10 + step)
                opt.zero_grad()
                model(x).logsumexp(1).mean().backward()
                opt.step()
        worst = max((q.full_tensor() - p).abs().max().item()
                    for p, q in zip(plain.parameters(), sharded.parameters()))
        buffers_equal = all(torch.equal(p, q) for p, q in zip(plain.buffers(), sharded.buffers()))
        torch.save({"blocks": blocks, "worst": worst, "buffers_equal": buffers_equal}, f"{results}/{rank}.pt")
        del plain, sharded, opts  # before destroy_process_group (see the exit-abort note)
    finally:
        dist.destroy_process_group()


def test_checkpointed_blocks_compose_with_fully_shard(tmp_path):
    import torch.multiprocessing as mp  # noqa: PLC0415

    mp.spawn(_fsdp_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["blocks"] == 3
        assert result["worst"] < 1e-5, result
        assert result["buffers_equal"], result


def test_timm_efficientnet_with_drop_path_equals_plain():
    """timm's EfficientNet blocks (BatchNormAct2d, squeeze-excite, stochastic depth inside the
    block: the recompute must draw the same drop-path masks)."""
    import timm  # noqa: PLC0415

    torch.manual_seed(0)
    plain = timm.create_model("efficientnet_b0", pretrained=False, num_classes=5, drop_path_rate=0.5)
    ckpt = copy.deepcopy(plain)
    assert enable_activation_checkpointing(ckpt) == 16
    x = torch.randn(2, 3, 32, 32)
    loss_p, grads_p, bufs_p = _grads_and_buffers(plain, x, 7)
    loss_c, grads_c, bufs_c = _grads_and_buffers(ckpt, x, 7)
    assert torch.equal(loss_p, loss_c)
    for gp, gc in zip(grads_p, grads_c):
        torch.testing.assert_close(gc, gp, rtol=1e-5, atol=1e-6)
    for bp, bc in zip(bufs_p, bufs_c):
        assert torch.equal(bp, bc)


@pytest.mark.cuda
def test_on_a_gpu_checkpointing_lowers_peak_memory_and_keeps_the_step():
    """Written for a lent GPU (not run on the CPU-only dev machines): the MPL step's
    max_memory_allocated with checkpointing is clearly lower, and the step is the same; the
    recompute runs on the autograd engine's device thread (the BatchNorm guard is per thread)."""
    device = torch.device("cuda")
    peaks, states = [], []
    cudnn = torch.backends.cudnn
    saved_flags = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = True, False  # round-off equal runs need fixed algorithms
    for on in (False, True):
        mpl = _mpl("grad-dot", on, contextlib.nullcontext, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for step in range(2):
            (x_l, y_l), (x_uw, x_us) = _batches(step)
            big = lambda t: t.repeat(8, 1, 4, 4).to(device)  # noqa: E731 - 32x32 images, 8x the batch
            torch.manual_seed(step)
            mpl.step((big(x_l), y_l.repeat(8).to(device)), (big(x_uw), big(x_us)), clock=step)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        states.append({k: mpl.state_dict()[k] for k in ("teacher", "student", "ema")})
    cudnn.deterministic, cudnn.benchmark = saved_flags
    _close(states[0], states[1], "state")
    assert peaks[1] < 0.75 * peaks[0], peaks
