"""``--fsdp``: teacher and student sharded with FSDP2 over 2 gloo ranks (CPU).

One module-scoped fixture starts 2 ranks once (torch.multiprocessing.spawn, file://
rendezvous) and runs every sharded scenario in them; each test checks one property against
single-process runs made here.
"""

import copy
import json
import os

import pytest
import torch
from mpl_testing import (
    assert_state_unchanged,
    init_gloo_rank,
    rank_slice,
    save_rank_result_and_leave,
    set_fields,
    spawn_ranks,
    torchrun_trainer,
    toy_batches,
)
from torch import nn

from mpl_fast import checkpoint as ckpt
from mpl_fast.algo import MPL, GradClip, MPLConfig, Schedules, StepPrecision
from mpl_fast.optim import FusedSGD
from mpl_fast.train.config import preset

WORLD = 2
FEEDBACKS = ("grad-dot", "update-dot", "finite-diff")
STEPS = 4  # then one non-finite step (skipped), then one more


def _toy_mpl(feedback: str, mesh=None, grad_scaler=None) -> MPL:
    """A BN-free MLP teacher and student (uneven shards: 3 classes over 2 ranks) with every
    part of the step on: UDA, label smoothing, clipping (active: it changes these steps' results,
    so the clip of sharded gradients is compared too), Nesterov momentum, weight decay, EMA."""
    from mpl_fast.parallel.data_parallel import ShardedSync
    from mpl_fast.parallel.sharding import shard_model

    torch.manual_seed(0)
    teacher, student = (nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)) for _ in range(2))
    ema_module = None
    if mesh is not None:  # the EMA copy is taken before sharding and sharded the same way
        ema_module = copy.deepcopy(student)
        for m in (teacher, student, ema_module):
            shard_model(m, mesh)
    opt = lambda m: FusedSGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)  # noqa: E731
    schedules = Schedules(total_steps=10, teacher_lr=0.3, student_lr=0.5, teacher_warmup=1, uda_weight=1.0)
    return MPL(teacher, student, opt(teacher), opt(student), schedules,
               MPLConfig(feedback=feedback, uda_threshold=0.3, label_smoothing=0.1, ema_decay=0.9), method="mpl",
               clip=GradClip(teacher=0.5, student=0.5), precision=StepPrecision(grad_scaler=grad_scaler),
               grad_sync=ShardedSync() if mesh is not None else None, ema_module=ema_module)


def _batches(step: int, rank: int | None = None):
    batches = toy_batches(100 + step, b=8, u=24)
    if step == STEPS:  # one labeled row of rank 1's share is NaN: every rank must skip this step
        batches[0][0][4, 0] = float("nan")
    return batches if rank is None else rank_slice(batches, rank, WORLD)


def _run_steps(mpl: MPL, rank: int | None, full_state) -> dict:
    """STEPS steps, the NaN step, one more; h of each and the full state around the NaN step."""
    out = {"h": [], "skipped": []}
    for step in range(STEPS + 2):
        if step == STEPS:
            out["before_nan"] = full_state(mpl.state_dict())
        values = mpl.step(*_batches(step, rank), clock=step)
        out["h"].append(float(values["h"]))
        out["skipped"].append(float(values["skipped"]))
        if step == STEPS:
            out["after_nan"] = full_state(mpl.state_dict())
    out["final"] = full_state(mpl.state_dict())
    return out


# ----------------------------------------------------------------------------- in the ranks

def _step_scenarios(rank: int) -> dict:
    from mpl_fast.parallel.sharding import device_mesh, full_state_dict, is_sharded
    from mpl_fast.shards import local

    mesh = device_mesh("cpu")
    results = {}
    for feedback in FEEDBACKS:
        mpl = _toy_mpl(feedback, mesh)
        assert is_sharded(mpl.student) and is_sharded(mpl.teacher) and is_sharded(mpl.ema.module)
        p = next(mpl.student.parameters())
        assert local(p).data_ptr() == p.to_local().data_ptr()  # a view: in-place writes land
        results[feedback] = _run_steps(mpl, rank, full_state_dict)
        results[feedback]["local_numel"] = sum(local(p).numel() for p in mpl.student.parameters())
    results["from_one_process"] = _continue_sharded(rank, mesh)
    return results


