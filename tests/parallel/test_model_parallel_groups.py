"""Rank groups (model parallel x data parallel): 4 gloo ranks, ranks 0-1 the teacher, ranks 2-3 the
student; teacher rank i and student rank 2+i read shard i of the global batch and exchange
y_hat, (h, loss) and ok; each half averages its gradients within its own group (or, with
FSDP2, shards its network over its group). The step must equal one process on the global batch.

One module-scoped fixture starts the 4 ranks once (spawn, file:// rendezvous) and runs every
scenario; the tests compare against one-process runs made here.
"""

import copy
import json
import os
import signal

import pytest
import torch
import torch.distributed as dist
from mpl_testing import (
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
from mpl_fast.algo import MPL, GradClip, MPLConfig, Schedules
from mpl_fast.optim import FusedSGD
from mpl_fast.parallel.model_parallel import HalfGroups, resolve_placement
from mpl_fast.train.config import preset

WORLD, K = 4, 2
FEEDBACKS = ("grad-dot", "update-dot", "finite-diff")
STEPS = 4          # then one step non-finite on student rank 3 only (skipped everywhere), then one more
VARIANTS = ("averaged", "fsdp")


def _toy_mpl(feedback: str, groups: HalfGroups | None = None, fsdp: bool = False) -> MPL:
    """BN-free MLPs (as tests/parallel/test_fsdp.py) with UDA, label smoothing, clipping, Nesterov, weight
    decay and EMA on. ``groups``: this rank's half only, data parallel within its group."""
    from mpl_fast.parallel.data_parallel import GradientAverager, ShardedSync
    from mpl_fast.parallel.sharding import device_mesh, shard_model

    torch.manual_seed(0)
    teacher, student = (nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)) for _ in range(2))
    link = grad_sync = ema_module = None
    if groups is not None:
        if groups.role == "teacher":
            student = None
        else:
            teacher = None
        link = groups.link("cpu")
        grad_sync = (ShardedSync if fsdp else GradientAverager)(groups.half_group)
        if fsdp:
            mesh = device_mesh("cpu", groups.half_group)
            if student is not None:
                ema_module = copy.deepcopy(student)
            for m in (teacher, student, ema_module):
                if m is not None:
                    shard_model(m, mesh)
    opt = lambda m: None if m is None else FusedSGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True,  # noqa: E731
                                                    weight_decay=5e-4)
    schedules = Schedules(total_steps=10, teacher_lr=0.3, student_lr=0.5, teacher_warmup=1, uda_weight=1.0)
    return MPL(teacher, student, opt(teacher), opt(student), schedules,
               MPLConfig(feedback=feedback, uda_threshold=0.3, label_smoothing=0.1, ema_decay=0.9), method="mpl",
               clip=GradClip(teacher=0.5, student=0.5), grad_sync=grad_sync, link=link, ema_module=ema_module)


