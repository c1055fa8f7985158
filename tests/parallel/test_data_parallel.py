"""Data-parallel MPL on CPU with gloo: 2 ranks at batch B against one process at batch 2B.

One module-scoped fixture starts 2 ranks once (torch.multiprocessing.spawn, file://
rendezvous) and runs every data-parallel scenario in them; each test then checks one property
against single-process runs made here. A rank that dies, and a real torchrun, get their own
processes.
"""

import json
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mpl_testing import free_port, set_fields, tiny_dali_config, torchrun_trainer

from mpl_fast import checkpoint as ckpt
from mpl_fast.data.dali_pipeline import dali_unavailable_reason
from mpl_fast.train import run
from mpl_fast.train.config import preset

WORLD = 2


def _moons(out_dir, ranks: int, **kw):
    """Two-moons, no BatchNorm, no dropout, hard labels: DP must equal one process to round-off."""
    cfg = preset("two-moons")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 20, 5, 10, 0
    cfg.mpl.pseudo_labels = "hard"  # sampled labels would draw different random numbers per rank
    cfg.data.batch_size = 6 // ranks
    cfg.data.full_unlabeled_batch, cfg.data.mu = False, 2  # small batches: 6 (+ 12) per step in all
    cfg.output_dir = str(out_dir)
    return set_fields(cfg, **kw)


def _digits(out_dir, ranks: int = 1, **kw):
    cfg = preset("digits")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 16, 4, 8, 0
    cfg.mpl.student_wait_steps, cfg.mpl.uda_ramp_steps = 4, 10
    cfg.teacher.warmup_steps = cfg.student.warmup_steps = 3
    cfg.finetune.steps, cfg.threads = 3, 1
    cfg.data.batch_size = 16 // ranks
    cfg.output_dir = None if out_dir is None else str(out_dir)
    return set_fields(cfg, **kw)


@pytest.mark.parametrize("dataset", ["digits", "two-moons"])
def test_embedded_ranks_slice_one_global_batch(dataset):
    """N ranks at batch B see exactly the rows one process draws at batch N*B, augmentation included."""
    from mpl_fast.data import build_streams

    cfg = preset(dataset).data
    cfg.batch_size = 4
    one = build_streams(cfg, seed=3)
    cfg.batch_size = 2
    parts = [build_streams(cfg, seed=3, rank=r, world_size=WORLD) for r in range(WORLD)]
    for _ in range(5):  # across epoch boundaries of the 6 labeled two-moons points too
        for stream in ("labeled", "unlabeled"):
            whole = next(getattr(one, stream))
            sliced = [next(getattr(p, stream)) for p in parts]
            for i in range(2):
                assert torch.equal(whole[i], torch.cat([s[i] for s in sliced]))
    with pytest.raises(ValueError, match="rank must be in"):
        build_streams(cfg, seed=3, rank=2, world_size=WORLD)


def _cifar(out_dir, data_dir, ranks: int = WORLD, **kw):
    """The cifar10-4k recipe on a tiny CIFAR-10-format folder, shrunk to a few CPU steps."""
    cfg = preset("cifar10-4k")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every, cfg.threads = 6, 2, 100, 0, 1
    cfg.data.data_dir, cfg.data.labels_per_class, cfg.data.val_per_class = str(data_dir), 2, 1
    cfg.data.batch_size, cfg.data.mu, cfg.data.num_workers, cfg.data.eval_batch_size = 2, 1, 0, 64
    cfg.model.name = "digits-cnn"  # a small CNN: the wiring is under test, not WRN-28-2
    cfg.mpl.student_wait_steps, cfg.finetune.steps = 0, 0
    cfg.output_dir = str(out_dir)
    return set_fields(cfg, **kw)


def _dali(out_dir, data_dir, **kw):
    """Per-rank stream state is under test: the tiny DALI recipe with mu 1."""
    return tiny_dali_config(out_dir, data_dir, mu=1, uda_ramp_steps=4, **kw)


# ----------------------------------------------------------------------------- in the ranks

def _record_dali_starts() -> None:
    """Records in _RECORD how each DALI stream (re)started: from a checkpoint, or by skipping ahead."""
    if dali_unavailable_reason() is not None:
        return
    from mpl_fast.data.dali_pipeline import DaliTrainBatches

    original_start = DaliTrainBatches._start

    def start(self):
        original_start(self)
        _RECORD.setdefault(_RECORD["current"], {"h": []}).setdefault("dali_starts", []).append(
            {"consumed": self.consumed, "skipped_ahead": self.skipped_ahead,
             "from_checkpoint": self._checkpoint is not None})

    DaliTrainBatches._start = start