def _continue_sharded(rank: int, mesh) -> dict:
    """A one-process state (2 steps on the global batch, made here) loaded into sharded networks,
    then 2 sharded steps: the final full state."""
    from mpl_fast.parallel.sharding import full_state_dict

    one = _toy_mpl("update-dot")
    for step in range(2):
        one.step(*_batches(step), clock=step)
    sharded = _toy_mpl("update-dot", mesh)
    sharded.load_state_dict(copy.deepcopy(one.state_dict()))
    for step in range(2, 4):
        sharded.step(*_batches(step, rank), clock=step)
    return full_state_dict(sharded.state_dict())


def _digits(out_dir, **kw):
    """The digits preset (a CNN with BatchNorm and dropout), a few steps, 2 ranks x 8 labeled, sharded."""
    cfg = preset("digits")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 10, 2, 5, 0
    cfg.mpl.student_wait_steps, cfg.mpl.uda_ramp_steps = 2, 6
    cfg.teacher.warmup_steps = cfg.student.warmup_steps = 2
    cfg.finetune.steps, cfg.threads, cfg.fsdp = 2, 1, True
    cfg.data.batch_size = 8
    cfg.output_dir = str(out_dir)
    return set_fields(cfg, **kw)


def _trainer_scenarios(tmp: str) -> dict:
    """The trainer under --fsdp: a whole run, and the same run stopped after 6 steps (one evaluation in) and resumed."""
    from mpl_fast.train import run

    returned = {"full": run(_digits(os.path.join(tmp, "full")), progress=False, quiet=True)}
    returned["part"] = run(_digits(os.path.join(tmp, "part")), progress=False, quiet=True, stop_after=6)
    returned["resumed"] = run(None, resume=os.path.join(tmp, "part"), progress=False, quiet=True)
    short = dict(steps=4, eval_every=100, finetune__steps=0)
    returned["supervised"] = run(_digits(os.path.join(tmp, "supervised"), method="supervised", **short),
                                 progress=False, quiet=True)
    returned["bf16"] = run(_digits(os.path.join(tmp, "bf16"), amp=True, amp_dtype="bf16", **short),
                           progress=False, quiet=True)
    returned["short"] = run(_digits(os.path.join(tmp, "short"), **short), progress=False, quiet=True)
    returned["recompute"] = run(_digits(os.path.join(tmp, "recompute"), activation_checkpointing=True, **short),
                                progress=False, quiet=True)
    os.environ["MPL_FAST_ALLOW_CPU_FP16"] = "1"  # the GPU's loss-scaled fp16 path, on the CPU (slow)
    returned["fp16"] = run(_digits(os.path.join(tmp, "fp16"), amp=True, amp_dtype="fp16", **short),
                           progress=False, quiet=True)
    del os.environ["MPL_FAST_ALLOW_CPU_FP16"]
    return returned


def _overflow_on_one_rank(rank: int, mesh, scaler) -> dict:
    """fp16 loss scaling: rank 1 alone finds an inf in its shard of the teacher's gradients at
    step 2. Returns per step whether this rank skipped, and the states around that step."""
    from mpl_fast.parallel.sharding import full_state_dict
    from mpl_fast.shards import local

    mpl = _toy_mpl("grad-dot", mesh, grad_scaler=scaler)
    mpl.clip = GradClip(teacher=0.0, student=mpl.clip.student)  # (a clip's norm is global: it would spread the inf to every rank)
    unscale = mpl.grad_scaler.unscale_
    clock = {"step": 0}

    def unscale_with_an_inf_on_rank_1(opt):
        if rank == 1 and clock["step"] == 2:
            local(next(mpl.teacher.parameters()).grad).view(-1)[0] = float("inf")
        return unscale(opt)

    mpl.grad_scaler.unscale_ = unscale_with_an_inf_on_rank_1
    out = {"skipped": []}
    for step in range(4):
        clock["step"] = step
        if step == 2:
            out["before"] = full_state_dict(mpl.state_dict())
        out["skipped"].append(float(mpl.step(*_batches(step, rank), clock=step)["skipped"]))
        if step == 2:
            out["after"] = full_state_dict(mpl.state_dict())
    return out


