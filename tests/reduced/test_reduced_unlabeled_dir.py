"""Reduced MPL with a separate unlabeled folder (--data.unlabeled-dir, the paper's ImageNet +
YFCC100M setting): the folder is labelled by python -m mpl_fast.label --unlabeled-dir, and the
trainer's unlabeled stream draws that folder alone, each image with its index in the folder's
order, the row the labeller wrote for it.

The images are solid colours, one colour per file: every crop, resize and flip of a file is
that colour, so an augmented batch still tells which file each image came from, and the large
teacher's output for the file can be recomputed from the colour alone."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from mpl_testing import set_fields, tiny_dali_config
from reduced_testing import assert_resumed_run_matches, make_run

from mpl_fast.data import build_streams as data_streams
from mpl_fast.data.config import DataConfig
from mpl_fast.data.dali_pipeline import dali_unavailable_reason
from mpl_fast.data.files import load_source, resolve_split
from mpl_fast.data.unlabeled import unlabeled_files
from mpl_fast.reduced.label import label
from mpl_fast.train import build
from mpl_fast.train.config import preset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS = (20, 90, 160, 230)
SIZE = 32
NO_DALI = dali_unavailable_reason()
LOADERS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(NO_DALI is not None, reason=f"{NO_DALI}"))]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # the folder's broken file


def colour(i: int) -> tuple[int, int, int]:
    """Colour of image i: 64 colours at least 70 apart in some channel (JPEG moves them by a few)."""
    return LEVELS[i % 4], LEVELS[(i // 4) % 4], LEVELS[(i // 16) % 4]


def write_solid(path, i: int) -> None:
    from PIL import Image

    h, w = 20 + i % 7, 24 + i % 5  # sizes vary: the crops and resizes do real work
    Image.fromarray(np.full((h, w, 3), colour(i), dtype=np.uint8)).save(path, quality=95)


def write_labeled(root) -> str:
    """An ImageFolder of 3 classes (train/ 4 per class, val/ 1 per class), solid colours."""
    i = 0
    for split, per_class in (("train", 4), ("val", 1)):
        for c in range(3):
            os.makedirs(os.path.join(root, split, f"c{c}"))
            for j in range(per_class):
                write_solid(os.path.join(root, split, f"c{c}", f"{j}.png"), 40 + i)
                i += 1
    return str(root)


def write_unlabeled(root, n: int = 30, broken: bool = True) -> str:
    """``n`` solid-colour images, PNG and JPEG, in nested folders (file i has colour i), and a
    file that does not decode."""
    for i in range(n):
        sub = os.path.join(root, f"part{i % 3}", "deep" if i % 2 else "")
        os.makedirs(sub, exist_ok=True)
        write_solid(os.path.join(sub, f"img{i:03d}.{'jpg' if i % 2 else 'png'}"), i)
    if broken:
        with open(os.path.join(root, "part0", "zz_broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not an image")
    return str(root)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The labeled folder, the unlabeled folder, a 3-class teacher run and the folder's labels
    (k = all 3 classes: the stored distribution is T's softmax to fp16 round-off)."""
    tmp = tmp_path_factory.mktemp("unlabeled_dir")
    labeled = write_labeled(tmp / "labeled")
    unlabeled = write_unlabeled(tmp / "unlabeled")
    data = DataConfig(dataset="imagefolder", data_dir=labeled, image_size=SIZE)
    run, teacher = make_run(str(tmp / "teacher"), num_classes=3, data=data, in_channels=3)
    label(run, str(tmp / "labels"), unlabeled_dir=unlabeled, top_k=0, batch_size=8, workers=0, progress=False)
    label(run, str(tmp / "train_labels"), top_k=0, batch_size=8, workers=0, progress=False)
    # a file list naming the folder's readable images in reverse order, relative to the list
    paths, _ = unlabeled_files(unlabeled)
    listing = tmp / "list.txt"
    listing.write_text("# reversed\n" + "\n".join(os.path.relpath(p, tmp) for p in reversed(paths)
                                                 if not p.endswith("zz_broken.png")) + "\n")
    label(run, str(tmp / "list_labels"), unlabeled_dir=str(listing), top_k=0, batch_size=8, workers=0, progress=False)
    return {"tmp": tmp, "labeled": labeled, "unlabeled": unlabeled, "run": run, "teacher": teacher,
            "labels": str(tmp / "labels"), "train_labels": str(tmp / "train_labels"), "list": str(listing),
            "list_labels": str(tmp / "list_labels")}