def _batches(step: int, index: int | None = None, student: bool = True):
    """The global batch (``index`` None) or shard ``index``; at step STEPS one strong unlabeled
    row of shard 1 is inf, in the one process and on student rank 3 (its teacher peer reads a
    clean copy: the verdict must come from the student's side)."""
    batches = toy_batches(200 + step, b=8, u=24)
    if step == STEPS and student:
        batches[1][1][24 // K, 0] = float("inf")  # the first row of shard 1
    return batches if index is None else rank_slice(batches, index, K)


def _run_steps(mpl: MPL, index: int | None, student: bool, full_state) -> dict:
    out = {"h": [], "skipped": []}
    for step in range(STEPS + 2):
        if step == STEPS:
            out["before_inf"] = full_state(mpl.state_dict())
        values = mpl.step(*_batches(step, index, student), clock=step)
        out["h"].append(float(values["h"]))
        out["skipped"].append(float(values["skipped"]))
    out["final"] = full_state(mpl.state_dict())
    out["baseline"] = float(mpl.baseline)
    return out


def _digits(out_dir: str, **overrides):
    """The digits preset (a CNN with BatchNorm and dropout), a few steps, 4 labeled per rank."""
    cfg = preset("digits")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 8, 4, 4, 0
    cfg.mpl.student_wait_steps, cfg.mpl.uda_ramp_steps = 2, 6
    cfg.finetune.steps, cfg.threads, cfg.model_parallel, cfg.output_dir = 2, 1, True, out_dir
    cfg.data.batch_size = 4
    return set_fields(cfg, **overrides)


def _trainer_scenarios(tmp: str) -> dict:
    """The trainer on 4 ranks: a whole run, the same run stopped after 3 steps and resumed, and
    a short --fsdp run (each network sharded over its half)."""
    from mpl_fast.parallel.sharding import is_sharded
    from mpl_fast.train import run

    seen, original, _current = {}, MPL.step, [""]

    def step(self, labeled, unlabeled, clock):  # records what each run's first step read
        name = _current[0]
        if name not in seen:
            net = self.teacher if self.teacher is not None else self.student
            seen[name] = {"x_l": labeled[0].clone(), "y_l": labeled[1].clone(), "sharded": is_sharded(net)}
        values = original(self, labeled, unlabeled, clock)
        if name == "signal" and clock == 2 and dist.get_rank() == WORLD - 1:
            os.kill(os.getpid(), signal.SIGTERM)  # one student rank alone, after its 3rd step
        return values

    MPL.step = step

    def go(name, **kw):
        _current[0] = name
        return run(_digits(os.path.join(tmp, name), **kw), progress=False, quiet=True)

    returned = {"full": go("full")}
    _current[0] = "part"
    returned["part"] = run(_digits(os.path.join(tmp, "part")), progress=False, quiet=True, stop_after=3)
    returned["resumed"] = run(None, resume=os.path.join(tmp, "part"), progress=False, quiet=True)
    returned["fsdp"] = go("fsdp", fsdp=True, steps=6, eval_every=3, log_every=3)
    returned["signal"] = go("signal")
    MPL.step = original
    returned["first_batch"] = seen
    return returned


def _rank_main(rank: int, init_file: str, tmp: str):
    from mpl_fast.parallel.sharding import full_state_dict

    torch.set_num_threads(1)
    init_gloo_rank(rank, WORLD, init_file)
    groups = HalfGroups.create(WORLD, rank)
    returned = {"steps": {}}
    for variant in VARIANTS:
        for feedback in FEEDBACKS:
            mpl = _toy_mpl(feedback, groups, fsdp=variant == "fsdp")
            returned["steps"][variant, feedback] = _run_steps(mpl, groups.index, groups.role == "student",
                                                              lambda s: copy.deepcopy(full_state_dict(s)))
            if variant == "fsdp":
                from mpl_fast.shards import local

                returned["steps"][variant, feedback]["local_numel"] = sum(
                    local(p).numel() for m in mpl.models().values() for p in m.parameters())
            del mpl
    returned["trainer"] = _trainer_scenarios(tmp)
    save_rank_result_and_leave(returned, tmp, rank)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("groups")
    return tmp, spawn_ranks(_rank_main, WORLD, tmp)


# ----------------------------------------------------------------------------- the step


def _close(got: dict, want: dict, what: str, tol: float = 1e-5) -> None:
    assert got.keys() == want.keys(), what
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=tol, atol=tol, msg=lambda m: f"{what}.{k}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("feedback", FEEDBACKS)
def test_four_ranks_equal_one_process_on_the_global_batch(ranks, feedback, variant):
    """2 teacher + 2 student ranks at 4 labeled (+12 unlabeled) each give the one-process step on
    8 (+24): teacher, student, EMA, momentum and h agree to ~1e-5 over 6 steps, one skipped."""
    _, results = ranks
    one = _toy_mpl(feedback)
    want = _run_steps(one, None, True, lambda s: copy.deepcopy(s))
    assert want["skipped"] == [0.0] * STEPS + [1.0, 0.0]  # teeth: the inf step is skipped in one process too
    assert all(h != 0.0 for h in want["h"][:STEPS])
    for rank, got in enumerate(results):
        got = got["steps"][variant, feedback]
        # h: computed on each student rank from averaged gradients, received by each teacher rank.
        torch.testing.assert_close(torch.tensor(got["h"][:STEPS]), torch.tensor(want["h"][:STEPS]),
                                   rtol=1e-5, atol=1e-7)
        assert got["skipped"] == want["skipped"], rank
        halves = ("teacher", "teacher_opt") if rank < K else ("student", "student_opt", "ema")
        for when in ("before_inf", "final"):
            for half in halves:
                if half.endswith("_opt"):
                    for i, st in want[when][half]["state"].items():
                        torch.testing.assert_close(got[when][half]["state"][i]["momentum_buffer"],
                                                   st["momentum_buffer"], rtol=1e-5, atol=1e-5)
                elif half == "ema":
                    _close(got[when]["ema"]["module"], want[when]["ema"]["module"], f"{rank} {when} ema")
                else:
                    _close(got[when][half], want[when][half], f"{rank} {when} {half}")
            other = "student" if rank < K else "teacher"
            assert got[when][other] is None  # this rank never held the other network
        if rank >= K:
            assert got["baseline"] == pytest.approx(want["baseline"], rel=1e-5, abs=1e-7)


def test_the_skipped_step_left_every_rank_as_it_was(ranks):
    """The step that was non-finite on student rank 3 alone was skipped on all 4 ranks: the state
    after it (seen through the last step, which equals one process) and the counters agree."""
    _, results = ranks
    for rank, got in enumerate(results):
        for key, run in got["steps"].items():
            assert run["skipped"][STEPS] == 1.0, (rank, key)
            assert sum(run["skipped"]) == 1.0, (rank, key)


def test_fsdp_each_rank_holds_half_of_its_network(ranks):
    _, results = ranks
    whole = sum(p.numel() for p in nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).parameters())
    numel = [got["steps"]["fsdp", "grad-dot"]["local_numel"] for got in results]
    # Each half's shards add up to its networks (teacher; student and EMA), none on one rank.
    assert sum(numel[:K]) == whole and sum(numel[K:]) == 2 * whole, numel
    assert max(numel[:K]) < whole and max(numel[K:]) < 2 * whole, numel