def _rank_main(rank: int, init_file: str, tmp: str):
    init_gloo_rank(rank, WORLD, init_file)
    torch.set_num_threads(1)
    from mpl_fast.parallel.sharding import device_mesh
    from mpl_fast.train.precision import resolve_precision

    returned = {"steps": _step_scenarios(rank), "trainer": _trainer_scenarios(tmp)}
    policy = resolve_precision(True, "fp16", "cpu", allow_cpu_fp16=True)  # the GPU's fp16 path, on the CPU
    returned["overflow"] = _overflow_on_one_rank(rank, device_mesh("cpu"), policy.grad_scaler())
    save_rank_result_and_leave(returned, tmp, rank)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs every scenario once in 2 gloo ranks; returns (folder, per-rank results)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, spawn_ranks(_rank_main, WORLD, tmp)


# ----------------------------------------------------------------------------- the step

def _assert_close_states(a: dict, b: dict, tol: float = 1e-5) -> None:
    """Teacher, student, both optimizers' momentum and the EMA of two MPL state dicts agree."""
    for key in ("teacher", "student"):
        for k, v in a[key].items():
            torch.testing.assert_close(b[key][k], v, rtol=tol, atol=tol, msg=lambda m: f"{key}.{k}: {m}")
    for k, v in a["ema"]["module"].items():
        torch.testing.assert_close(b["ema"]["module"][k], v, rtol=tol, atol=tol, msg=lambda m: f"ema.{k}: {m}")
    assert int(a["ema"]["num_updates"]) == int(b["ema"]["num_updates"])
    for key in ("teacher_opt", "student_opt"):
        for i, st in a[key]["state"].items():
            torch.testing.assert_close(b[key]["state"][i]["momentum_buffer"], st["momentum_buffer"], rtol=tol,
                                       atol=tol, msg=lambda m: f"{key}[{i}]: {m}")


@pytest.mark.parametrize("feedback", FEEDBACKS)
def test_sharded_steps_equal_one_process_on_the_global_batch(ranks, feedback):
    """2 ranks x 4 labeled (+ 12 unlabeled), networks sharded, give the one-process step on 8
    (+ 24): teacher, student, momentum, EMA and h agree to ~1e-5 after 6 steps, one of them skipped."""
    _tmp, results = ranks
    single = _run_steps(_toy_mpl(feedback), None, lambda s: copy.deepcopy(s))
    for r in range(WORLD):
        got = results[r]["steps"][feedback]
        assert got["h"][:STEPS] == pytest.approx(single["h"][:STEPS], rel=1e-4, abs=1e-7)
        assert got["h"][STEPS + 1] == pytest.approx(single["h"][STEPS + 1], rel=1e-4, abs=1e-7)
        assert any(h != 0.0 for h in got["h"][:STEPS])  # the feedback was live
        assert got["skipped"] == single["skipped"] == [0.0] * STEPS + [1.0, 0.0]
        _assert_close_states(single["before_nan"], got["before_nan"])
        _assert_close_states(single["final"], got["final"])
    h0, h1 = (torch.tensor(results[r]["steps"][feedback]["h"]) for r in range(WORLD))
    assert torch.equal(h0.nan_to_num(7.0), h1.nan_to_num(7.0))  # bit for bit (the skipped step's h is NaN)