def reduced_cfg(world, out_dir=None, loader="torch", **overrides):
    cfg = tiny_dali_config(out_dir or world["tmp"] / "unused", world["labeled"], mu=3, method="reduced-mpl")
    cfg.data.image_size, cfg.data.loader, cfg.data.num_workers = SIZE, loader, 0 if loader == "torch" else 1
    cfg.data.unlabeled_dir, cfg.reduced.labels = world["unlabeled"], world["labels"]
    cfg.output_dir = None if out_dir is None else str(out_dir)
    return set_fields(cfg, **overrides)


def file_colours(paths) -> np.ndarray:
    """The colour of each file, decoded (its top-left pixel: the file is one colour)."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(np.asarray(im.convert("RGB"))[0, 0].astype(np.float64))
        except Exception:  # the broken file: a colour no image has
            out.append(np.full(3, -1000.0))
    return np.stack(out)


def batch_colours(x: torch.Tensor, mean, std) -> np.ndarray:
    """Each normalised image's colour in 0..255 (its mean per channel)."""
    m, s = torch.tensor(mean).view(1, 3), torch.tensor(std).view(1, 3)
    return ((x.float().mean((2, 3)).cpu() * s + m) * 255).double().numpy()


def teacher_on_colours(teacher, colours: np.ndarray, mean, std) -> torch.Tensor:
    """softmax(T(x)) with x a constant image of each colour, normalised as the data set is: what
    any resize-and-crop preprocessing of a solid-colour file gives."""
    c = torch.from_numpy(colours).float() / 255
    x = ((c - torch.tensor(mean)) / torch.tensor(std)).view(-1, 3, 1, 1).expand(-1, 3, SIZE, SIZE).contiguous()
    with torch.no_grad():
        return torch.softmax(teacher(x), 1)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("pool", ["folder", "file list", "training set"])
def test_the_stream_draws_the_folder_and_fetches_each_files_row(world, loader, pool):
    """Through the trainer's builder: every unlabeled image comes from the separate folder (none
    from the training set), the index next to it is that file's position in the folder's order
    (the colour of the augmented image is the file's), and the distribution fetched for it equals
    the large teacher's output on that file (recomputed from the colour) to fp16 round-off.
    The same for a file list (labelled and read in the list's order), and without
    --data.unlabeled-dir for the training set and its training-set indices."""
    if pool == "folder":
        cfg = reduced_cfg(world, loader=loader)
        paths, _ = unlabeled_files(world["unlabeled"])
        allowed = set(range(len(paths)))
    elif pool == "file list":
        cfg = reduced_cfg(world, loader=loader, data__unlabeled_dir=world["list"], reduced__labels=world["list_labels"])
        paths, _ = unlabeled_files(world["list"])
        folder_paths = [p for p in unlabeled_files(world["unlabeled"])[0] if not p.endswith("zz_broken.png")]
        assert paths == folder_paths[::-1]
        allowed = set(range(len(paths)))
    else:
        cfg = reduced_cfg(world, loader=loader, data__unlabeled_dir=None, reduced__labels=world["train_labels"])
        source = load_source(cfg.data)
        paths = source.train.images
        allowed = set(np.asarray(resolve_split(cfg.data, source, cfg.seed)[0]["unlabeled"]).tolist())  # not val
    source = load_source(cfg.data)
    colours = file_colours(paths)
    broken = [i for i, p in enumerate(paths) if p.endswith("zz_broken.png")]
    streams = build.build_streams(cfg)
    raw = data_streams(cfg.data, seed=cfg.seed, with_indices=True).unlabeled  # the same draws, with indices
    if pool != "training set":
        assert streams.split["unlabeled_extra"] == {"source": cfg.data.unlabeled_dir, "count": len(paths), "only": True}
    else:
        assert len(allowed) == 9 and "unlabeled_extra" not in streams.split
    seen, fetched = [], []
    for _ in range(5):
        p, strong = next(streams.unlabeled)
        weak_r, strong_r, index = next(raw)
        assert torch.equal(strong, strong_r)
        assert index.dtype == torch.int64 and index.shape == (6,)
        assert set(index.tolist()) <= allowed and not set(broken) & set(index.tolist())
        got = batch_colours(weak_r, source.mean, source.std)
        nearest = np.abs(got[:, None, :] - colours[None, :, :]).max(2).argmin(1)
        assert nearest.tolist() == index.tolist()  # the image came from file `index`
        want = teacher_on_colours(world["teacher"], colours[index.numpy()], source.mean, source.std)
        torch.testing.assert_close(p, want, atol=2e-3, rtol=2e-3)
        seen += index.tolist()
        fetched.append(p)
    fetched = torch.cat(fetched)
    assert len(set(seen)) >= min(20, len(allowed))  # the draws cover the pool, not a few files
    assert (fetched.max(0).values - fetched.min(0).values).max() > 0.05  # the rows differ between files


