"""Reduced MPL through the trainer: the MPL step with T_R in the teacher's place (a hand-written
reference and h's sign), the unlabeled stream's image indices, T_R at init reproducing the
stored labels of the large teacher, and one-sentence refusals of labels that belong elsewhere."""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpl_testing import reference_student_step_and_h
from reduced_testing import assert_resumed_run_matches, make_run
from torch import nn

from mpl_fast.algo import MPL, MPLConfig, Schedules
from mpl_fast.data import build_streams as data_streams
from mpl_fast.data.config import DataConfig
from mpl_fast.data.embedded import load_training_images
from mpl_fast.reduced.images import images_to_label
from mpl_fast.reduced.label import label
from mpl_fast.reduced.store import TeacherLabelStore
from mpl_fast.reduced.teacher import ReducedTeacher
from mpl_fast.train import build
from mpl_fast.train.config import preset, validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _student(seed: int, num_classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, num_classes))


def _batches(seed: int, num_classes: int = 4, b: int = 8, u: int = 24):
    g = torch.Generator().manual_seed(seed)
    x_l, y_l = torch.randn(b, 5, generator=g), torch.randint(0, num_classes, (b,), generator=g)
    p_us = torch.softmax(2.0 * torch.randn(u, num_classes, generator=g), 1)
    x_us = torch.randn(u, 5, generator=g)
    return (x_l, y_l), (p_us, x_us)


def _reduced_mpl(t_r, student, *, lr_t, lr_s, feedback="grad-dot", wait=0):
    sched = Schedules(total_steps=100, teacher_lr=lr_t, student_lr=lr_s, teacher_schedule="constant",
                      student_schedule="constant", student_wait=wait, uda_weight=0.0, uda_ramp=0)
    return MPL(t_r, student, torch.optim.SGD(t_r.parameters(), lr=lr_t), torch.optim.SGD(student.parameters(), lr=lr_s),
               sched, MPLConfig(feedback=feedback, baseline="off", uda_weight=0.0), method="reduced-mpl")


def _moved_t_r(seed: int, num_classes: int = 4) -> ReducedTeacher:
    """A T_R away from the identity (a zero output layer would give its hidden layer no gradient)."""
    torch.manual_seed(seed)
    t_r = ReducedTeacher(num_classes, hidden=8)
    with torch.no_grad():
        t_r.out.weight.normal_(0, 0.3)
    return t_r


# ----------------------------------------------------------------------------- the step