def test_a_one_process_state_continues_sharded_as_in_one_process(ranks):
    """One-process state dicts load into sharded networks (each rank keeps its shards of the
    weights, momentum and EMA): 2 + 2 sharded steps end where 4 one-process steps do."""
    _tmp, results = ranks
    one = _toy_mpl("update-dot")
    for step in range(4):
        one.step(*_batches(step), clock=step)
    for r in range(WORLD):
        _assert_close_states(one.state_dict(), results[r]["steps"]["from_one_process"])


def test_each_rank_holds_half_of_the_student(ranks):
    _tmp, results = ranks
    whole = sum(p.numel() for p in _toy_mpl("grad-dot").student.parameters())
    parts = [results[r]["steps"]["grad-dot"]["local_numel"] for r in range(WORLD)]
    assert sum(parts) == whole and max(parts) <= whole // 2 + 16  # uneven: 3 output rows, 2 on rank 0


@pytest.mark.parametrize("feedback", FEEDBACKS)
def test_a_non_finite_step_is_skipped_on_every_rank(ranks, feedback):
    """A NaN in rank 1's labeled rows: both ranks skip; sharded teacher, student, momentum and EMA unchanged."""
    _tmp, results = ranks
    for r in range(WORLD):
        got = results[r]["steps"][feedback]
        assert got["skipped"][STEPS] == 1.0
        assert_state_unchanged(got["before_nan"], got["after_nan"])


# ----------------------------------------------------------------------------- the trainer

def test_trainer_under_fsdp_runs_and_writes_a_one_process_checkpoint(ranks):
    """2 ranks, --fsdp, digits: rank 0 reports, and its checkpoint (whole tensors, the
    one-process format) loads into unsharded networks in this process, which measure the same
    accuracies rank 0 measured on its gathered replicas."""
    from mpl_fast.train import accuracy, build_mpl, build_streams

    tmp, results = ranks
    summary = results[0]["trainer"]["full"]
    assert summary["steps"] == 10 and summary["skipped_steps"] == 0
    assert results[1]["trainer"]["full"] == {"rank": 1, "step": 10, "output_dir": str(tmp / "full")}
    assert json.load(open(tmp / "full" / "summary.json")) == summary
    state = ckpt.load(str(tmp / "full" / "checkpoint.pt"))
    assert state["config"]["fsdp"] and state["step"] == 10
    cfg = _digits(tmp / "unused", fsdp=False)
    streams = build_streams(cfg)
    mpl = build_mpl(cfg, streams)
    mpl.load_state_dict(state["mpl"])  # the format of a one-process checkpoint: loads as is
    for name, model in mpl.models().items():
        assert accuracy(model, streams.test) == summary["test_top1"][name], name
    lines = [json.loads(ln) for ln in open(tmp / "full" / "metrics.jsonl")]
    assert [ln["step"] for ln in lines if "h" in ln] == [2, 4, 6, 8, 10]
    assert any(ln["h"] != 0.0 for ln in lines if "h" in ln)


def test_resume_under_fsdp_is_exact(ranks):
    """Stopped after 6 steps, resumed from its checkpoint: the end equals the uninterrupted run."""
    tmp, results = ranks
    assert results[0]["trainer"]["part"]["interrupted"] and results[1]["trainer"]["part"]["step"] == 6
    a = ckpt.load(str(tmp / "full" / "checkpoint.pt"))["mpl"]
    b = ckpt.load(str(tmp / "part" / "checkpoint.pt"))["mpl"]
    for key in ("teacher", "student"):
        assert all(torch.equal(v, b[key][k]) for k, v in a[key].items()), key
    assert all(torch.equal(v, b["ema"]["module"][k]) for k, v in a["ema"]["module"].items())
    for key in ("teacher_opt", "student_opt"):
        assert all(torch.equal(st["momentum_buffer"], b[key]["state"][i]["momentum_buffer"])
                   for i, st in a[key]["state"].items()), key
    assert results[0]["trainer"]["full"]["test_top1"] == results[0]["trainer"]["resumed"]["test_top1"]