# ----------------------------------------------------------------------------- placement


def test_six_ranks_take_their_roles_peers_and_shards():
    roles = [HalfGroups(6, r) for r in range(6)]
    assert [g.role for g in roles] == ["teacher"] * 3 + ["student"] * 3
    assert [g.peer for g in roles] == [3, 4, 5, 0, 1, 2]
    assert [g.index for g in roles] == [0, 1, 2, 0, 1, 2]
    assert [g.is_leader for g in roles] == [True, False, False, True, False, False]
    placements = [resolve_placement(True, "cpu", world_size=6, rank=r, local_rank=r) for r in range(6)]
    assert [p.role for p in placements] == ["teacher"] * 3 + ["student"] * 3
    assert all(p.per_half == 3 for p in placements)
    assert [p.shard for p in placements] == [0, 1, 2, 0, 1, 2]


def test_a_half_may_average_only_within_its_own_group():
    """MPL refuses a one-half process whose gradient sync spans another group (e.g. the world,
    which would average the teacher's gradients with the student's)."""
    from mpl_fast.parallel.model_parallel import DistributedLink

    class Sync:
        active, group = True, object()

    torch.manual_seed(0)
    teacher = nn.Linear(5, 3)
    opt = FusedSGD(teacher.parameters(), lr=0.1)
    schedules = Schedules(total_steps=2, teacher_lr=0.1, student_lr=0.1)
    for half_group in (None, object()):
        link = DistributedLink("teacher", "cpu", peer=2, half_group=half_group)
        with pytest.raises(ValueError, match="only within its half's process group"):
            MPL(teacher, None, opt, None, schedules, grad_sync=Sync(), link=link)
    link = DistributedLink("teacher", "cpu", peer=2, half_group=Sync.group)
    assert MPL(teacher, None, opt, None, schedules, grad_sync=Sync(), link=link).link.peer == 2


# ----------------------------------------------------------------------------- the trainer


def _load_weights(path) -> dict:
    state = ckpt.load(str(path / "checkpoint.pt"))
    return {"teacher": state["mpl"]["teacher"], "student": state["mpl"]["student"],
            "ema": state["mpl"]["ema"]["module"]}


def test_trainer_on_four_ranks_writes_one_checkpoint_and_resumes_exactly(ranks):
    tmp, results = ranks
    full = results[0]["trainer"]["full"]
    assert full["steps"] == 8 and full["skipped_steps"] == 0
    # Rank 0 reports the student's and the EMA's accuracies, measured by rank 2 (the student's leader).
    assert set(full["test_top1"]) == {"student", "ema", "teacher", "selected", "finetuned"}
    assert results[K]["trainer"]["full"]["test_top1"] == full["test_top1"]
    for rank in (1, 3):  # not a leader: nothing to report
        assert results[rank]["trainer"]["full"] == {"rank": rank, "step": 8, "output_dir": str(tmp / "full")}
    # finetuned.pt: written by rank K, which finetunes the selected network
    assert sorted(os.listdir(tmp / "full")) == ["checkpoint.pt", "config.json", "finetuned.pt", "metrics.jsonl",
                                                "split.json", "summary.json"]
    lines = [json.loads(ln) for ln in open(tmp / "full" / "metrics.jsonl")]
    assert any(ln.get("h", 0.0) != 0.0 for ln in lines) and any("val_ema" in ln for ln in lines)
    assert all(ln["world_size"] == WORLD for ln in lines if "h" in ln)
    state = ckpt.load(str(tmp / "full" / "checkpoint.pt"))
    assert len(state["rng_per_rank"]) == WORLD and len(state["streams_per_rank"]) == WORLD
    # Every rank stopped after step 3; resumed from there, each rank with its own RNG and stream
    # position, the run ends with the uninterrupted run's weights, bit for bit.
    assert {r["trainer"]["part"]["step"] for r in results} == {3}
    want, got = _load_weights(tmp / "full"), _load_weights(tmp / "part")
    for half in want:
        for key in want[half]:
            assert torch.equal(got[half][key], want[half][key]), (half, key)
    assert results[0]["trainer"]["resumed"]["test_top1"] == full["test_top1"]