def test_reduced_step_matches_hand_written_reference():
    """Plain SGD: T_R(p) gives y_hat, the student steps on it, h = lr_s <g_l', g_u>, and T_R
    steps on h * CE(y_hat, T_R(p)) alone (no supervised or UDA term, no forward over images)."""
    t_r, student = _moved_t_r(0), _student(1)
    ref_t, ref_s = copy.deepcopy(t_r), copy.deepcopy(student)
    lr_t, lr_s = 0.5, 0.3
    (x_l, y_l), (p_us, x_us) = _batches(3)
    out = _reduced_mpl(t_r, student, lr_t=lr_t, lr_s=lr_s).step((x_l, y_l), (p_us, x_us), clock=0)

    tp = list(ref_t.parameters())
    t_us = ref_t(p_us)
    y_hat = t_us.detach().argmax(1)
    h = reference_student_step_and_h(ref_s, x_us, y_hat, x_l, y_l, lr_s)
    g_t = torch.autograd.grad(h * F.cross_entropy(t_us, y_hat), tp)
    with torch.no_grad():
        for p, g in zip(tp, g_t):
            p -= lr_t * g

    assert out["h"].item() != 0.0
    torch.testing.assert_close(out["h"], h, rtol=1e-5, atol=1e-8)
    assert out["loss_sup"].item() == 0.0 and out["loss_uda"].item() == 0.0
    for a, b in zip(student.parameters(), ref_s.parameters()):
        torch.testing.assert_close(a, b)
    for a, b in zip(t_r.parameters(), ref_t.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_h_sign_in_the_reduced_setting(seed):
    """At a small student rate the feedback modes agree in sign (h > 0: the student's labeled
    loss fell), and T_R's step makes its own pseudo labels more likely iff h > 0."""
    hs = {}
    for mode in ("grad-dot", "update-dot", "finite-diff"):
        t_r, student = _moved_t_r(seed), _student(seed + 10)
        (x_l, y_l), (p_us, x_us) = _batches(seed)
        with torch.no_grad():
            y_hat = t_r(p_us).argmax(1)
            before = F.cross_entropy(t_r(p_us), y_hat)
            loss_l_before = F.cross_entropy(student(x_l), y_l)
        out = _reduced_mpl(t_r, student, lr_t=0.05, lr_s=1e-3, feedback=mode).step((x_l, y_l), (p_us, x_us), 0)
        with torch.no_grad():
            after = F.cross_entropy(t_r(p_us), y_hat)
            loss_l_after = F.cross_entropy(student(x_l), y_l)
        h = out["h"].item()
        hs[mode] = h
        assert h != 0.0
        assert np.sign(h) == np.sign((loss_l_before - loss_l_after).item())
        assert np.sign((before - after).item()) == np.sign(h), (mode, h, before, after)
    assert np.sign(hs["grad-dot"]) == np.sign(hs["update-dot"]) == np.sign(hs["finite-diff"])


def test_reduced_step_while_the_student_waits_leaves_t_r_at_rest():
    t_r, student = _moved_t_r(0), _student(1)
    t_before = copy.deepcopy(t_r.state_dict())
    s_before = copy.deepcopy(student.state_dict())
    out = _reduced_mpl(t_r, student, lr_t=0.5, lr_s=0.3, wait=5).step(*_batches(0), clock=0)
    assert out["h"].item() == 0.0 and out["skipped"].item() == 0.0
    for k, v in t_r.state_dict().items():
        assert torch.equal(v, t_before[k])
    for k, v in student.state_dict().items():
        assert torch.equal(v, s_before[k])


# ----------------------------------------------------------------------------- streams with indices

def test_embedded_unlabeled_stream_yields_training_indices_and_resumes():
    cfg = DataConfig(dataset="digits", labels_per_class=3, val_per_class=5, batch_size=8, mu=3)
    plain = data_streams(cfg, seed=4)
    indexed = data_streams(cfg, seed=4, with_indices=True)
    xtr, _ = load_training_images("digits")
    val = set(indexed.split["val"])
    for _ in range(3):
        weak, strong = next(plain.unlabeled)
        weak_i, strong_i, index = next(indexed.unlabeled)
        assert torch.equal(weak, weak_i) and torch.equal(strong, strong_i)  # nothing else changes
        assert index.dtype == torch.int64 and index.shape == (24,)
        assert not val & set(index.tolist())
    # the index is the image's training-set row: the unaugmented image sits there
    stream = indexed.unlabeled
    stream.views = (lambda x, g: x.clone(), lambda x, g: x.clone())
    weak, _, index = next(stream)
    assert torch.equal(weak, torch.from_numpy(xtr)[index])
    state = copy.deepcopy(stream.state_dict())
    ahead = [next(stream)[2] for _ in range(60)]  # past an epoch
    stream.load_state_dict(state)
    assert all(torch.equal(a, next(stream)[2]) for a in ahead)


def test_embedded_indices_are_sliced_per_rank_like_the_images():
    cfg = DataConfig(dataset="digits", labels_per_class=3, val_per_class=5, batch_size=6, mu=2)
    whole = next(data_streams(cfg, seed=1, with_indices=True).unlabeled)
    cfg.batch_size = 3
    parts = [next(data_streams(cfg, seed=1, rank=r, world_size=2, with_indices=True).unlabeled) for r in range(2)]
    assert torch.equal(torch.cat([p[2] for p in parts]), whole[2])
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])