_RECORD: dict = {}


def _record_steps():
    """Wraps MPL.step to keep, per run, every step's h and the last student/teacher parameters."""
    from mpl_fast.algo.mpl import MPL

    original = MPL.step

    def step(self, *args, **kwargs):
        values = original(self, *args, **kwargs)
        if _RECORD.get("signal") == (dist.get_rank(), kwargs["clock"]):
            os.kill(os.getpid(), signal.SIGTERM)
        rec = _RECORD.setdefault(_RECORD["current"], {"h": []})
        rec["h"].append(float(values["h"]))
        rec["params"] = {f"{name}.{k}": v.detach().clone() for name, m in (("student", self.student),
                         ("teacher", self.teacher)) if m is not None for k, v in m.named_parameters()}
        return values

    MPL.step = step
    _record_dali_starts()


def _scenarios(rank: int, tmp: str) -> dict:
    returned = {}

    def go(name, cfg, **kw):
        _RECORD["current"] = name
        returned[name] = run(cfg, progress=False, quiet=True, **kw)

    for feedback in ("grad-dot", "finite-diff", "update-dot"):
        go(f"moons-{feedback}", _moons(os.path.join(tmp, f"moons-{feedback}"), WORLD, mpl__feedback=feedback))
    go("moons-supervised", _moons(os.path.join(tmp, "moons-supervised"), WORLD, method="supervised"))
    go("digits-no-dropout", _digits(os.path.join(tmp, "digits-no-dropout"), WORLD, model__dropout=0.0))
    go("digits-full", _digits(os.path.join(tmp, "digits-full"), WORLD, checkpoint_every=8))
    go("digits-part", _digits(os.path.join(tmp, "digits-part"), WORLD, checkpoint_every=8), stop_after=7)
    _RECORD["current"] = "digits-resumed"
    returned["digits-resumed"] = run(None, resume=os.path.join(tmp, "digits-part"), progress=False, quiet=True)
    cifar = os.path.join(tmp, "cifar-data")
    go("cifar-part", _cifar(os.path.join(tmp, "cifar-part"), cifar), stop_after=3)
    _RECORD["current"] = "cifar-resumed"
    returned["cifar-resumed"] = run(None, resume=os.path.join(tmp, "cifar-part"), progress=False, quiet=True)
    if dali_unavailable_reason() is None:
        images = os.path.join(tmp, "imagefolder")
        go("dali-full", _dali(os.path.join(tmp, "dali-full"), images))
        go("dali-part", _dali(os.path.join(tmp, "dali-part"), images), stop_after=3)
        _RECORD["current"] = "dali-resumed"
        returned["dali-resumed"] = run(None, resume=os.path.join(tmp, "dali-part"), progress=False, quiet=True)
    _RECORD["signal"] = (1, 5)  # rank 1 alone gets a SIGTERM after its 6th step
    go("digits-signal", _digits(os.path.join(tmp, "digits-signal"), WORLD, steps=12))
    _RECORD["signal"] = None
    os.chdir(tmp)  # default output folder runs/<timestamp>: rank 0's name for every rank
    go("digits-default-dir", _digits(None, WORLD, steps=4, finetune__steps=0))
    return returned


