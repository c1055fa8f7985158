"""fp16 autocast of the teacher's forward and of the student's forward on the unlabeled batch,
each loss with its own GradScaler (--amp --amp-dtype fp16).

Run on the CPU: torch.amp.GradScaler("cpu") and fp16 autocast work there for tiny models (the
trainer refuses fp16 on a CPU for real runs: several times slower than fp32)."""

import contextlib
import copy
import io
import json
import os

import pytest
import torch
from mpl_testing import assert_state_unchanged, toy_batches
from torch import nn

from mpl_fast.algo import MPL, GradClip, MPLConfig, Schedules, StepPrecision
from mpl_fast.optim import FusedSGD
from mpl_fast.train import main, run

INIT_SCALE = 2.0 ** 16  # GradScaler's default


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))


def _fp16():
    return torch.autocast("cpu", dtype=torch.float16)


def _mpl(teacher, student, *, fp16: bool, optimizer=torch.optim.SGD, scaler=None, ema_decay=0.0,
         student_scaler=None):
    """fp16: the teacher's forward in fp16 with ``scaler``; ``student_scaler``: the student's
    forward on the unlabeled batch in fp16 too, with its own scaler."""
    t_opt = optimizer(teacher.parameters(), lr=0.1, momentum=0.9)
    s_opt = optimizer(student.parameters(), lr=0.1, momentum=0.9)
    sched = Schedules(total_steps=100, teacher_lr=0.1, student_lr=0.1, teacher_schedule="constant",
                      student_schedule="constant", uda_weight=1.0)
    if fp16 and scaler is None:
        scaler = torch.amp.GradScaler("cpu")
    return MPL(teacher, student, t_opt, s_opt, sched,
               MPLConfig(label_smoothing=0.1, uda_temperature=0.7, uda_threshold=0.0, ema_decay=ema_decay),
               clip=GradClip(teacher=1.0),
               precision=StepPrecision(
                   autocast=_fp16 if fp16 else contextlib.nullcontext, grad_scaler=scaler if fp16 else None,
                   student_autocast=_fp16 if student_scaler is not None else contextlib.nullcontext,
                   student_grad_scaler=student_scaler))