@pytest.mark.parametrize("loader", LOADERS)
def test_the_indices_resume_exactly(world, loader):
    cfg = reduced_cfg(world, loader=loader)
    stream = data_streams(cfg.data, seed=cfg.seed, with_indices=True).unlabeled
    for _ in range(3):
        next(stream)
    state = stream.state_dict()
    ahead = [next(stream)[2] for _ in range(8)]  # past an epoch of the folder (31 files, 6 a batch)
    resumed = data_streams(cfg.data, seed=cfg.seed, with_indices=True).unlabeled
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)[2]) for a in ahead)


@pytest.mark.parametrize("loader", LOADERS)
def test_each_rank_draws_its_own_shard_with_its_indices(world, loader):
    """Data parallel: the index still names the image next to it on every rank, and the ranks'
    first batches (within one pass over the folder) hold different images."""
    cfg = reduced_cfg(world, loader=loader)
    source = load_source(cfg.data)
    colours = file_colours(unlabeled_files(world["unlabeled"])[0])
    per_rank = []
    for rank in range(2):
        stream = data_streams(cfg.data, seed=cfg.seed, rank=rank, world_size=2, with_indices=True).unlabeled
        drawn = []
        for _ in range(2):
            weak, _, index = next(stream)
            got = batch_colours(weak, source.mean, source.std)
            assert np.abs(got[:, None, :] - colours[None, :, :]).max(2).argmin(1).tolist() == index.tolist()
            drawn += index.tolist()
        per_rank.append(set(drawn))
    # different shards (the broken file's stand-in may come from the other rank's shard)
    assert len(per_rank[0] & per_rank[1]) <= 1 and len(per_rank[0] | per_rank[1]) >= 20


@pytest.mark.parametrize("loader", LOADERS)
def test_a_reduced_run_on_the_folder_trains_and_resumes_exactly(world, tmp_path, loader):
    from mpl_fast.train import run

    def cfg(name):
        return reduced_cfg(world, tmp_path / name, loader=loader, checkpoint_every=3, log_every=1)

    run(cfg("full"), progress=False, quiet=True)
    run(cfg("part"), progress=False, quiet=True, stop_after=3)
    run(None, resume=str(tmp_path / "part"), progress=False, quiet=True)
    assert_resumed_run_matches(tmp_path / "full", tmp_path / "part")


def _refusal(cfg) -> str:
    with pytest.raises(SystemExit) as info:
        build.build_streams(cfg)
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message and "--reduced.labels" in message
    return message