def _rank_main(rank: int, init_file: str, tmp: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    _record_steps()
    returned = _scenarios(rank, tmp)
    recorded = {k: v for k, v in _RECORD.items() if k not in ("current", "signal")}
    torch.save({"returned": returned, "recorded": recorded}, os.path.join(tmp, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    """Runs every scenario once in 2 gloo ranks; returns (folder, per-rank results)."""
    from mpl_fast.data.tiny import write_tiny_cifar, write_tiny_imagefolder

    tmp = tmp_path_factory.mktemp("dp")
    write_tiny_cifar(str(tmp / "cifar-data"), train_per_class=6, test_per_class=2)
    if dali_unavailable_reason() is None:
        write_tiny_imagefolder(str(tmp / "imagefolder"), num_classes=3, train_per_class=5, val_per_class=2, size=48)
    mp.spawn(_rank_main, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _train_lines(folder):
    return [json.loads(ln) for ln in open(os.path.join(folder, "metrics.jsonl")) if '"h"' in ln]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- equivalence

@pytest.mark.parametrize("variant", ["grad-dot", "finite-diff", "update-dot", "supervised"])
def test_bn_free_model_dp_equals_single_process_to_round_off(dp, tmp_path, variant):
    """Two-moons MLP (no BatchNorm, no dropout): 2 ranks x 3 labeled (+ 2 x 6 unlabeled) per
    step give the single-process step on 6 (+ 12) to fp32 round-off, for 20 steps."""
    folder, ranks = dp
    name = f"moons-{variant}"
    kw = {"method": "supervised"} if variant == "supervised" else {"mpl__feedback": variant}
    single_cfg = _moons(tmp_path / "single", 1, **kw)
    single = run(single_cfg, progress=False, quiet=True)
    a = ckpt.load(str(tmp_path / "single" / "checkpoint.pt"))["mpl"]
    b = ckpt.load(str(folder / name / "checkpoint.pt"))["mpl"]
    for model in ("student", "teacher") if variant != "supervised" else ("student",):
        assert _max_diff(a[model], b[model]) < 1e-5, model
    for line_a, line_b in zip(_train_lines(tmp_path / "single"), _train_lines(folder / name), strict=True):
        for key in ("loss_teacher", "loss_student", "h", "loss_sup"):
            assert line_a[key] == pytest.approx(line_b[key], rel=1e-4, abs=1e-7), (line_a["step"], key)
    assert single["test_top1"] == ranks[0]["returned"][name]["test_top1"]
    if variant != "supervised":
        assert any(line["h"] != 0.0 for line in _train_lines(folder / name))  # the feedback was live


def _trained_parameters(state: dict, init: dict, model: str):
    """(final, initial) parameters of ``model`` as flat vectors (BatchNorm's running statistics left out)."""
    keys = [k for k, v in state[model].items() if v.is_floating_point() and "running" not in k]
    return (torch.cat([state[model][k].flatten() for k in keys]), torch.cat([init[model][k].flatten() for k in keys]))


def test_digits_with_batchnorm_stays_close_to_single_process(dp, tmp_path):
    """The digits CNN has BatchNorm: each rank normalises its 8 rows with their own statistics,
    one process its 16 rows, so the runs are not equal, only close. Measured after 16 steps
    (dropout off): the distance between the DP and single-process parameters is 0.13-0.16 of how
    far the single process moved (cosine of the two updates 0.99), teacher losses within 0.5%.
    For scale, one process at batch 8 (what a rank that never averages would do) is 0.74-1.10
    away with cosine 0.41-0.75. The bounds sit between: about 2x the DP drift, well below that."""
    from mpl_fast.train import build_mpl, build_streams

    folder, _ranks = dp
    cfg = _digits(tmp_path / "single", 1, model__dropout=0.0)
    torch.manual_seed(cfg.seed)
    init_mpl = build_mpl(cfg, build_streams(cfg))
    init = {"student": init_mpl.student.state_dict(), "teacher": init_mpl.teacher.state_dict()}
    run(cfg, progress=False, quiet=True)
    single = ckpt.load(str(tmp_path / "single" / "checkpoint.pt"))["mpl"]
    parallel = ckpt.load(str(folder / "digits-no-dropout" / "checkpoint.pt"))["mpl"]
    for model in ("student", "teacher"):
        (a, a0), (b, _) = _trained_parameters(single, init, model), _trained_parameters(parallel, init, model)
        relative = ((a - b).norm() / (a - a0).norm()).item()
        cosine = torch.nn.functional.cosine_similarity(a - a0, b - a0, dim=0).item()
        assert relative < 0.35 and cosine > 0.93, (model, relative, cosine)
    for line_a, line_b in zip(_train_lines(tmp_path / "single"), _train_lines(folder / "digits-no-dropout"),
                              strict=True):
        assert line_a["loss_teacher"] == pytest.approx(line_b["loss_teacher"], rel=0.02), line_a["step"]


# ----------------------------------------------------------------------------- rank roles

def test_every_rank_has_the_same_h_and_parameters(dp):
    _folder, ranks = dp
    for name, rec0 in ranks[0]["recorded"].items():
        rec1 = ranks[1]["recorded"][name]
        assert rec0["h"] == rec1["h"], name  # bit for bit: h comes from averaged gradients
        for k in rec0["params"]:
            assert torch.equal(rec0["params"][k], rec1["params"][k]), (name, k)


def test_only_rank_zero_writes_and_reports(dp):
    folder, ranks = dp
    summary = ranks[0]["returned"]["digits-full"]
    assert "test_top1" in summary and json.load(open(folder / "digits-full" / "summary.json")) == summary
    assert ranks[1]["returned"]["digits-full"] == {"rank": 1, "step": 16, "output_dir": str(folder / "digits-full")}
    lines = _train_lines(folder / "digits-full")
    assert [ln["step"] for ln in lines] == [4, 8, 12, 16]  # one line per interval, not one per rank
    assert all(ln["world_size"] == WORLD for ln in lines)
    runs = os.listdir(folder / "runs")
    assert len(runs) == 1, runs  # both ranks used rank 0's timestamped folder name
    assert ranks[0]["returned"]["digits-default-dir"]["output_dir"] == ranks[1]["returned"]["digits-default-dir"][
        "output_dir"]


def test_resume_under_data_parallel_is_exact(dp):
    folder, ranks = dp
    assert ranks[0]["returned"]["digits-part"]["interrupted"] and ranks[1]["returned"]["digits-part"]["step"] == 7
    a = ckpt.load(str(folder / "digits-full" / "checkpoint.pt"))
    b = ckpt.load(str(folder / "digits-part" / "checkpoint.pt"))
    assert a["step"] == b["step"] == 16 and len(b["rng_per_rank"]) == WORLD
    for model in ("student", "teacher", "student_opt"):
        x, y = a["mpl"][model], b["mpl"][model]
        if model.endswith("opt"):
            x, y = ({k: v["momentum_buffer"] for k, v in s["state"].items()} for s in (x, y))
        assert all(torch.equal(x[k], y[k]) for k in x), model
    for r in range(WORLD):  # rank 1's dropout stream was saved and restored too
        assert ranks[r]["recorded"]["digits-full"]["params"].keys() == ranks[r]["recorded"]["digits-resumed"][
            "params"].keys()
        assert all(torch.equal(ranks[r]["recorded"]["digits-full"]["params"][k], v)
                   for k, v in ranks[r]["recorded"]["digits-resumed"]["params"].items())
    assert ranks[0]["returned"]["digits-full"]["test_top1"] == ranks[0]["returned"]["digits-resumed"]["test_top1"]


def test_a_signal_on_one_rank_stops_every_rank_one_step_later(dp):
    folder, ranks = dp
    for r in range(WORLD):  # rank 1's signal after step 6 is agreed on by all after step 7
        returned = ranks[r]["returned"]["digits-signal"]
        assert returned["interrupted"] and returned["step"] == 7
    assert ckpt.load(str(folder / "digits-signal" / "checkpoint.pt"))["step"] == 7


def test_files_on_disk_train_and_resume_under_data_parallel(dp):
    """CIFAR-10 files through the torch DataLoader path, each rank reading its own shard (the
    shards themselves are checked in test_data_pipelines.py): the trainer runs, stops, and
    resumes from the checkpoint's stream positions on both ranks."""
    folder, ranks = dp
    assert ranks[0]["returned"]["cifar-part"]["interrupted"] and ranks[1]["returned"]["cifar-part"]["step"] == 3
    assert ranks[0]["returned"]["cifar-resumed"]["steps"] == 6
    assert ranks[1]["returned"]["cifar-resumed"] == {"rank": 1, "step": 6, "output_dir": str(folder / "cifar-part")}
    assert [ln["step"] for ln in _train_lines(folder / "cifar-part")] == [2, 4, 6]
    for name in ("cifar-part", "cifar-resumed"):  # the ranks stay equal with different data
        for k, v in ranks[0]["recorded"][name]["params"].items():
            assert torch.equal(v, ranks[1]["recorded"][name]["params"][k]), (name, k)


@pytest.mark.skipif(dali_unavailable_reason() is not None, reason="NVIDIA DALI not installed (optional extra `dali`)")
def test_dali_resume_under_data_parallel_loads_each_ranks_own_checkpoint(dp):
    """Each rank's DALI stream state is saved; on resume every rank restarts its pipeline from
    its own DALI checkpoint (nothing skipped ahead) and the run ends as the uninterrupted one."""
    folder, ranks = dp
    saved = ckpt.load(str(folder / "dali-full" / "checkpoint.pt"))
    assert [s["labeled"]["rank"] for s in saved["streams_per_rank"]] == list(range(WORLD))
    assert saved["streams"] == saved["streams_per_rank"][0]  # what older readers and other world sizes use
    for r in range(WORLD):
        starts = ranks[r]["recorded"]["dali-resumed"]["dali_starts"]
        assert len(starts) == 2, starts  # the labeled and the unlabeled stream
        for s in starts:
            assert s["consumed"] == 3 and s["from_checkpoint"] and s["skipped_ahead"] == 0, (r, s)
        full, resumed = ranks[r]["recorded"]["dali-full"]["params"], ranks[r]["recorded"]["dali-resumed"]["params"]
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], v) for k, v in resumed.items()), r
    a, b = (ckpt.load(str(folder / n / "checkpoint.pt")) for n in ("dali-full", "dali-part"))
    assert a["step"] == b["step"] == 6
    for model in ("student", "teacher"):
        assert all(torch.equal(v, b["mpl"][model][k]) for k, v in a["mpl"][model].items()), model
    for r in range(WORLD):  # both ranks' streams went on from where they stopped
        for name in ("labeled", "unlabeled"):
            assert b["streams_per_rank"][r][name]["consumed"] == a["streams_per_rank"][r][name]["consumed"] == 6


def test_a_checkpoint_of_another_world_size_falls_back_to_rank_zeros_stream_state():
    """Per-rank stream states are used only when the world size matches; single-process runs
    and other world sizes read ``state["streams"]`` (rank 0's) as before."""
    from mpl_fast.train.checkpointing import own_stream_state

    class Ctx:
        def __init__(self, rank, world_size):
            self.rank, self.world_size = rank, world_size

    class Sess:
        def __init__(self, rank, world_size, shards_data=True):
            self.ctx, self.notes = Ctx(rank, world_size), []
            self.shards_data = shards_data  # data parallel, and rank groups of k > 1 ranks; not a rank pair
            self.say = self.notes.append

    state = {"streams": "rank0", "streams_per_rank": ["rank0", "rank1"]}
    assert own_stream_state(Sess(1, 2), state) == "rank1"
    assert own_stream_state(Sess(1, 2, shards_data=False), state) == "rank0"  # a rank pair
    three = Sess(2, 3)
    assert own_stream_state(three, state) == "rank0" and "skips" in three.notes[0]
    assert own_stream_state(Sess(1, 2), {"streams": "rank0"}) == "rank0"  # an older checkpoint


# ----------------------------------------------------------------------------- failures

def _failing_rank(rank: int, port: int, out_dir: str, how: str, result_file: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    from mpl_fast.algo.mpl import MPL
    from mpl_fast.train import DataParallelFailure

    original = MPL.step

    def step(self, *args, **kwargs):
        if rank == 1 and kwargs["clock"] == 3:
            if how == "raise":
                raise RuntimeError("rank 1 fails on purpose")
            time.sleep(60)  # stalled: alive, but never joins the next collective
        return original(self, *args, **kwargs)

    MPL.step = step
    _record_dali_starts()
    start = time.perf_counter()
    try:
        run(_digits(out_dir, WORLD), progress=False, quiet=True, dist_timeout=3.0)
        outcome = "finished"
    except DataParallelFailure as exc:
        outcome = f"DataParallelFailure: {exc}"
    except BaseException as exc:  # noqa: BLE001 - the test reports what came
        outcome = f"{type(exc).__name__}: {exc}"
    with open(result_file, "w") as f:
        json.dump({"outcome": outcome, "seconds": time.perf_counter() - start}, f)
    os._exit(0)  # a stalled peer must not keep this process alive


def test_a_dead_or_stalled_rank_makes_rank_zero_exit_with_a_clear_error(tmp_path):
    """Two jobs of 2 ranks at once (start-up is most of the cost): in one, rank 1 raises; in the
    other it stalls (alive, never joining the next collective), which rank 0 waits out (3 s)."""
    ctx = mp.get_context("spawn")
    procs, results = [], {}
    for how in ("raise", "stall"):
        port = free_port()
        results[how] = str(tmp_path / f"{how}-rank0.json")
        for r in range(WORLD):
            result = results[how] if r == 0 else str(tmp_path / f"{how}-rank{r}.json")
            procs.append((how, r, ctx.Process(target=_failing_rank,
                                              args=(r, port, str(tmp_path / how), how, result))))
    for _how, _r, p in procs:
        p.start()
    hung = []
    deadline = time.monotonic() + 90
    for how, r, p in procs:
        if r == 0:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
            if p.is_alive():
                hung.append(how)
    for _how, _r, p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    assert not hung, f"rank 0 hung: {hung}"
    for how, path in results.items():
        got = json.load(open(path))
        assert got["outcome"].startswith("DataParallelFailure: rank 0 of 2: a collective operation failed"), got
        assert got["seconds"] < 45, (how, got)  # timeout 3 s plus start-up under load; never the 600 s default


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_two_processes_digits(tmp_path):
    out = tmp_path / "tr"
    proc = torchrun_trainer(2, ["--preset", "digits", "--steps", "12", "--log-every", "4", "--finetune.steps", "2",
                                "--output-dir", str(out)], timeout=120)
    assert proc.stdout.count("test top-1") == 1  # rank 0 alone prints the summary
    assert "data parallel: 2 ranks (gloo)" in proc.stdout
    summary = json.load(open(out / "summary.json"))
    assert summary["steps"] == 12 and summary["skipped_steps"] == 0
    assert [ln["world_size"] for ln in _train_lines(out)] == [2, 2, 2]