def _saved_and_loaded(state: dict) -> dict:
    """``state`` through torch.save and torch.load, as a checkpoint file carries it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _tensors(state: dict):
    """Every tensor of an MPL state dict that a step may change, by a readable key."""
    out = {}
    for net in ("teacher", "student"):
        out.update({f"{net}.{k}": v for k, v in state[net].items()})
        for i, st in state[f"{net}_opt"]["state"].items():
            out[f"{net}_opt.{i}"] = st["momentum_buffer"]
    if state["ema"] is not None:
        out.update({f"ema.{k}": v for k, v in state["ema"]["module"].items()})
    out["baseline"] = state["baseline"]
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_fp16_scaled_step_matches_fp32_step(seed):
    """Only the teacher's forward runs in fp16, so: the student's step (on the teacher's hard
    pseudo labels, with its own fp32 feedback) is the same to the bit as long as no argmax flips;
    the teacher's update differs by fp16 round-off in its logits and gradients (unit round-off
    2^-11 ~ 4.9e-4 per op, a few ops deep): within 1% of the update's size (measured 0.02%-0.16%),
    while the scale (2^16) cancels exactly (a power of two)."""
    ref = _mpl(_mlp(seed), _mlp(seed + 10), fp16=False)
    amp = _mpl(_mlp(seed), _mlp(seed + 10), fp16=True)
    before = copy.deepcopy(ref.state_dict())
    batches = toy_batches(seed)
    out_ref = ref.step(*batches, clock=0)
    out_amp = amp.step(*batches, clock=0)
    assert out_amp["skipped"].item() == 0 and amp.grad_scaler.get_scale() == INIT_SCALE
    assert out_ref["h"].item() == out_amp["h"].item() != 0.0
    for k, v in ref.student.state_dict().items():
        assert torch.equal(v, amp.student.state_dict()[k]), k
    steps_ref, steps_amp = [], []
    for (k, w0), w_ref, w_amp in zip(before["teacher"].items(), ref.teacher.state_dict().values(),
                                     amp.teacher.state_dict().values()):
        if not w0.is_floating_point():
            continue
        step_ref, step_amp = (w_ref - w0).flatten(), (w_amp - w0).flatten()
        steps_ref.append(step_ref)
        steps_amp.append(step_amp)
        # (measured: 0.02%-0.16%; the bias before BatchNorm gets no gradient, 0 in fp32 and
        # round-off in fp16, so it is held only to the whole step's bound below)
        if step_ref.norm() > 1e-6:
            assert (step_amp - step_ref).norm() <= 0.01 * step_ref.norm(), k
    step_ref, step_amp = torch.cat(steps_ref), torch.cat(steps_amp)
    assert (step_amp - step_ref).norm() <= 0.01 * step_ref.norm()
    torch.testing.assert_close(out_amp["loss_teacher"], out_ref["loss_teacher"], rtol=5e-3, atol=1e-3)


def _update(before: dict, net: nn.Module, key: str) -> torch.Tensor:
    return torch.cat([(v - before[key][k]).flatten() for k, v in net.state_dict().items() if v.is_floating_point()])


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, FusedSGD])
@pytest.mark.parametrize("seed", [0, 4])
def test_fp16_step_with_both_scalers_matches_fp32_step(seed, optimizer):
    """Teacher's forward and the student's unlabeled forward in fp16, each loss with its own
    scaler: both updates within 1% of the fp32 step's (measured 0.016%-0.025% on seeds 0-5),
    h within 1% with its sign (measured up to 0.16%, seed 4); the student's update is no longer
    bit-equal (its forward ran in fp16), and neither scale moved."""
    ref = _mpl(_mlp(seed), _mlp(seed + 10), fp16=False, optimizer=optimizer)
    amp = _mpl(_mlp(seed), _mlp(seed + 10), fp16=True, optimizer=optimizer,
               student_scaler=torch.amp.GradScaler("cpu"))
    before = copy.deepcopy(ref.state_dict())
    batches = toy_batches(seed)
    out_ref = ref.step(*batches, clock=0)
    out_amp = amp.step(*batches, clock=0)
    assert out_amp["skipped"].item() == 0
    assert amp.grad_scaler.get_scale() == amp.student_grad_scaler.get_scale() == INIT_SCALE
    h_ref, h_amp = out_ref["h"].item(), out_amp["h"].item()
    assert h_ref != 0.0 and h_amp * h_ref > 0 and abs(h_amp - h_ref) <= 0.01 * abs(h_ref), (h_ref, h_amp)
    for net in ("teacher", "student"):
        step_ref, step_amp = _update(before, getattr(ref, net), net), _update(before, getattr(amp, net), net)
        assert not torch.equal(step_amp, step_ref), net  # fp16 did run on both sides
        assert (step_amp - step_ref).norm() <= 0.01 * step_ref.norm(), net
    torch.testing.assert_close(out_amp["loss_student"], out_ref["loss_student"], rtol=5e-3, atol=1e-3)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, FusedSGD])
@pytest.mark.parametrize("injection", ["grad-hook", "fp16-overflow"])
def test_student_overflow_skips_the_whole_step_and_halves_only_the_students_scale(optimizer, injection):
    """An inf/nan in the student's (scaled) gradients: teacher, student, momentum, EMA and the
    baseline stay as they were, the step counts as skipped, the student's scale halves and the
    teacher's does not move (its loss and gradients stayed finite: h was sent as 0)."""
    t_scaler, s_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    mpl = _mpl(_mlp(0), _mlp(1), fp16=True, optimizer=optimizer, scaler=t_scaler, ema_decay=0.9,
               student_scaler=s_scaler)
    assert mpl.step(*toy_batches(0), clock=0)["skipped"].item() == 0  # momentum and EMA are non-trivial
    s_scale = INIT_SCALE
    if injection == "fp16-overflow":  # 2^40 overflows fp16 on the way back through the student's logits
        s_scale = 2.0 ** 40
        s_scaler.update(new_scale=s_scale)
    hook = (mpl.student[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
            if injection == "grad-hook" else None)
    before = copy.deepcopy(mpl.state_dict())
    out = mpl.step(*toy_batches(1), clock=1)
    assert out["skipped"].item() == 1 and torch.isnan(out["loss_student"]) and out["h"].item() == 0.0
    assert torch.isfinite(out["loss_teacher"])
    after = mpl.state_dict()
    assert_state_unchanged(before, after)
    for k, v in _tensors(before).items():
        assert torch.equal(v, _tensors(after)[k]), k
    assert mpl.skipped_total.item() == 1 and mpl.consecutive_skips.item() == 1
    assert s_scaler.get_scale() == s_scale * 0.5 and t_scaler.get_scale() == INIT_SCALE
    if hook is not None:
        hook.remove()
    out = mpl.step(*toy_batches(1), clock=1)
    if injection == "grad-hook":  # the same batch, now without the inf: applied
        assert out["skipped"].item() == 0 and torch.isfinite(out["loss_student"]) and out["h"].item() != 0.0
        assert not torch.equal(before["student"]["0.weight"], mpl.student.state_dict()["0.weight"])


def test_students_scaler_round_trips_through_state_dict():
    """The student's scaler (growing every 2 steps) saved and loaded into fresh objects: the next steps
    equal the uninterrupted run's to the bit; a checkpoint without the student's scaler (older)
    loads and leaves it at its start."""
    def fresh(seed_t, seed_s):
        return _mpl(_mlp(seed_t), _mlp(seed_s), fp16=True, optimizer=FusedSGD, ema_decay=0.9,
                    student_scaler=torch.amp.GradScaler("cpu", growth_interval=2))

    a = fresh(0, 1)
    for i in range(3):
        a.step(*toy_batches(i), clock=i)
    state = a.state_dict()
    assert state["student_grad_scaler"]["scale"] == INIT_SCALE * 2  # grew once: the state matters
    b = fresh(5, 6)
    b.load_state_dict(_saved_and_loaded(state))
    assert b.student_grad_scaler.state_dict() == state["student_grad_scaler"]
    for i in range(3, 6):
        out_a, out_b = a.step(*toy_batches(i), clock=i), b.step(*toy_batches(i), clock=i)
        assert torch.equal(out_a["h"], out_b["h"])
        torch.testing.assert_close(out_a["loss_student"], out_b["loss_student"], rtol=0, atol=0, equal_nan=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["student_grad_scaler"] == sb["student_grad_scaler"]
    # after the load: growth to 2^18, a real fp16 overflow in the student's gradients there
    # (skipped), back to 2^17; the teacher's scale never moved
    assert sa["student_grad_scaler"]["scale"] == INIT_SCALE * 2 and a.skipped_total.item() == b.skipped_total.item() == 1
    assert sa["grad_scaler"]["scale"] == sb["grad_scaler"]["scale"] == INIT_SCALE
    ta, tb = _tensors(sa), _tensors(sb)
    for k, v in ta.items():
        assert torch.equal(v, tb[k]), k
    old = dict(state)
    del old["student_grad_scaler"]
    c = fresh(5, 6)
    c.load_state_dict(old)
    assert c.student_grad_scaler.get_scale() == INIT_SCALE


def _explode_one_teacher_grad(mpl):
    """A hook that makes one of the teacher's gradients infinite (the loss stays finite)."""
    return mpl.teacher[0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, FusedSGD])
@pytest.mark.parametrize("injection", ["grad-hook", "fp16-overflow"])
def test_inf_in_teachers_grad_skips_the_whole_step_and_lowers_the_scale(optimizer, injection):
    scaler = torch.amp.GradScaler("cpu")
    mpl = _mpl(_mlp(0), _mlp(1), fp16=True, optimizer=optimizer, scaler=scaler, ema_decay=0.9)
    out = mpl.step(*toy_batches(0), clock=0)  # a good step first: momentum and EMA are non-trivial
    assert out["skipped"].item() == 0
    scale = INIT_SCALE
    if injection == "fp16-overflow":  # 2^40 overflows fp16 on the way back through the teacher's logits
        scale = 2.0 ** 40
        scaler.update(new_scale=scale)
    snap = copy.deepcopy(_tensors(mpl.state_dict()))
    hook = _explode_one_teacher_grad(mpl) if injection == "grad-hook" else None
    out = mpl.step(*toy_batches(1), clock=1)
    assert torch.isfinite(out["loss_teacher"]) and torch.isfinite(out["h"])  # only the gradient overflowed
    assert out["skipped"].item() == 1
    after = _tensors(mpl.state_dict())
    for k, v in snap.items():
        assert torch.equal(v, after[k]), k
    assert mpl.skipped_total.item() == 1 and mpl.consecutive_skips.item() == 1
    assert scaler.get_scale() == scale * 0.5
    if hook is not None:
        hook.remove()
    out = mpl.step(*toy_batches(1), clock=1)  # the same batch, now at a scale that fits
    if injection == "grad-hook":
        assert out["skipped"].item() == 0 and mpl.consecutive_skips.item() == 0
        assert not torch.equal(snap["teacher.0.weight"], mpl.teacher.state_dict()["0.weight"])
        assert not torch.equal(snap["student.0.weight"], mpl.student.state_dict()["0.weight"])


def test_resume_from_state_dict_is_bit_exact():
    """A few steps (with a scale that grows every 2 steps, up to a real overflow), save, load into
    fresh objects, go on: every tensor, the scale and the counters equal the uninterrupted run's."""
    def fresh(seed_t, seed_s):
        return _mpl(_mlp(seed_t), _mlp(seed_s), fp16=True, optimizer=FusedSGD, ema_decay=0.9,
                    scaler=torch.amp.GradScaler("cpu", growth_interval=2))

    a = fresh(0, 1)
    for i in range(3):
        a.step(*toy_batches(i), clock=i)
    saved = _saved_and_loaded(a.state_dict())
    assert a.state_dict()["grad_scaler"]["scale"] == INIT_SCALE * 2  # grew once: the state matters
    b = fresh(5, 6)  # other weights; everything must come from the state dict
    b.load_state_dict(saved)
    for i in range(3, 6):
        out_a = a.step(*toy_batches(i), clock=i)
        out_b = b.step(*toy_batches(i), clock=i)
        assert torch.equal(out_a["h"], out_b["h"]) and torch.equal(out_a["loss_teacher"], out_b["loss_teacher"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["grad_scaler"] == sb["grad_scaler"]
    # after the load: growth to 2^18, a real fp16 overflow there (skipped), back to 2^17
    assert sa["grad_scaler"]["scale"] == INIT_SCALE * 2 and a.skipped_total.item() == b.skipped_total.item() == 1
    ta, tb = _tensors(sa), _tensors(sb)
    for k, v in ta.items():
        assert torch.equal(v, tb[k]), k


def test_fp32_state_dict_loads_into_an_fp16_run_and_keeps_its_scaler():
    a = _mpl(_mlp(0), _mlp(1), fp16=False)
    a.step(*toy_batches(0), clock=0)
    state = a.state_dict()
    assert state["grad_scaler"] is None
    b = _mpl(_mlp(0), _mlp(1), fp16=True)
    b.load_state_dict(state)
    assert b.grad_scaler.get_scale() == INIT_SCALE


@pytest.mark.parametrize("argv,match", [
    (["--amp", "--amp-dtype", "fp16"], r"fp16 is refused on the CPU \(several times slower"),
    (["--amp-dtype", "fp16"], "given without --amp"),
])
def test_trainer_refuses_fp16_on_cpu_before_any_work(argv, match, tmp_path, monkeypatch):
    monkeypatch.delenv("MPL_FAST_ALLOW_CPU_FP16", raising=False)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=match) as exc:
        main(argv + ["--device", "cpu", "--steps", "1", "--output-dir", str(out)])
    assert str(exc.value).startswith("error:")
    assert not out.exists()


def _trainer_fp16_run(tmp_path, device: str, extra: tuple = ()) -> dict:
    assert main([*extra, "--amp", "--amp-dtype", "fp16", "--device", device, "--steps", "12", "--log-every", "4",
                 "--eval-every", "6", "--checkpoint-every", "6", "--mpl.student-wait-steps", "2",
                 "--finetune.steps", "1", "--threads", "1", "--output-dir", str(tmp_path)]) == 0
    summary = json.load(open(tmp_path / "summary.json"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert state["mpl"]["grad_scaler"]["scale"] > 0  # the scalers' states are in the checkpoint
    if "--no-amp-student" in extra:
        assert state["mpl"]["student_grad_scaler"] is None
    else:
        assert state["mpl"]["student_grad_scaler"]["scale"] > 0
    return summary


@pytest.mark.parametrize("extra", [(), ("--model-parallel", "--teacher-device", "cpu", "--student-device", "cpu"),
                                   ("--no-amp-student",)])
def test_trainer_runs_fp16_on_cpu_when_tests_allow_it(extra, tmp_path, monkeypatch):
    """The whole trainer path (flag, both scalers in build_mpl, checkpoint) with the test-only
    switch, in one process and with the teacher and student halves joined by the model-parallel
    link; --no-amp-student: the teacher's scaler only."""
    monkeypatch.setenv("MPL_FAST_ALLOW_CPU_FP16", "1")
    summary = _trainer_fp16_run(tmp_path, "cpu", extra)
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0


@pytest.mark.parametrize("argv,dtype", [([], torch.float16), (["--no-amp-student"], torch.float32)])
def test_trainer_builds_the_fp16_student_and_its_scaler_unless_no_amp_student(argv, dtype, monkeypatch):
    from mpl_fast.train import build_mpl, build_parser, build_streams, config_from_args

    monkeypatch.setenv("MPL_FAST_ALLOW_CPU_FP16", "1")
    cfg = config_from_args(build_parser().parse_args(["--amp", "--amp-dtype", "fp16", "--device", "cpu", *argv]))
    mpl = build_mpl(cfg, build_streams(cfg))
    assert mpl.grad_scaler is not None
    assert (mpl.student_grad_scaler is not None) == (dtype == torch.float16)
    with mpl.student_autocast():
        assert (torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32) == dtype


@pytest.mark.cuda
def test_trainer_fp16_on_cuda(tmp_path):
    """Written for a GPU machine (not run here): --amp fp16 trains with loss scaling on cuda."""
    summary = _trainer_fp16_run(tmp_path, "cuda")
    assert summary["steps"] == 12 and summary["skipped_steps"] <= 2


def _dp_rank(rank: int, init_file: str, tmp: str):
    """One of 2 gloo ranks: two-moons under fp16 with scales (2^24, both networks) that overflow at first."""
    import gc

    import torch.distributed as dist

    from mpl_fast.train.config import preset
    from mpl_fast.train.precision import PrecisionPolicy

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MPL_FAST_ALLOW_CPU_FP16="1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    PrecisionPolicy.grad_scaler = lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    seen = {}
    original = MPL.step

    def step(self, *args, **kwargs):
        seen["mpl"] = self
        return original(self, *args, **kwargs)

    MPL.step = step
    cfg = preset("two-moons")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every, cfg.max_nonfinite = 20, 5, 10, 0, 50
    cfg.mpl.pseudo_labels, cfg.data.batch_size, cfg.amp, cfg.amp_dtype = "hard", 3, True, "fp16"
    cfg.data.full_unlabeled_batch, cfg.data.mu = False, 2  # 3 (+ 6) points per rank per step
    cfg.output_dir = os.path.join(tmp, "run")
    run(cfg, progress=False, quiet=True)
    mpl = seen.pop("mpl")
    torch.save({"scale": mpl.grad_scaler.get_scale(), "student_scale": mpl.student_grad_scaler.get_scale(),
                "skipped": int(mpl.skipped_total),
                "params": {f"{n}.{k}": v.detach().clone() for n, m in (("teacher", mpl.teacher),
                           ("student", mpl.student)) for k, v in m.state_dict().items()}},
               os.path.join(tmp, f"rank{rank}.pt"))
    del mpl
    gc.collect()  # models before the process group (see mpl_fast.parallel.distributed.shutdown)
    dist.destroy_process_group()


def test_data_parallel_ranks_agree_on_overflow_skips_and_scale(tmp_path):
    """Gradients are averaged before they are unscaled, so every rank sees the same inf flag:
    the same steps are skipped, each scale (teacher's, student's) moves the same way on every
    rank, the weights stay equal."""
    import torch.multiprocessing as mp

    mp.spawn(_dp_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["skipped"] == r1["skipped"] >= 1 and r0["scale"] == r1["scale"] < 2.0 ** 24
    assert r0["student_scale"] == r1["student_scale"] < 2.0 ** 24  # the student's own scaler, shared too
    assert r0["params"].keys() == r1["params"].keys()
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k


def test_overflow_after_overflow_stops_the_run_and_says_so(tmp_path, monkeypatch, capsys):
    from mpl_fast.train.precision import PrecisionPolicy

    monkeypatch.setenv("MPL_FAST_ALLOW_CPU_FP16", "1")
    monkeypatch.setattr(PrecisionPolicy, "grad_scaler", lambda self: torch.amp.GradScaler("cpu", init_scale=2.0 ** 100))
    assert main(["--amp", "--amp-dtype", "fp16", "--steps", "8", "--log-every", "4", "--max-nonfinite", "3",
                 "--threads", "1", "--output-dir", str(tmp_path)]) != 0
    assert "3 steps in a row had a non-finite loss or h or overflowing fp16 gradients" in capsys.readouterr().err


def test_cpu_fp16_policy_only_with_the_test_switch():
    from mpl_fast.train.precision import resolve_precision

    with pytest.raises(ValueError, match="refused on the CPU"):
        resolve_precision(True, "fp16", "cpu")
    policy = resolve_precision(True, "fp16", "cpu", allow_cpu_fp16=True)
    assert policy.dtype == torch.float16 and policy.needs_loss_scaling and policy.grad_scaler().is_enabled()
    assert not resolve_precision(True, "bf16", "cpu", allow_cpu_fp16=True).grad_scaler().is_enabled()


def _layout_b_rank(rank: int, init_file: str, tmp: str):
    """Rank 0 the teacher (its scaler), rank 1 the student (its own scaler), joined by the
    distributed link: a clean step, then one where only the student's gradients overflow."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from mpl_testing import init_gloo_rank

    from mpl_fast.parallel.model_parallel import DistributedLink, RankSync

    torch.set_num_threads(1)
    init_gloo_rank(rank, 2, init_file)
    role = "teacher" if rank == 0 else "student"
    teacher, student = _mlp(0), _mlp(1)
    sched = Schedules(total_steps=100, teacher_lr=0.1, student_lr=0.1, teacher_schedule="constant",
                      student_schedule="constant", uda_weight=1.0)
    opt = lambda m: FusedSGD(m.parameters(), lr=0.1, momentum=0.9)  # noqa: E731
    mpl = MPL(teacher if role == "teacher" else None, student if role == "student" else None,
              opt(teacher) if role == "teacher" else None, opt(student) if role == "student" else None, sched,
              MPLConfig(uda_threshold=0.0, ema_decay=0.9),
              precision=StepPrecision(
                  autocast=_fp16, student_autocast=_fp16,
                  grad_scaler=torch.amp.GradScaler("cpu") if role == "teacher" else None,
                  student_grad_scaler=torch.amp.GradScaler("cpu") if role == "student" else None),
              link=DistributedLink(role, "cpu"))
    clean = mpl.step(*toy_batches(0), clock=0)
    if role == "student":
        mpl.student_grad_scaler.update(new_scale=2.0 ** 40)
    before = copy.deepcopy({k: v for k, v in mpl.state_dict().items() if k in ("teacher", "student", "ema")})
    out = mpl.step(*toy_batches(1), clock=1)
    after = mpl.state_dict()
    same = []
    for net in ("teacher", "student"):
        if before[net] is not None:
            same += [torch.equal(v, after[net][k]) for k, v in before[net].items()]
    if before["ema"] is not None:
        same += [torch.equal(v, after["ema"]["module"][k]) for k, v in before["ema"]["module"].items()]
    sync = RankSync(SimpleNamespace(layout="rank-pair", role=role))
    merged = sync.gather_checkpoint({"mpl": after, "rng": {}}, {"best": {"state": None}, "rng": {}})
    torch.save({"clean_skipped": float(clean["skipped"]), "skipped": float(out["skipped"]),
                "h": float(out["h"]), "loss_student": float(out["loss_student"]), "unchanged": all(same) and same != [],
                "scale": (mpl.grad_scaler or mpl.student_grad_scaler).get_scale(),
                "merged": None if merged is None else {k: merged["mpl"][k]
                                                       for k in ("grad_scaler", "student_grad_scaler")}},
               os.path.join(tmp, f"rank{rank}.pt"))
    import gc

    del mpl, teacher, student, sync
    gc.collect()  # models before the process group (see mpl_fast.parallel.distributed.shutdown)
    dist.destroy_process_group()


def test_layout_b_student_overflow_skips_both_halves_and_the_checkpoint_holds_both_scalers(tmp_path):
    """Two processes: the student's overflow reaches the teacher's process as (h=0, loss=NaN),
    both skip the step and leave their halves as they were; only the student's scale halves;
    rank 0's checkpoint holds the teacher's scaler and (from rank 1) the student's."""
    import torch.multiprocessing as mp

    mp.spawn(_layout_b_rank, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    t, s = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    for r in (t, s):
        assert r["clean_skipped"] == 0.0 and r["skipped"] == 1.0 and r["unchanged"]
        assert r["h"] == 0.0 and r["loss_student"] != r["loss_student"]  # NaN
    assert t["scale"] == INIT_SCALE and s["scale"] == 2.0 ** 39
    assert s["merged"] is None
    assert t["merged"]["grad_scaler"]["scale"] == INIT_SCALE
    assert t["merged"]["student_grad_scaler"]["scale"] == 2.0 ** 39
