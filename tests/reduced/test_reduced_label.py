"""The offline labeller: exact after an interrupted + resumed run, equal to T's outputs, the
same under 2 torchrun ranks as in one process, one-sentence refusals, and the trainer's run
folders read as they are written."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from reduced_testing import make_run

from mpl_fast.data.config import DataConfig
from mpl_fast.reduced.images import batch_grid, images_to_label
from mpl_fast.reduced.label import LabelError, label, main, shard_batches
from mpl_fast.reduced.store import TeacherLabelStore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _arrays(out):
    s = TeacherLabelStore.open(str(out))
    return np.array(s.probs), np.array(s.classes), s


def test_batch_grid_and_shards():
    assert list(batch_grid(0, 10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(batch_grid(5, 10, 4)) == [(5, 8), (8, 10)]   # a resume point off the grid rejoins it
    ranges = [shard_batches(1257, 100, r, 3) for r in range(3)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 1257
    assert all(a[1] == b[0] and a[1] % 100 == 0 for a, b in zip(ranges, ranges[1:]))


def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path):
    run, _ = make_run(tmp_path / "run")
    label(run, str(tmp_path / "whole"), top_k=4, batch_size=100, progress=False)

    class Kill(Exception):
        pass

    def stop_after_3(n):
        if n == 3:
            raise Kill

    out = tmp_path / "resumed"
    with pytest.raises(Kill):
        label(run, str(out), top_k=4, batch_size=100, commit_every=1, progress=False, after_commit=stop_after_3)
    s = TeacherLabelStore.open(str(out), writable=True)
    assert s.done == [[0, 300]]
    # A kill between writing rows and committing them: garbage rows nobody listed as done.
    s.write(300, torch.full((150, 4), 0.25), torch.zeros(150, 4, dtype=torch.int64))
    s.flush()
    manifest = label(run, str(out), top_k=4, batch_size=100, commit_every=1, progress=False)
    assert manifest["complete"] and manifest["done"] == [[0, 1257]]
    p_whole, c_whole, _ = _arrays(tmp_path / "whole")
    p_res, c_res, _ = _arrays(out)
    assert np.array_equal(p_whole.view(np.uint16), p_res.view(np.uint16)) and np.array_equal(c_whole, c_res)
    # a finished store: running the command again labels nothing and changes nothing
    label(run, str(out), top_k=4, batch_size=100, progress=False, after_commit=lambda n: pytest.fail("relabelled"))


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    """A real SIGKILL (no cleanup runs) right after the third commit, then the command again."""
    run, _ = make_run(tmp_path / "run", seed=4)
    label(run, str(tmp_path / "whole"), top_k=2, batch_size=128, progress=False)
    out = str(tmp_path / "killed")
    code = ("import os, signal\nfrom mpl_fast.reduced.label import label\n"
            "def kill(n):\n    if n == 3:\n        os.kill(os.getpid(), signal.SIGKILL)\n"
            f"label({run!r}, {out!r}, top_k=2, batch_size=128, commit_every=1, progress=False, after_commit=kill)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert TeacherLabelStore.open(out).done == [[0, 384]]
    assert main(["--teacher", run, "--out", out, "--top-k", "2", "--batch-size", "128", "--no-progress"]) == 0
    p_whole, c_whole, _ = _arrays(tmp_path / "whole")
    p_res, c_res, s = _arrays(out)
    assert s.complete and np.array_equal(p_whole.view(np.uint16), p_res.view(np.uint16))
    assert np.array_equal(c_whole, c_res)


def test_stored_distributions_equal_the_teachers_outputs(tmp_path):
    run, teacher = make_run(tmp_path / "run", seed=1)
    out = str(tmp_path / "labels")
    label(run, out, top_k=0, batch_size=256, progress=False)   # 0: every class
    images = images_to_label(DataConfig(dataset="digits"))
    with torch.no_grad():
        expected = torch.softmax(teacher(images.load(0, images.num_images)[0]), 1)
    store = TeacherLabelStore.open(out)
    store.check_compatible(num_classes=10, dataset=images.identity)
    got = store.distributions(torch.arange(images.num_images))
    assert expected.max() > 0.9   # peaked distributions, not a flat random net
    # fp16 round-off: half an ulp (2^-11 relative) for normal values, 2^-25 absolute for subnormals
    assert ((got - expected).abs() <= expected * 2 ** -11 + 2 ** -25).all()


def test_two_ranks_equal_one_process(tmp_path):
    run, _ = make_run(tmp_path / "run", seed=2)
    label(run, str(tmp_path / "one"), top_k=3, batch_size=64, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "mpl_fast.label", "--teacher", run, "--out", str(tmp_path / "two"), "--top-k", "3",
                           "--batch-size", "64", "--commit-every", "3", "--device", "cpu", "--no-progress"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    p1, c1, _ = _arrays(tmp_path / "one")
    p2, c2, s2 = _arrays(tmp_path / "two")
    assert s2.manifest["complete"] and s2.done == [[0, 1257]]
    assert np.array_equal(p1.view(np.uint16), p2.view(np.uint16)) and np.array_equal(c1, c2)


def test_amp_bf16_labels_agree_with_fp32(tmp_path):
    run, _ = make_run(tmp_path / "run", seed=3)
    label(run, str(tmp_path / "fp32"), top_k=1, batch_size=512, progress=False)
    manifest = label(run, str(tmp_path / "bf16"), top_k=1, batch_size=512, amp=True, progress=False)
    assert manifest["labelling"]["amp"] == "bfloat16"
    _, c32, _ = _arrays(tmp_path / "fp32")
    _, c16, _ = _arrays(tmp_path / "bf16")
    assert (c32 == c16).mean() > 0.95


def _interrupt(n):
    raise KeyboardInterrupt


def test_bad_input_one_sentence(tmp_path, capsys):
    run, _ = make_run(tmp_path / "run")
    out = str(tmp_path / "labels")
    with pytest.raises(KeyboardInterrupt):  # a partial store, to be resumed
        label(run, out, top_k=3, batch_size=100, progress=False, after_commit=_interrupt)
    with pytest.raises(LabelError, match=r"another teacher checkpoint \(sha256 .*\): choose another --out"):
        other, _ = make_run(tmp_path / "other", seed=5)
        label(other, out, top_k=3, batch_size=100, progress=False)
    with pytest.raises(LabelError, match="started with --batch-size 100, not 50: resume with the same --batch-size"):
        label(run, out, top_k=3, batch_size=50, progress=False)
    with pytest.raises(LabelError, match="stores the top 3 classes, not 4: resume with --top-k 3"):
        label(run, out, top_k=4, batch_size=100, progress=False)
    with pytest.raises(LabelError, match="--top-k 11 must be between 1 and the data set's 10 classes"):
        label(run, str(tmp_path / "k"), top_k=11, progress=False)
    seven, _ = make_run(tmp_path / "seven", num_classes=7)
    with pytest.raises(LabelError, match="do not fit a digits-cnn for this data set .*another class count"):
        label(seven, str(tmp_path / "seven_labels"), progress=False)
    with pytest.raises(LabelError, match="is embedded arrays: leave --unlabeled-dir out"):
        label(run, str(tmp_path / "u"), unlabeled_dir=str(tmp_path), progress=False)
    with pytest.raises(LabelError, match="holds no best-validation weights"):
        label(run, str(tmp_path / "b"), network="best", progress=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["--teacher", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "j"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --teacher ") and "cannot be read as a trainer checkpoint" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["--teacher", str(tmp_path / "missing"), "--out", out, "--no-progress"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_image_folder_through_dataloader_workers(tmp_path, capsys):
    """ImageFolder files: decoded by DataLoader workers in order (== no workers, bit for bit);
    a file that does not decode gets a uniform distribution and a warning."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("val", 1)):
        for c in ("cat", "dog"):
            os.makedirs(tmp_path / "data" / split / c)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / c / f"{i}.png")
    (tmp_path / "data" / "train" / "dog" / "9_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data = DataConfig(dataset="imagefolder", data_dir=str(tmp_path / "data"), image_size=16)
    run, _ = make_run(tmp_path / "run", num_classes=2, data=data, in_channels=3)
    label(run, str(tmp_path / "w0"), top_k=2, batch_size=3, workers=0, progress=False)
    manifest = label(run, str(tmp_path / "w2"), top_k=2, batch_size=3, workers=2, progress=False)
    assert "1 images did not decode" in capsys.readouterr().err
    assert manifest["num_images"] == 9 and manifest["preprocessing"]["image_size"] == 16
    p0, c0, _ = _arrays(tmp_path / "w0")
    p2, c2, s2 = _arrays(tmp_path / "w2")
    assert np.array_equal(p0.view(np.uint16), p2.view(np.uint16)) and np.array_equal(c0, c2)
    broken = 8  # sorted: dog/0..3.png, then dog/9_broken.png last
    torch.testing.assert_close(s2.distributions([broken]), torch.full((1, 2), 0.5))
    assert not torch.allclose(s2.distributions([0]), torch.full((1, 2), 0.5))
    # the data set moved: --data-dir points the run at its new place, same identity
    os.rename(tmp_path / "data", tmp_path / "moved")
    again = label(run, str(tmp_path / "w2"), top_k=2, batch_size=3, data_dir=str(tmp_path / "moved"), progress=False)
    assert again["complete"]
    # a separate unlabeled folder (no classes): every image file under it, sorted walk order
    extra = tmp_path / "extra"
    os.makedirs(extra / "b" / "c")
    for rel in ("z.png", "b/c/a.jpg", "b/x.png"):
        Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).save(extra / rel)
    (extra / "notes.txt").write_text("not an image")
    m = label(run, str(tmp_path / "extra_labels"), top_k=1, batch_size=2, data_dir=str(tmp_path / "moved"),
              unlabeled_dir=str(extra), progress=False)
    assert m["num_images"] == 3 and m["dataset"]["name"] == "unlabeled-folder" and m["complete"]
    os.makedirs(tmp_path / "empty")
    with pytest.raises(LabelError, match="holds no JPEG or PNG files"):
        label(run, str(tmp_path / "e"), data_dir=str(tmp_path / "moved"), unlabeled_dir=str(tmp_path / "empty"),
              progress=False)


