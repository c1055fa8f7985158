"""``--fsdp``: teacher and student sharded with FSDP2 over 2 gloo ranks (CPU).

One module-scoped fixture starts 2 ranks once (torch.multiprocessing.spawn, file://
rendezvous) and runs every sharded scenario in them; each test checks one property against
single-process runs made here.
"""

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from mpl_fast.algo import MPL, Schedules
from mpl_fast.optim import FusedSGD
from mpl_testing import assert_state_unchanged, init_gloo_rank, rank_slice, toy_batches

WORLD = 2
FEEDBACKS = ("grad-dot", "update-dot", "finite-diff")
STEPS = 4  # then one non-finite step (skipped), then one more


def _toy_mpl(feedback: str, mesh=None) -> MPL:
    """A BN-free MLP teacher and student (uneven shards: 3 classes over 2 ranks) with every
    part of the step on: UDA, label smoothing, clipping, Nesterov momentum, weight decay, EMA."""
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
    return MPL(teacher, student, opt(teacher), opt(student), schedules, method="mpl", feedback=feedback,
               uda_threshold=0.3, label_smoothing=0.1, ema_decay=0.9, grad_clip_teacher=0.5, grad_clip_student=0.5,
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
    from mpl_fast.parallel.sharding import device_mesh, full_state_dict, is_sharded, local

    mesh = device_mesh("cpu")
    results = {}
    for feedback in FEEDBACKS:
        mpl = _toy_mpl(feedback, mesh)
        assert is_sharded(mpl.student) and is_sharded(mpl.teacher) and is_sharded(mpl.ema.module)
        p = next(mpl.student.parameters())
        assert local(p).data_ptr() == p.to_local().data_ptr()  # a view: in-place writes land
        results[feedback] = _run_steps(mpl, rank, full_state_dict)
        results[feedback]["local_numel"] = sum(local(p).numel() for p in mpl.student.parameters())
    return results


def _rank_main(rank: int, init_file: str, tmp: str):
    import torch.distributed as dist

    init_gloo_rank(rank, WORLD, init_file)
    torch.set_num_threads(1)
    returned = {"steps": _step_scenarios(rank)}
    torch.save(returned, os.path.join(tmp, f"rank{rank}.pt"))
    import gc

    gc.collect()  # sharded modules go before the process group (mpl_fast.parallel.distributed.shutdown)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Runs every scenario once in 2 gloo ranks; returns (folder, per-rank results)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_rank_main, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


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


def test_each_rank_holds_half_of_the_student(ranks):
    _tmp, results = ranks
    whole = sum(p.numel() for p in _toy_mpl("grad-dot").student.parameters())
    parts = [results[r]["steps"]["grad-dot"]["local_numel"] for r in range(WORLD)]
    assert sum(parts) == whole and max(parts) <= whole // 2 + 16  # 3 classes: one row more on rank 0


@pytest.mark.parametrize("feedback", FEEDBACKS)
def test_a_non_finite_step_is_skipped_on_every_rank(ranks, feedback):
    """A NaN in rank 1's labeled rows: both ranks skip; sharded teacher, student, momentum and EMA unchanged."""
    _tmp, results = ranks
    for r in range(WORLD):
        got = results[r]["steps"][feedback]
        assert got["skipped"][STEPS] == 1.0
        assert_state_unchanged(got["before_nan"], got["after_nan"])
