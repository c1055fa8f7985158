"""--data.in-memory: an ImageFolder of small images decoded once into arrays, then trained like
CIFAR's arrays (small-image views, test images as they are); what it refuses, in one sentence."""

import os
import zipfile

import numpy as np
import pytest
import torch

from mpl_fast.data import DataConfig, build_streams
from mpl_fast.data.imagefolder import load_imagefolder
from mpl_fast.data.in_memory import decode_into_memory
from mpl_fast.data.tiny import write_tiny_imagefolder
from mpl_fast.data.torch_pipeline import decode_file

CIFAR_ZIP = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "cifar10-jpg.zip")


def _folder(tmp_path, size=12, **kw):
    return write_tiny_imagefolder(str(tmp_path / "f"), num_classes=3, train_per_class=8, val_per_class=3,
                                  size=size, bad_files=False, **kw)


def test_decoded_arrays_equal_each_file_decoded(tmp_path):
    root = _folder(tmp_path)
    files = load_imagefolder(root)
    decoded = decode_into_memory(files)
    assert decoded.image_size == 12 and not decoded.train.is_files
    assert decoded.train.images.shape == (24, 12, 12, 3) and decoded.test.images.shape == (9, 12, 12, 3)
    for split in ("train", "test"):
        a, b = getattr(files, split), getattr(decoded, split)
        assert list(a.labels) == list(b.labels) and a.keys == b.keys  # a saved split names the same files
        for path, array in zip(a.images, b.images):
            assert np.array_equal(decode_file(path).permute(1, 2, 0).numpy(), array)


def test_streams_use_the_small_image_views(tmp_path):
    root = _folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", data_dir=root, in_memory=True, labels_per_class=2, val_per_class=1,
                     batch_size=4, mu=2, eval_batch_size=5, num_workers=0)
    s = build_streams(cfg, seed=0)
    assert s.input_shape == (3, 12, 12)
    x, _ = next(s.labeled)
    weak, strong = next(s.unlabeled)
    assert x.shape == (4, 3, 12, 12) and weak.shape == strong.shape == (8, 3, 12, 12)
    # The test images as they are: no resize and centre crop (the file pipeline's photo view).
    arrays = decode_into_memory(load_imagefolder(root))
    first = torch.from_numpy(arrays.test.images[:5]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(arrays.mean).view(3, 1, 1), torch.tensor(arrays.std).view(3, 1, 1)
    assert torch.allclose(next(iter(s.test))[0], (first - mean) / std, atol=1e-6)


def test_images_of_another_size_are_refused_by_name(tmp_path):
    root = _folder(tmp_path)
    from PIL import Image

    odd = os.path.join(root, "train", "class_01", "odd.jpg")
    Image.new("RGB", (13, 12)).save(odd)
    with pytest.raises(ValueError, match=r"every image to be 12x12.*odd\.jpg is 13x12"):
        decode_into_memory(load_imagefolder(root))


def test_a_corrupt_file_is_refused_by_name(tmp_path):
    root = _folder(tmp_path)
    bad = os.path.join(root, "val", "class_02", "broken.jpg")
    with open(bad, "wb") as f:
        f.write(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(ValueError, match=r"cannot decode .*broken\.jpg.*without --data.in-memory"):
        decode_into_memory(load_imagefolder(root))


def test_a_different_image_size_flag_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"own size \(12x12.*drop --data.image-size 32"):
        decode_into_memory(load_imagefolder(_folder(tmp_path)), image_size=32)


@pytest.mark.parametrize("flags, message", [
    (["--data.dataset", "cifar10", "--data-dir", "x"], "--data.dataset cifar10 is not one"),
    (["--data.dataset", "imagefolder", "--data-dir", "x", "--data.unlabeled-dir", "y"], "drop one of them"),
])
def test_the_trainer_refuses_in_memory_where_it_cannot_apply(flags, message, capsys):
    from mpl_fast.train.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["--data.in-memory", *flags, "--steps", "1", "--dry-run"])
    assert stop.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.skipif(not os.path.exists(CIFAR_ZIP), reason="CIFAR-10 JPEG zip not present (not part of the project)")
def test_cifar10_jpeg_files_train_on_the_cpu_preset(tmp_path):
    """A slice of the real CIFAR-10 JPEG copy (20 train and 5 test images per class) through the
    cifar10-4k-cpu preset: decoded at 32x32, ten classes, a few MPL steps."""
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        taken: dict[str, int] = {}
        for name in z.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[2].endswith(".jpg"):
                key = f"{parts[0]}/{parts[1]}"
                if taken.get(key, 0) < (20 if parts[0] == "train" else 5):
                    taken[key] = taken.get(key, 0) + 1
                    z.extract(name, tmp_path / "cifar")
    source = decode_into_memory(load_imagefolder(str(tmp_path / "cifar")))
    assert source.num_classes == 10 and source.train.images.shape == (200, 32, 32, 3)
    assert source.classes[:3] == ["airplane", "automobile", "bird"] and len(source.test) == 50

    from mpl_fast.train import run
    from mpl_fast.train.config import preset

    cfg = preset("cifar10-4k-cpu")
    cfg.data.data_dir, cfg.data.labels_per_class, cfg.data.val_per_class = str(tmp_path / "cifar"), 4, 2
    cfg.data.batch_size, cfg.data.mu, cfg.steps, cfg.eval_every, cfg.log_every = 8, 2, 4, 4, 2
    cfg.mpl.student_wait_steps, cfg.output_dir, cfg.plot = 1, str(tmp_path / "run"), False
    summary = run(cfg, progress=False, quiet=True)
    assert set(summary["test_top1"]) >= {"student", "teacher"} and summary["steps"] == 4