def test_a_four_rank_checkpoint_reopens_in_one_process(ranks):
    from mpl_fast.train import run

    tmp, results = ranks
    full = results[0]["trainer"]["full"]
    reopened = run(None, resume=str(tmp / "full"), progress=False, quiet=True)
    assert reopened["steps"] == 8
    assert all(reopened["test_top1"][k] == full["test_top1"][k] for k in ("student", "ema", "teacher"))


def test_trainer_with_fsdp_shards_each_half(ranks):
    tmp, results = ranks
    summary = results[0]["trainer"]["fsdp"]
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    assert set(summary["test_top1"]) == {"student", "ema", "teacher", "selected", "finetuned"}
    assert results[K]["trainer"]["fsdp"]["test_top1"] == summary["test_top1"]
    # The checkpoint holds whole (gathered) networks, loadable in one process.
    weights = _load_weights(tmp / "fsdp")
    model = preset("digits")
    from mpl_fast.models import create_model

    net = create_model(model.model.name, 10, dropout=model.model.dropout, in_channels=1)
    for half in ("teacher", "student", "ema"):
        net.load_state_dict(weights[half])  # whole tensors of the right shapes
        assert all(torch.isfinite(v).all() for v in weights[half].values() if v.is_floating_point())


def test_fsdp_with_two_model_parallel_ranks_is_refused(monkeypatch, tmp_path):
    from mpl_fast.train import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="needs 2k >= 4 processes"):
        run(_digits(str(tmp_path / "run"), fsdp=True), progress=False, quiet=True)
    assert not (tmp_path / "run").exists()


def test_peers_read_the_same_shard_and_the_shards_make_the_global_batch(ranks):
    """Teacher rank i and student rank 2+i read shard i; shards 0 and 1 together are the batch one
    process reads at twice the per-rank batch size (as data-parallel ranks slice it)."""
    from mpl_fast.data import build_streams

    _, results = ranks
    first = [r["trainer"]["first_batch"]["full"] for r in results]
    for i in range(K):
        assert torch.equal(first[i]["x_l"], first[K + i]["x_l"]) and torch.equal(first[i]["y_l"], first[K + i]["y_l"])
    cfg = _digits("unused")
    cfg.data.batch_size = 4 * K
    x_l, y_l = next(build_streams(cfg.data, seed=cfg.seed).labeled)
    assert torch.equal(torch.cat([first[i]["x_l"] for i in range(K)]), x_l)
    assert torch.equal(torch.cat([first[i]["y_l"] for i in range(K)]), y_l)
    assert not any(f["sharded"] for f in first)
    assert all(r["trainer"]["first_batch"]["fsdp"]["sharded"] for r in results)


def test_a_signal_on_one_student_rank_stops_all_four_one_step_later(ranks):
    tmp, results = ranks
    for rank, got in enumerate(results):  # rank 3's signal after step 3 is agreed on by all after step 4
        returned = got["trainer"]["signal"]
        assert returned["interrupted"] and returned["step"] == 4, rank
    assert ckpt.load(str(tmp / "signal" / "checkpoint.pt"))["step"] == 4


def test_torchrun_four_processes_model_parallel_fsdp_digits(tmp_path):
    """The real launcher: torchrun sets the environment, the trainer creates and destroys the
    process groups (sharded modules alive until the end must not abort the exit)."""
    out = tmp_path / "tr"
    proc = torchrun_trainer(4, ["--preset", "digits", "--model-parallel", "--fsdp", "--steps", "6",
                                "--log-every", "3", "--eval-every", "3", "--data.batch-size", "4",
                                "--mpl.student-wait-steps", "2", "--finetune.steps", "2", "--output-dir", str(out)],
                            timeout=180, env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.count("test top-1") == 1  # rank 0 alone prints the summary
    assert "teacher on ranks 0..1, student on ranks 2..3" in proc.stdout and "(FSDP2)" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0 and "finetuned" in summary["test_top1"]


@pytest.mark.cuda
@pytest.mark.parametrize("fsdp", [False, True])
def test_torchrun_four_gpus_model_parallel(tmp_path, fsdp):
    """Rank groups on 4 GPUs with NCCL (written for a lent multi-GPU machine; not run on the CPU VM)."""
    if torch.cuda.device_count() < 4:
        pytest.skip("needs 4 GPUs")
    out = tmp_path / "tr"
    proc = torchrun_trainer(4, ["--preset", "digits", "--device", "cuda", "--model-parallel", "--steps", "6",
                                "--log-every", "3", "--eval-every", "3", "--data.batch-size", "4",
                                "--mpl.student-wait-steps", "2", "--finetune.steps", "2", "--output-dir", str(out)]
                            + (["--fsdp"] if fsdp else []), timeout=300)
    assert "(nccl)" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0 and "finetuned" in summary["test_top1"]