def test_torch_pipeline_yields_training_indices_and_resumes(tmp_path):
    """CIFAR arrays through the torch DataLoader: the index is each image's training-set row,
    drawn from the split's unlabeled images; the views are those of the stream without indices;
    a resumed stream continues with the same indices."""
    from mpl_fast.data.files import load_source, resolve_split
    from mpl_fast.data.tiny import write_tiny_cifar

    write_tiny_cifar(str(tmp_path), train_per_class=6, test_per_class=2)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), labels_per_class=2, val_per_class=1, batch_size=2,
                     mu=3, loader="torch", num_workers=0)
    split, _ = resolve_split(cfg, load_source(cfg), seed=0)
    plain = data_streams(cfg, seed=0).unlabeled
    indexed = data_streams(cfg, seed=0, with_indices=True).unlabeled
    seen = []
    for _ in range(4):
        weak, strong = next(plain)
        weak_i, strong_i, index = next(indexed)
        assert torch.equal(weak, weak_i) and torch.equal(strong, strong_i)
        assert index.dtype == torch.int64 and index.shape == (6,)
        seen += index.tolist()
    assert set(seen) <= set(np.asarray(split["unlabeled"]).tolist())
    state = indexed.state_dict()
    ahead = [next(indexed)[2] for _ in range(3)]
    resumed = data_streams(cfg, seed=0, with_indices=True).unlabeled
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)[2]) for a in ahead)


# ----------------------------------------------------------------------------- through the trainer

@pytest.fixture(scope="module")
def digits_labels(tmp_path_factory):
    """A digits teacher run folder and its full (k = 10) label store."""
    tmp = tmp_path_factory.mktemp("reduced")
    make_run(str(tmp / "teacher"))
    label(str(tmp / "teacher"), str(tmp / "labels"), top_k=10, batch_size=200, progress=False, workers=0)
    return tmp


def _reduced_cfg(labels: str, out_dir: str | None = None):
    cfg = preset("digits-reduced")
    cfg.reduced.labels = labels
    cfg.output_dir = out_dir
    return cfg


def test_t_r_at_init_reproduces_the_large_teacher_through_the_trainer_path(digits_labels):
    """build_streams/build_mpl as a run builds them: the unlabeled batch carries T's stored
    distribution of each image (= T's softmax on it to fp16 round-off), and softmax(T_R(p)) = p."""
    from mpl_fast.models import create_model

    cfg = _reduced_cfg(str(digits_labels / "labels"))
    streams = build.build_streams(cfg)
    mpl = build.build_mpl(cfg, streams)
    assert isinstance(mpl.teacher, ReducedTeacher)
    assert "teacher" not in mpl.models()  # T_R reads distributions: never evaluated on images

    raw = data_streams(cfg.data, seed=cfg.seed, with_indices=True).unlabeled  # the same draws, with indices
    p, strong = next(streams.unlabeled)
    _, strong_raw, index = next(raw)
    assert torch.equal(strong, strong_raw)

    teacher = create_model("digits-cnn", 10, dropout=0.2, in_channels=1)
    teacher.load_state_dict(torch.load(digits_labels / "teacher" / "checkpoint.pt", weights_only=False)["mpl"]["teacher"])
    teacher.eval()
    xtr, _ = load_training_images("digits")
    with torch.no_grad():
        t_probs = torch.softmax(teacher(torch.from_numpy(xtr)[index]), 1)
        t_r_probs = torch.softmax(mpl.teacher(p), 1)
    torch.testing.assert_close(p, t_probs, atol=1e-3, rtol=1e-3)   # fp16 storage
    torch.testing.assert_close(t_r_probs, p.clamp(min=1e-8) / p.clamp(min=1e-8).sum(1, keepdim=True),
                               atol=1e-6, rtol=1e-5)


