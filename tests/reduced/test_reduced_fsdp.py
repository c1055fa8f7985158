"""Reduced MPL under --fsdp: the student and T_R sharded with FSDP2 over 2 gloo ranks (CPU) equal
one process on the global batch (two-moons MLP: no BatchNorm, no dropout; hard pseudo labels),
and a run stopped and resumed under --fsdp ends where the uninterrupted one does."""

import json
import os

import torch
from mpl_testing import init_gloo_rank, save_rank_result_and_leave, spawn_ranks
from test_reduced_data_parallel import _cfg, _final, _write_moons_store

from mpl_fast.train import run

WORLD = 2


def _rank_main(rank: int, init_file: str, tmp: str):
    init_gloo_rank(rank, WORLD, init_file)
    torch.set_num_threads(1)
    labels = os.path.join(tmp, "labels")

    def cfg(name):
        c = _cfg(os.path.join(tmp, name), labels, WORLD)
        c.fsdp, c.checkpoint_every, c.log_every = True, 10, 1
        return c

    from mpl_fast.parallel.sharding import is_sharded
    from mpl_fast.reduced.teacher import ReducedTeacher
    from mpl_fast.train import build

    built = build.build_mpl(cfg("unused"), build.build_streams(cfg("unused")))
    sharded = {"t_r": isinstance(built.teacher, ReducedTeacher) and is_sharded(built.teacher),
               "student": is_sharded(built.student)}
    del built
    run(cfg("fsdp"), progress=False, quiet=True)
    run(cfg("part"), progress=False, quiet=True, stop_after=7)
    run(None, resume=os.path.join(tmp, "part"), progress=False, quiet=True)
    save_rank_result_and_leave(sharded, tmp, rank)


def test_reduced_mpl_under_fsdp_equals_one_process_and_resumes_exactly(tmp_path):
    _write_moons_store(str(tmp_path / "labels"))
    assert spawn_ranks(_rank_main, WORLD, tmp_path) == [{"t_r": True, "student": True}] * WORLD
    one_cfg = _cfg(str(tmp_path / "one"), str(tmp_path / "labels"), 1)
    one_cfg.log_every = 1
    run(one_cfg, progress=False, quiet=True)
    lines = {name: [json.loads(ln) for ln in open(tmp_path / name / "metrics.jsonl") if '"h"' in ln]
             for name in ("fsdp", "one", "part")}
    assert len(lines["fsdp"]) == len(lines["one"]) == 20
    for a, b in zip(lines["fsdp"], lines["one"]):
        assert abs(a["h"] - b["h"]) <= 1e-6 + 1e-4 * abs(b["h"]), (a["h"], b["h"])
        assert abs(a["loss_mpl"] - b["loss_mpl"]) <= 1e-5
    assert any(ln["h"] != 0.0 for ln in lines["one"])
    sharded, one, resumed = (_final(tmp_path / name) for name in ("fsdp", "one", "part"))
    assert sharded.keys() == one.keys()  # the checkpoint holds whole tensors: the one-process format
    for k in one:
        torch.testing.assert_close(sharded[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        assert torch.equal(resumed[k], sharded[k]), k
    assert one["teacher.out.weight"].abs().max() > 0  # T_R moved away from the identity
    assert [ln["h"] for ln in lines["part"]] == [ln["h"] for ln in lines["fsdp"]]


def test_dry_run_with_fsdp_divides_the_state_over_the_ranks(monkeypatch, capsys):
    import re

    from mpl_fast.train.__main__ import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--preset", "imagenet-reduced-b7", "--fsdp", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for precision in ("fp32", "bf16"):
        one = next(ln for ln in out.splitlines() if ln.strip().startswith(f"{precision} activations, one device"))
        sharded = next(ln for ln in out.splitlines() if f"{precision} activations, --fsdp over 4 devices" in ln)
        whole, part = (float(re.findall(r"([\d.]+) GiB", ln)[0]) for ln in (one, sharded))
        assert 0 < part < whole
        if precision == "fp32":  # the preset's per-device batch fits one 80 GB accelerator (its docstring: ~54 GiB)
            assert whole < 78
