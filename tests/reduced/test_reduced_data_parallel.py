"""Reduced MPL under data parallel: 2 gloo ranks at batch B equal one process at batch 2B (two-moons
MLP: no BatchNorm, no dropout; hard pseudo labels), T_R included."""

import json
import os

import numpy as np
import torch
from mpl_testing import init_gloo_rank, save_rank_result_and_leave, spawn_ranks

from mpl_fast.data.config import DataConfig
from mpl_fast.reduced.images import images_to_label
from mpl_fast.reduced.store import TeacherLabelStore
from mpl_fast.train import run
from mpl_fast.train.config import preset

WORLD = 2


def _write_moons_store(folder: str) -> None:
    """Stored 'teacher' distributions for two-moons: the true class at 0.6..0.95 (a noisy teacher)."""
    images = images_to_label(DataConfig(dataset="two-moons"))
    from mpl_fast.data.embedded import load_training_images

    _, y = load_training_images("two-moons")
    rng = np.random.default_rng(0)
    top = rng.uniform(0.6, 0.95, len(y))
    probs = np.stack([top, 1 - top], 1)
    classes = np.stack([y, 1 - y], 1)
    store = TeacherLabelStore.create(folder, num_images=images.num_images, num_classes=2, k=2,
                                     teacher={"sha256": "0" * 64}, preprocessing={}, dataset=images.identity)
    store.write(0, probs, classes)
    store.commit([[0, images.num_images]])


def _cfg(out_dir: str, labels: str, ranks: int):
    cfg = preset("two-moons")
    cfg.method = "reduced-mpl"
    cfg.reduced.labels, cfg.reduced.hidden = labels, 8
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every = 20, 5, 10, 0
    cfg.mpl.pseudo_labels = "hard"  # sampled labels would draw different random numbers per rank
    cfg.mpl.student_wait_steps = 0
    cfg.teacher.lr = 0.5
    cfg.data.batch_size = 6 // ranks
    cfg.data.full_unlabeled_batch, cfg.data.mu = False, 2  # 6 (+ 12) points per step in all
    cfg.output_dir = out_dir
    return cfg


def _rank_main(rank: int, init_file: str, tmp: str):
    init_gloo_rank(rank, WORLD, init_file)
    run(_cfg(os.path.join(tmp, "dp"), os.path.join(tmp, "labels"), WORLD), progress=False, quiet=True)
    save_rank_result_and_leave({}, tmp, rank)


def _final(folder) -> dict:
    state = torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=False)["mpl"]
    return {f"{net}.{k}": v for net in ("teacher", "student") for k, v in state[net].items()}


def test_reduced_step_under_data_parallel_equals_one_process(tmp_path):
    _write_moons_store(str(tmp_path / "labels"))
    spawn_ranks(_rank_main, WORLD, tmp_path)
    run(_cfg(str(tmp_path / "one"), str(tmp_path / "labels"), 1), progress=False, quiet=True)
    lines = {name: [json.loads(ln) for ln in open(tmp_path / name / "metrics.jsonl") if '"h"' in ln]
             for name in ("dp", "one")}
    assert len(lines["dp"]) == len(lines["one"]) == 4
    for a, b in zip(lines["dp"], lines["one"]):
        assert abs(a["h"] - b["h"]) <= 1e-6 + 1e-4 * abs(b["h"]), (a["h"], b["h"])
        assert abs(a["loss_mpl"] - b["loss_mpl"]) <= 1e-5
    assert any(ln["h"] != 0.0 for ln in lines["one"])
    dp, one = _final(tmp_path / "dp"), _final(tmp_path / "one")
    assert dp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(dp[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # T_R moved away from the identity (its output layer started at zero), the same on both
    assert one["teacher.out.weight"].abs().max() > 0
