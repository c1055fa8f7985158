"""Model-parallel MPL (mpl_fast.parallel.model_parallel): the teacher half and the student half of
the step joined by a link. Two devices in one process (two-devices) must equal the
single-device step; a rank pair (two gloo processes: rank 0 the teacher, rank 1 the student)
must match the single-process step; bad placements are refused before any work."""

import json
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mpl_testing import free_port
from torch import nn

from mpl_fast import checkpoint as ckpt
from mpl_fast.algo import MPL, MPLConfig, Schedules
from mpl_fast.optim import FusedSGD
from mpl_fast.parallel.distributed import shutdown
from mpl_fast.parallel.model_parallel import DistributedLink, InProcessLink, resolve_placement
from mpl_fast.train import main, run
from mpl_fast.train.config import preset

CLASSES, FEATURES, B, U = 3, 6, 4, 8
HPARAMS = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)


def _net() -> nn.Module:
    # BatchNorm (batch statistics and running buffers travel through guard, EMA, feedback) but no
    # dropout: the two processes of a rank pair draw no random numbers the one process would not.
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def _batches(step: int, poison_student: bool = False):
    g = torch.Generator().manual_seed(1000 + step)
    x_l = torch.randn(B, FEATURES, generator=g)
    y_l = torch.randint(0, CLASSES, (B,), generator=g)
    x_uw = torch.randn(U, FEATURES, generator=g)
    x_us = x_uw + 0.5 * torch.randn(U, FEATURES, generator=g)
    if poison_student:  # only the student's copy: the teacher's half of the step stays finite
        x_us = x_us.clone()
        x_us[0, 0] = float("inf")
    return (x_l, y_l), (x_uw, x_us)


def _mpl(feedback: str, kind: str = "hard", role: str = "both", link=None, devices=("cpu", "cpu")) -> MPL:
    torch.manual_seed(0)
    teacher, student = _net().to(devices[0]), _net().to(devices[1])
    if role == "teacher":
        student = None
    if role == "student":
        teacher = None
    schedules = Schedules(total_steps=10, teacher_lr=0.1, student_lr=0.2, student_wait=1, uda_weight=1.0)
    opt = lambda m: None if m is None else FusedSGD(m.parameters(), **HPARAMS)  # noqa: E731
    return MPL(teacher, student, opt(teacher), opt(student), schedules,
               MPLConfig(feedback=feedback, pseudo_labels=kind, uda_threshold=0.0, label_smoothing=0.1, ema_decay=0.9),
               method="mpl", link=link)


class RecordingLink(InProcessLink):
    """Two devices on the CPU, with every crossing value cloned (no aliasing across the link) and
    its kind recorded, so the test sees that the halves talk only through the link."""

    def __init__(self):
        super().__init__("cpu", "cpu")
        self.crossed = []

    def student_inputs(self, *tensors):
        return tuple(t.clone() for t in super().student_inputs(*tensors))

    def pseudo_labels(self, y_hat, rows):
        self.crossed.append(("y_hat", tuple(y_hat.shape), y_hat.dtype))
        return super().pseudo_labels(y_hat, rows).clone()

    def feedback(self, h, loss_student):
        self.crossed.append(("h", tuple(h.shape), h.dtype))
        return tuple(v.clone() for v in super().feedback(h, loss_student))

    def verdict(self, ok):
        self.crossed.append(("ok", tuple(ok.shape), ok.dtype))
        return super().verdict(ok).clone()