def test_activation_checkpointing_composes_with_fsdp(ranks):
    """--fsdp --activation-checkpointing (checkpointed blocks, then sharded) ends with the same
    weights, BatchNorm statistics and momentum as --fsdp alone: the recompute changes nothing."""
    tmp, results = ranks
    assert results[0]["trainer"]["recompute"]["steps"] == 4
    a = ckpt.load(str(tmp / "short" / "checkpoint.pt"))["mpl"]
    b = ckpt.load(str(tmp / "recompute" / "checkpoint.pt"))["mpl"]
    assert ckpt.load(str(tmp / "recompute" / "checkpoint.pt"))["config"]["activation_checkpointing"]
    _assert_close_states(a, b, tol=1e-6)
    assert all(torch.equal(v, b["student"][k]) for k, v in a["student"].items() if "running" in k or "batches" in k)


@pytest.mark.parametrize("variant", ["supervised", "bf16", "fp16"])
def test_supervised_and_mixed_precision_run_under_fsdp(ranks, variant):
    """--method supervised (no teacher), bf16 autocast, and fp16 with loss scaling (DTensor
    gradients through GradScaler.unscale_) each train 4 sharded steps with finite losses."""
    tmp, results = ranks
    summary = results[0]["trainer"][variant]
    assert summary["steps"] == 4 and summary["skipped_steps"] == 0, summary
    lines = [json.loads(ln) for ln in open(tmp / variant / "metrics.jsonl") if '"loss_student"' in ln]
    assert lines and all(ln["loss_student"] == ln["loss_student"] for ln in lines)  # not NaN
    if variant == "supervised":
        assert "teacher" not in summary["test_top1"]


def test_an_fp16_overflow_in_one_ranks_shard_skips_the_step_on_every_rank(ranks):
    """Under --fsdp each rank unscales only its gradient shards; GradScaler's inf/nan flag on
    DTensor gradients is nevertheless global (DTensor reduces it over the ranks: measured on
    torch 2.14, pinned here), so both ranks skip the step and keep their states."""
    _tmp, results = ranks
    for r in range(WORLD):
        got = results[r]["overflow"]
        assert got["skipped"] == [0.0, 0.0, 1.0, 0.0], r
        assert_state_unchanged(got["before"], got["after"])


# ----------------------------------------------------------------------------- refusals

def test_fsdp_with_compile_is_refused(capsys):
    """(--fsdp with --model-parallel shards each half over its group: tests/parallel/test_model_parallel_groups.py)"""
    from mpl_fast.train import main

    with pytest.raises(SystemExit) as exc:
        main(["--fsdp", "--compile", "--steps", "1"])
    assert exc.value.code == 2
    assert "--fsdp with --compile is not supported" in capsys.readouterr().err


def test_fsdp_without_torchrun_is_refused(monkeypatch, tmp_path):
    from mpl_fast.train import run

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match="--fsdp shards the networks over torchrun ranks"):
        run(_digits(tmp_path / "x"), progress=False, quiet=True)
    assert not (tmp_path / "x").exists()  # refused before any work


def test_dry_run_with_fsdp_plans_for_the_real_world_size(monkeypatch, capsys):
    from mpl_fast.train import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--dry-run", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "fsdp           on 4 device(s)" in out and "on 8 device(s)" not in out


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes_fsdp_digits(tmp_path):
    """The command line as a user types it, under a real torchrun: both ranks exit cleanly."""
    out = tmp_path / "tr"
    proc = torchrun_trainer(2, ["--fsdp", "--preset", "digits", "--steps", "6", "--log-every", "3",
                                "--eval-every", "3", "--finetune.steps", "2", "--threads", "1", "--output-dir",
                                str(out)], timeout=180)
    assert "sharded over the 2 ranks (FSDP2)" in proc.stdout and proc.stdout.count("test top-1") == 1
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0 and "finetuned" in summary["test_top1"]