def test_labels_of_other_images_are_refused_in_one_sentence(world, tmp_path):
    # the training set's labels, while the run draws the folder
    label(world["run"], str(tmp_path / "train_labels"), top_k=0, batch_size=8, workers=0, progress=False)
    msg = _refusal(reduced_cfg(world, reduced__labels=str(tmp_path / "train_labels")))
    assert "holds labels of the training set" in msg and "--data.unlabeled-dir" in msg
    # the folder's labels, while the run draws the training set
    msg = _refusal(reduced_cfg(world, data__unlabeled_dir=None))
    assert "separate unlabeled folder (31 images)" in msg and "--data.unlabeled-dir" in msg
    # labels of another folder: other files, then the same files in another order
    other = write_unlabeled(tmp_path / "other", n=12, broken=False)
    label(world["run"], str(tmp_path / "other_labels"), unlabeled_dir=other, top_k=0, batch_size=8, workers=0,
          progress=False)
    msg = _refusal(reduced_cfg(world, reduced__labels=str(tmp_path / "other_labels")))
    assert "another folder than --data.unlabeled-dir" in msg and "num_images 12 there, 31 here" in msg
    renamed = tmp_path / "renamed"
    shutil.copytree(world["unlabeled"], renamed)
    os.rename(renamed / "part1", renamed / "part9")
    msg = _refusal(reduced_cfg(world, data__unlabeled_dir=str(renamed)))
    assert "another folder than --data.unlabeled-dir" in msg and "order differ" in msg
    # the folder moved: same files, same order, the labels still fit
    moved = tmp_path / "moved"
    shutil.copytree(world["unlabeled"], moved)
    assert build.build_streams(reduced_cfg(world, data__unlabeled_dir=str(moved))).num_classes == 3
    # a folder next to an embedded data set
    digits = set_fields(preset("digits-reduced"), reduced__labels=world["labels"], data__unlabeled_dir=world["unlabeled"])
    with pytest.raises(SystemExit, match="^error: --data.unlabeled-dir holds image files, and the run's data set "
                                         "'digits' is not an image folder"):
        build.build_streams(digits)
    # through the command line: one line, no traceback
    proc = subprocess.run([sys.executable, "-m", "mpl_fast.train", "--preset", "imagenet-10pct", "--method",
                           "reduced-mpl", "--data.data-dir", world["labeled"], "--data.image-size", str(SIZE),
                           "--data.loader", "torch", "--model.name", "digits-cnn",
                           "--data.unlabeled-dir", world["unlabeled"], "--reduced.labels",
                           str(tmp_path / "train_labels"), "--steps", "1", "--output-dir", str(tmp_path / "cli")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "holds labels of the training set" in err.splitlines()[-1], err


def test_svhn_extra_is_left_out_of_an_indexed_pool(tmp_path):
    """A store of SVHN's training set does not cover extra_32x32.mat: the indexed stream (reduced
    MPL) draws the training set only, where the plain one also draws the extra images."""
    from scipy.io import savemat

    from mpl_fast.data.tiny import write_tiny_svhn

    root = write_tiny_svhn(str(tmp_path / "svhn"), train_per_class=2, test_per_class=1)
    savemat(os.path.join(root, "extra_32x32.mat"), {"X": np.zeros((32, 32, 3, 50), np.uint8),
                                                     "y": np.ones((50, 1), np.uint8)})
    cfg = DataConfig(dataset="svhn", data_dir=root, labels_per_class=1, val_per_class=0, batch_size=4, mu=5,
                     loader="torch", num_workers=0)
    assert data_streams(cfg, seed=0).split["unlabeled_extra"]["count"] == 50
    indexed = data_streams(cfg, seed=0, with_indices=True)
    assert "unlabeled_extra" not in indexed.split
    seen = torch.cat([next(indexed.unlabeled)[2] for _ in range(3)])
    assert seen.max() < 20 and len(set(seen.tolist())) == 20  # the 20 training images, each drawn