def test_reads_a_run_folder_the_trainer_wrote(tmp_path):
    """Guards the one module that knows the trainer's run folder against format drift."""
    from mpl_fast.train import run as train
    from mpl_fast.train.config import preset

    cfg = preset("digits")
    cfg.method, cfg.steps, cfg.eval_every, cfg.log_every, cfg.checkpoint_every = "uda", 3, 2, 1, 0
    cfg.finetune.steps, cfg.output_dir = 0, str(tmp_path / "run")
    train(cfg, progress=False, quiet=True)
    manifest = label(cfg.output_dir, str(tmp_path / "labels"), batch_size=512, progress=False)
    assert manifest["k"] == 8 and manifest["bytes_per_image"] == 32 and manifest["complete"]
    assert manifest["teacher"]["network"] == "best-validation teacher (step 2)"
    assert manifest["dataset"]["name"] == "digits" and manifest["num_classes"] == 10


@pytest.mark.parametrize("method", ["uda", "mpl", "supervised", "reduced-mpl"])
@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_the_default_network_is_the_one_the_trainer_selects(method, ema_decay):
    """--network auto without best-validation weights: the network the trainer's selection rule
    names, read from the run's configuration, or from the checkpoint when the configuration
    has no --mpl.ema-decay."""
    import dataclasses

    from mpl_fast.reduced.run_folder import TrainedRun
    from mpl_fast.train.config import preset
    from mpl_fast.train.evaluate import selection_model

    cfg = preset("digits")
    cfg.method, cfg.mpl.ema_decay = method, ema_decay
    checkpoint = {"mpl": {"ema": {"module": {"w": 1}} if ema_decay else None}}
    assert TrainedRun("ckpt", dataclasses.asdict(cfg), checkpoint).selection_model() == selection_model(cfg)
    assert TrainedRun("ckpt", {"method": method}, checkpoint).selection_model() == selection_model(cfg)