def _state(mpl: MPL) -> dict:
    out = {}
    for name, model in mpl.models().items():
        out.update({f"{name}.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    return out


@pytest.mark.parametrize("feedback,kind", [("grad-dot", "hard"), ("update-dot", "hard"),
                                           ("finite-diff", "hard"), ("grad-dot", "soft")])
def test_layout_a_equals_the_single_device_step(feedback, kind):
    single = _mpl(feedback, kind)
    link = RecordingLink()
    split = _mpl(feedback, kind, link=link)
    hs = []
    for step in range(4):
        out_single = single.step(*_batches(step), clock=step)
        out_split = split.step(*_batches(step), clock=step)
        for key in out_single:
            assert torch.equal(out_single[key], out_split[key]), (step, key)
        hs.append(float(out_single["h"]))
    a, b = _state(single), _state(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(single.baseline, split.baseline)
    # Teeth: the student waited one step, then h was live; only y_hat, h and ok crossed.
    assert hs[0] == 0.0 and all(h != 0.0 for h in hs[1:])
    y_shape = (U, CLASSES) if kind == "soft" else (U,)
    y_dtype = torch.float32 if kind == "soft" else torch.int64
    assert link.crossed[:1] == [("ok", (), torch.bool)]
    assert link.crossed[1:4] == [("y_hat", y_shape, y_dtype), ("h", (), torch.float32), ("ok", (), torch.bool)]
    assert len(link.crossed) == 1 + 3 * 3


# ----------------------------------------------------------------------------- rank pair

CASES = [("grad-dot", "hard"), ("update-dot", "soft"), ("finite-diff", "hard")]
STEPS = 4


def _rank_worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    role = "teacher" if rank == 0 else "student"
    results = {}
    for feedback, kind in CASES:
        mpl = _mpl(feedback, kind, role=role, link=DistributedLink(role, "cpu", kind, CLASSES))
        hs = [mpl.step(*_batches(step), clock=step)["h"].clone() for step in range(STEPS)]
        before = _state(mpl)
        # A step that is non-finite on the student's side only: both processes must skip it.
        poisoned = mpl.step(*_batches(STEPS, poison_student=rank == 1), clock=STEPS)
        results[f"{feedback}-{kind}"] = {
            "state": _state(mpl), "h": torch.stack(hs), "baseline": mpl.baseline.clone(),
            "unchanged_by_poisoned_step": all(torch.equal(v, _state(mpl)[k]) for k, v in before.items()),
            "skipped": int(mpl.skipped_total), "poisoned_skipped": float(poisoned["skipped"])}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Last, the student's process dies without a word in the middle of a run: the teacher's
    # next step must end with an error, not hang.
    if rank == 1:
        os._exit(1)
    t0 = time.perf_counter()
    try:
        mpl.step(*_batches(STEPS + 1), clock=STEPS + 1)
        message = None
    except Exception as exc:  # noqa: BLE001 - the point is which error, and when
        message = f"{type(exc).__name__}: {exc}"
    torch.save({"message": message, "seconds": time.perf_counter() - t0}, os.path.join(out_dir, "teacher_alone.pt"))


def test_layout_b_two_ranks_match_the_single_process_step(tmp_path):
    torch.set_num_threads(1)
    context = mp.spawn(_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    teacher_process, student_process = context.processes
    teacher_process.join(timeout=120)  # not spawn's join: it would terminate the teacher when the student dies
    student_process.join(timeout=10)
    assert teacher_process.exitcode == 0 and student_process.exitcode == 1
    teacher_rank, student_rank = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for feedback, kind in CASES:
        name = f"{feedback}-{kind}"
        single = _mpl(feedback, kind)
        hs = torch.stack([single.step(*_batches(step), clock=step)["h"] for step in range(STEPS)])
        want = _state(single)
        got = {**teacher_rank[name]["state"], **student_rank[name]["state"]}
        assert set(teacher_rank[name]["state"]) == {k for k in want if k.startswith("teacher.")}
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} {key}: {m}")
        # h on both sides: computed by the student, received by the teacher.
        for rank_results in (teacher_rank, student_rank):
            torch.testing.assert_close(rank_results[name]["h"], hs, rtol=1e-6, atol=1e-8)
        assert (hs[1:] != 0).all()
        torch.testing.assert_close(student_rank[name]["baseline"], single.baseline)
        # The poisoned step was skipped on both ranks, and left both halves as they were.
        for rank_results in (teacher_rank, student_rank):
            assert rank_results[name]["poisoned_skipped"] == 1.0 and rank_results[name]["skipped"] == 1
            assert rank_results[name]["unchanged_by_poisoned_step"]
    # The student's process died: gloo told the teacher's at once (a silent peer would hit the
    # process group's timeout instead).
    alone = torch.load(tmp_path / "teacher_alone.pt")
    # gloo words it as "Connection closed by peer" or as a "Read error", depending on timing.
    assert alone["message"] is not None and alone["seconds"] < 10
    assert any(word in alone["message"].lower() for word in ("closed", "read error", "connection reset")), \
        alone["message"]


# ----------------------------------------------------------------------------- the trainer


def test_trainer_runs_layout_a_on_the_digits_preset(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--model-parallel", "--teacher-device", "cpu", "--student-device", "cpu", "--steps", "6",
                 "--mpl.student-wait-steps", "2", "--eval-every", "3", "--log-every", "3", "--finetune.steps", "1",
                 "--output-dir", str(out)]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    lines = [json.loads(ln) for ln in open(out / "metrics.jsonl")]
    assert any(ln.get("h", 0.0) != 0.0 for ln in lines if "h" in ln)
    config = json.load(open(out / "config.json"))
    assert config["model_parallel"] and config["student_device"] == "cpu"


def _tiny_cfg(out_dir: str, model_parallel: bool):
    cfg = preset("digits")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 12, 4, 4, 0
    cfg.mpl.student_wait_steps, cfg.mpl.uda_ramp_steps = 2, 6
    cfg.finetune.steps, cfg.threads, cfg.model_parallel, cfg.output_dir = 2, 1, model_parallel, out_dir
    return cfg


def _trainer_rank_worker(rank: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    # One process group for the four runs (a run that finds one does not create or destroy it).
    dist.init_process_group("gloo", rank=rank, world_size=2)
    full = run(_tiny_cfg(os.path.join(out_dir, "full"), True), progress=False, quiet=True)
    part = run(_tiny_cfg(os.path.join(out_dir, "part"), True), progress=False, quiet=True, stop_after=3)
    resumed = run(None, resume=os.path.join(out_dir, "part"), progress=False, quiet=True)
    cfg = _tiny_cfg(os.path.join(out_dir, "no-dropout"), True)
    cfg.model.dropout, cfg.steps = 0.0, 8
    run(cfg, progress=False, quiet=True)
    torch.save({"full": full, "part": part, "resumed": resumed}, os.path.join(out_dir, f"summary{rank}.pt"))
    shutdown()


def test_trainer_layout_b_two_ranks_run_checkpoint_and_resume(tmp_path):
    mp.spawn(_trainer_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    teacher_rank, student_rank = (torch.load(tmp_path / f"summary{r}.pt") for r in (0, 1))
    # Both processes stop after the same step (a signal is agreed on one step later, see
    # data_parallel.StopAgreement; stop_after is the same on both ranks).
    assert teacher_rank["part"] == student_rank["part"] == {"interrupted": True, "step": 3,
                                                             "output_dir": str(tmp_path / "part")}
    full = teacher_rank["full"]
    assert full["steps"] == 12 and full["skipped_steps"] == 0
    # The teacher's process reports the student's and the EMA's accuracies, measured by the student's.
    assert set(full["test_top1"]) == {"student", "ema", "teacher", "selected", "finetuned"}
    assert student_rank["full"]["test_top1"] == full["test_top1"]
    # The teacher's process writes the run's files and its checkpoint holds both halves; the
    # student's, which finetunes the selected network, writes finetuned.pt.
    assert sorted(os.listdir(tmp_path / "full")) == ["checkpoint.pt", "config.json", "finetuned.pt",
                                                     "metrics.jsonl", "split.json", "summary.json"]
    state = ckpt.load(str(tmp_path / "full" / "checkpoint.pt"))
    assert state["mpl"]["teacher"] is not None and state["mpl"]["student"] is not None
    assert state["mpl"]["ema"] is not None and "student_rank" in state["rng"]
    lines = [json.loads(ln) for ln in open(tmp_path / "full" / "metrics.jsonl")]
    assert any(ln.get("h", 0.0) != 0.0 for ln in lines) and any("val_ema" in ln for ln in lines)
    # Resumed from step 4, the run ends where the uninterrupted one did (each process restored its RNG).
    resumed = ckpt.load(str(tmp_path / "part" / "checkpoint.pt"))
    for half in ("teacher", "student", "ema"):
        want = state["mpl"][half] if half != "ema" else state["mpl"]["ema"]["module"]
        got = resumed["mpl"][half] if half != "ema" else resumed["mpl"]["ema"]["module"]
        for key in want:
            assert torch.equal(got[key], want[key]), (half, key)
    assert teacher_rank["resumed"]["test_top1"] == full["test_top1"]
    # One file with both halves: the finished two-process run reopens in one process (two devices).
    reopened = run(None, resume=str(tmp_path / "full"), progress=False, quiet=True)
    assert reopened["steps"] == 12
    assert all(reopened["test_top1"][k] == full["test_top1"][k] for k in ("student", "ema", "teacher"))
    # Without dropout neither process draws random numbers the one-process run would draw
    # elsewhere: the two-process run is the one-process run, bit for bit.
    cfg = _tiny_cfg(str(tmp_path / "one-process"), False)
    cfg.model.dropout, cfg.steps = 0.0, 8
    run(cfg, progress=False, quiet=True)
    two, one = (ckpt.load(str(tmp_path / name / "checkpoint.pt"))["mpl"] for name in ("no-dropout", "one-process"))
    for half in ("teacher", "student"):
        assert all(torch.equal(two[half][k], one[half][k]) for k in one[half]), half
    lines = [json.loads(ln) for ln in open(tmp_path / "no-dropout" / "metrics.jsonl")]
    assert [ln["h"] for ln in lines if "h" in ln] == \
        [json.loads(ln)["h"] for ln in open(tmp_path / "one-process" / "metrics.jsonl") if '"h"' in ln]


@pytest.mark.parametrize("argv,expect", [
    (["--model-parallel", "--student-device", "cuda:3"], "--student-device cuda:3: that device does not exist"),
    (["--model-parallel", "--teacher-device", "tpu"], "--teacher-device 'tpu' is not a device name"),
    (["--teacher-device", "cpu"], "add --model-parallel"),
    (["--model-parallel", "--method", "supervised"], "has no teacher"),
])
def test_bad_placements_are_refused_before_any_work(argv, expect, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=expect):
        main(argv + ["--steps", "1", "--output-dir", str(out)])
    assert not out.exists()  # refused before the run wrote anything


def test_amp_follows_the_teachers_device(tmp_path):
    """--amp autocasts the teacher's forward where the teacher lives: bf16 on a CPU teacher (fp16,
    ~100x slower on a CPU, is refused there by mpl_fast.train.precision)."""
    from mpl_fast.train import build_mpl, build_streams, resolve_topology

    cfg = _tiny_cfg(str(tmp_path), True)
    cfg.amp, cfg.teacher_device, cfg.student_device = True, "cpu", "cpu"
    placement = resolve_topology(cfg).placement
    streams = build_streams(cfg, device=str(placement.data_device))
    mpl = build_mpl(cfg, streams, placement)
    with mpl.autocast():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    out = mpl.step(next(streams.labeled), next(streams.unlabeled), clock=5)  # past the student's wait
    assert torch.isfinite(out["h"]) and float(out["h"]) != 0.0


def test_default_gpu_placement_needs_two_gpus():
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    with pytest.raises(ValueError, match="puts the teacher on cuda:0 and the student on cuda:1, but [01] CUDA"):
        resolve_placement(True, "cuda", world_size=1, rank=0, local_rank=0)


@pytest.mark.parametrize("world_size", [3, 5])
def test_torchrun_world_size_must_be_even(world_size):
    """2k ranks run rank groups (tests/parallel/test_model_parallel_groups.py); an odd number has no pairs."""
    with pytest.raises(ValueError, match=f"even number of processes, got WORLD_SIZE={world_size}"):
        resolve_placement(True, "cpu", world_size=world_size, rank=0, local_rank=0)


def test_torchrun_ranks_take_the_two_roles():
    teacher = resolve_placement(True, "cpu", world_size=2, rank=0, local_rank=0)
    student = resolve_placement(True, "cpu", world_size=2, rank=1, local_rank=1)
    assert (teacher.layout, teacher.role, student.role) == ("rank-pair", "teacher", "student")
    assert teacher.student_device is None and student.teacher_device is None


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_layout_a_on_gpus_matches_one_device():
    """Teacher cuda:0, student cuda:1 (cuda:0 again with one GPU) against both on cuda:0."""
    student_device = "cuda:1" if torch.cuda.device_count() >= 2 else "cuda:0"
    one = _mpl("grad-dot", devices=("cuda:0", "cuda:0"))
    two = _mpl("grad-dot", devices=("cuda:0", student_device))  # the default link: InProcessLink(cuda:0, student)
    assert two.link.student_device == torch.device(student_device)
    for step in range(4):
        batches = [tuple(t.to("cuda:0") for t in part) for part in _batches(step)]
        out_one, out_two = one.step(*batches, clock=step), two.step(*batches, clock=step)
        assert out_two["h"].device == torch.device("cuda:0")  # h came back to the teacher
        torch.testing.assert_close(out_two["h"].cpu(), out_one["h"].cpu(), rtol=1e-5, atol=1e-7)
    assert next(two.ema.module.parameters()).device == torch.device(student_device)
    a, b = _state(one), _state(two)
    for key in a:
        torch.testing.assert_close(b[key].cpu(), a[key].cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("student_device", ["cpu", "cuda:1"])
def test_trainer_layout_a_with_a_gpu(student_device, tmp_path):
    """The trainer with the networks on different devices: data on the teacher's, moves to the student's."""
    if student_device == "cuda:1" and torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    out = tmp_path / "run"
    assert main(["--model-parallel", "--device", "cuda", "--teacher-device", "cuda:0", "--student-device",
                 student_device, "--steps", "6", "--mpl.student-wait-steps", "2", "--eval-every", "3",
                 "--log-every", "3", "--finetune.steps", "1", "--output-dir", str(out)]) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0 and "finetuned" in summary["test_top1"]