def test_reduced_run_trains_and_resumes_exactly(digits_labels, tmp_path):
    from mpl_fast.train import run

    def cfg(out, **kw):
        c = _reduced_cfg(str(digits_labels / "labels"), str(out))
        c.steps, c.log_every, c.eval_every, c.checkpoint_every, c.finetune.steps = 12, 4, 12, 6, 0
        for k, v in kw.items():
            setattr(c, k, v)
        return c

    run(cfg(tmp_path / "full"), progress=False, quiet=True)
    run(cfg(tmp_path / "part"), progress=False, quiet=True, stop_after=6)
    run(None, resume=str(tmp_path / "part"), progress=False, quiet=True)
    assert_resumed_run_matches(tmp_path / "full", tmp_path / "part")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mpl_fast.train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _assert_one_sentence(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert "error:" in last, err
    for needle in needles:
        assert needle in last, last


def _store_like(src: str, dst: str, **manifest_changes) -> str:
    """A copy of the store ``src`` with manifest fields replaced (labels made for something else)."""
    import shutil

    shutil.copytree(src, dst)
    path = os.path.join(dst, "manifest.json")
    manifest = json.load(open(path))
    manifest.update(manifest_changes)
    json.dump(manifest, open(path, "w"))
    return dst


def test_bad_labels_are_refused_in_one_sentence_through_the_cli(digits_labels, tmp_path):
    labels = str(digits_labels / "labels")
    # labels made for another data set (same size and classes, other images)
    other = _store_like(labels, str(tmp_path / "other"),
                        dataset={**json.load(open(os.path.join(labels, "manifest.json")))["dataset"], "sha256": "0" * 64})
    _assert_one_sentence(_cli("--preset", "digits-reduced", "--reduced.labels", other, "--steps", "2",
                              "--output-dir", str(tmp_path / "r1")), "--reduced.labels", "another data set")
    # a teacher with another class count: a store over 2 classes (e.g. a two-moons teacher)
    moons = images_to_label(DataConfig(dataset="two-moons"))
    store = TeacherLabelStore.create(str(tmp_path / "moons"), num_images=moons.num_images, num_classes=2, k=2,
                                     teacher={"sha256": "1" * 64}, preprocessing={}, dataset=moons.identity)
    store.write(0, np.full((moons.num_images, 2), 0.5), np.tile([0, 1], (moons.num_images, 1)))
    store.commit([[0, moons.num_images]])
    _assert_one_sentence(_cli("--preset", "digits-reduced", "--reduced.labels", str(tmp_path / "moons"), "--steps",
                              "2", "--output-dir", str(tmp_path / "r2")), "2 classes", "10")
    # no labels at all, and a folder that is not a store
    _assert_one_sentence(_cli("--preset", "digits-reduced", "--steps", "2"), "--reduced.labels")
    _assert_one_sentence(_cli("--preset", "digits-reduced", "--reduced.labels", str(tmp_path), "--steps", "2",
                              "--output-dir", str(tmp_path / "r3")), "not a teacher-label store")


def test_reduced_mpl_refuses_layouts_without_a_large_teacher():
    cfg = _reduced_cfg("x")
    cfg.model_parallel = True
    with pytest.raises(ValueError, match="--model-parallel"):
        validate(cfg)


def test_dry_run_plans_the_student_and_t_r_without_labels(capsys):
    """--dry-run needs no labels: it prints the student's and T_R's sizes and a per-device memory
    below full MPL's with a teacher of the student's architecture."""
    import re

    from mpl_fast.train.__main__ import main

    assert main(["--preset", "imagenet-reduced-b7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_b7" in out and "reduced teacher T_R" in out and "32 bytes an image" in out
    for line in (ln for ln in out.splitlines() if "activations, one device" in ln):
        reduced, full = (float(x) for x in re.findall(r"([\d.]+) GiB", line))
        assert 0 < reduced < full


def test_reduced_run_on_cifar_through_the_torch_pipeline(tmp_path):
    """The workflow on a data set read from disk: a (tiny) CIFAR teacher run, labelled, then a
    reduced run through the torch DataLoader pipeline; T_R gets feedback at every step."""
    from mpl_testing import set_fields

    from mpl_fast.data.tiny import write_tiny_cifar
    from mpl_fast.train import run

    write_tiny_cifar(str(tmp_path / "data"), train_per_class=6, test_per_class=2)
    make_run(str(tmp_path / "teacher"), data=DataConfig(dataset="cifar10", data_dir=str(tmp_path / "data")),
             in_channels=3)
    label(str(tmp_path / "teacher"), str(tmp_path / "labels"), top_k=3, batch_size=16, progress=False, workers=0)
    cfg = set_fields(preset("cifar10-4k"), method="reduced-mpl", steps=3, log_every=1, eval_every=3,
                     checkpoint_every=0, threads=1, output_dir=str(tmp_path / "run"), model__name="digits-cnn",
                     finetune__steps=0, mpl__student_wait_steps=0, data__data_dir=str(tmp_path / "data"),
                     data__labels_per_class=2, data__val_per_class=1, data__batch_size=2, data__mu=2,
                     data__loader="torch", data__num_workers=0, reduced__labels=str(tmp_path / "labels"))
    run(cfg, progress=False, quiet=True)
    lines = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl") if '"h"' in ln]
    assert len(lines) == 3 and all(ln["h"] != 0.0 and ln["loss_mpl"] > 0 for ln in lines)
