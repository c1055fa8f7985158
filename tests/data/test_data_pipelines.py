"""The torch DataLoader and DALI pipelines behind build_streams: shapes and dtypes of the
three streams, determinism, sharding, corrupt images, loader choice, and the two pipelines
agreeing on samples and labels."""

import warnings

import numpy as np
import pytest
import torch

from mpl_fast.data import DataConfig, build_streams
from mpl_fast.data.bad_data import CorruptImageError
from mpl_fast.data.dali_pipeline import dali_unavailable_reason
from mpl_fast.data.tiny import write_tiny_cifar, write_tiny_imagefolder, write_tiny_svhn
from mpl_fast.data.torch_pipeline import InfiniteBatches
from mpl_fast.data.views import Normalize, pad_crop_flip, strong_view

needs_dali = pytest.mark.skipif(dali_unavailable_reason() is not None,
                                reason="NVIDIA DALI not installed (optional extra `dali`)")

# torchvision 0.29 deprecates its image decoders (for TorchCodec); they still work and are used.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "cifar10": write_tiny_cifar(str(root / "c10"), train_per_class=6, test_per_class=3),
        "cifar100": write_tiny_cifar(str(root / "c100"), num_classes=100, train_per_class=2,
                                     test_per_class=1),
        "svhn": write_tiny_svhn(str(root / "svhn"), train_per_class=6, test_per_class=3),
        "imagefolder": _with_corrupt_val(write_tiny_imagefolder(
            str(root / "if"), num_classes=3, train_per_class=5, val_per_class=3, size=96)),
    }


def _with_corrupt_val(root):
    """Also a truncated JPEG in val/ (the test set): both loaders must leave it out."""
    import os
    good = os.path.join(root, "val", "class_01", "val_1_0.jpg")
    with open(good, "rb") as f:
        head = f.read(400)
    with open(os.path.join(root, "val", "class_01", "broken.jpg"), "wb") as f:
        f.write(head)
    return root


def config(data, dataset, **kw):
    base = dict(dataset=dataset, data_dir=data[dataset], labels_per_class=2, val_per_class=1,
                batch_size=4, mu=3, eval_batch_size=5, num_workers=0, image_size=None,
                loader="torch", randaug_magnitude=9, cutout=8)
    base.update(kw)
    return DataConfig(**base)


def quiet_build(cfg, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_streams(cfg, seed=kw.pop("seed", 0), **kw)


@pytest.mark.parametrize("dataset,classes,size,test_count,labeled_count", [
    ("cifar10", 10, 32, 30, 20), ("cifar100", 100, 32, 100, 100), ("svhn", 10, 32, 30, 20),
    ("imagefolder", 4, 64, 9, 6)])
def test_torch_streams_shapes_dtypes_counts(data, dataset, classes, size, test_count, labeled_count):
    cfg = config(data, dataset, image_size=64 if dataset == "imagefolder" else None)
    s = quiet_build(cfg)
    assert s.num_classes == classes and s.input_shape == (3, size, size)
    labeled_classes = set()
    for _ in range(3):
        x, y = next(s.labeled)
        assert x.shape == (4, 3, size, size) and x.dtype == torch.float32
        assert y.shape == (4,) and y.dtype == torch.int64
        assert ((0 <= y) & (y < classes)).all()
        labeled_classes.update(y.tolist())
        weak, strong = next(s.unlabeled)
        assert weak.shape == strong.shape == (12, 3, size, size)
        assert weak.dtype == strong.dtype == torch.float32
        assert not torch.equal(weak, strong)
    assert sum(len(y) for _, y in s.test) == test_count
    val = [(x, y) for x, y in s.val]
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, size, size) for x, _ in val)
    expected_val = classes if dataset != "imagefolder" else 3  # the empty class has none
    assert sum(len(y) for _, y in val) == expected_val
    assert len(s.split["labeled"]) == labeled_count  # 2 per class, 1 where a class has 2


def test_labeled_stream_uses_only_split_labels(data):
    cfg = config(data, "cifar10", batch_size=8)
    s = quiet_build(cfg)
    from mpl_fast.data.cifar import load_cifar
    src = load_cifar(data["cifar10"])
    wanted = src.train.labels[s.split["labeled"]]
    seen = np.concatenate([next(s.labeled)[1].numpy() for _ in range(10)])  # 80 draws of 20
    assert np.array_equal(np.bincount(seen, minlength=10) > 0, np.bincount(wanted, minlength=10) > 0)
    # 10 batches of 8 over a 20-sample set = 4 whole passes: every sample exactly 4 times.
    assert sorted(np.bincount(seen, minlength=10).tolist()) == [8] * 10


def test_same_seed_same_batches_any_worker_count(data):
    a = quiet_build(config(data, "cifar10", num_workers=0))
    b = quiet_build(config(data, "cifar10", num_workers=1))
    c = quiet_build(config(data, "cifar10"), seed=1)
    xa, ya = next(a.labeled)
    xb, yb = next(b.labeled)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    wa, sa = next(a.unlabeled)
    wb, sb = next(b.unlabeled)
    assert torch.equal(wa, wb) and torch.equal(sa, sb)
    assert not torch.equal(next(c.unlabeled)[0], wa)


def test_ranks_get_disjoint_shards():
    indices = np.arange(100, 200)
    seen = []
    for rank in range(3):
        it = iter(InfiniteBatches(indices, 7, seed=0, stream=2, rank=rank, world_size=3))
        seen.append({i for _ in range(10) for i in next(it)[1]})
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert seen[0] | seen[1] | seen[2] == set(range(100, 200))
    with pytest.raises(ValueError, match="rank 2 of 3 gets no samples"):
        InfiniteBatches(np.arange(2), 4, seed=0, stream=1, rank=2, world_size=3)


def test_rank_streams_build(data):
    s0 = quiet_build(config(data, "svhn"), rank=0, world_size=2)
    s1 = quiet_build(config(data, "svhn"), rank=1, world_size=2)
    assert not torch.equal(next(s0.unlabeled)[0], next(s1.unlabeled)[0])


def test_weak_view_is_a_reflect_padded_crop_maybe_flipped():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 10, 12), dtype=torch.uint8, generator=g)
    out = pad_crop_flip(images, pad=3, flip=True, generator=g)
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (3, 3), (3, 3)), mode="reflect")
    flips = 0
    for i in range(6):
        candidates = [(padded[i, :, y:y + 10, x:x + 12], f) for y in range(7) for x in range(7)
                      for f in (False, True)]
        matches = [f for c, f in candidates if np.array_equal(c[..., ::-1] if f else c, out[i].numpy())]
        assert matches, f"image {i} is not a crop of its padded original"
        flips += matches[0]
    assert torch.equal(pad_crop_flip(images, pad=0, flip=False, generator=g), images)


def test_strong_view_keeps_shape_and_is_seeded():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    kw = dict(num_ops=2, magnitude=9, policy="mpl", cutout=8)
    a = strong_view(images, generator=torch.Generator().manual_seed(3), **kw)
    b = strong_view(images, generator=torch.Generator().manual_seed(3), **kw)
    assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, images)
    # The trainer's global RNG is not touched (dropout etc. must not follow the data).
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    strong_view(images, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(torch.rand(3), expected)


def test_normalize():
    n = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = n(x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.allclose(out[0, :, 0, 1], torch.tensor([1.0, 3.0, 1.0]))


def test_corrupt_image_is_skipped_and_counted(data):
    cfg = config(data, "imagefolder", labels_per_class=None, val_per_class=0, image_size=32,
                 batch_size=8)
    s = quiet_build(cfg)
    for _ in range(4):  # 32 draws of 16 training files: the truncated one is met
        next(s.labeled)
    assert s.stats["corrupt_images"] == 1 and s.stats["corrupt_skips"] >= 1
    assert s.stats["corrupt_files"][0].endswith("truncated.jpg")
    assert sum(len(y) for _, y in s.test) == 9  # 10 files in val/, one truncated
    assert s.stats["corrupt_images"] == 2 and s.stats["corrupt_files"][1].endswith("broken.jpg")
    assert s.stats["skipped_non_image"] == 1 and s.stats["skipped_empty_class"] == 1


def test_corrupt_count_is_carried_across_a_checkpoint_and_resume(data, tmp_path):
    """The corrupt-image record goes into a checkpoint and comes back: a resumed run goes on
    counting from it (and does not warn again about a file it already reported)."""
    from mpl_fast import checkpoint as ckpt

    cfg = config(data, "imagefolder", labels_per_class=None, val_per_class=0, image_size=32,
                 batch_size=8)
    s = quiet_build(cfg)
    for _ in range(4):
        next(s.labeled)
    counts = s.corrupt_counts()
    assert counts["corrupt_images"] == 1 and counts["corrupt_skips"] >= 1
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_atomic({"labeled": s.labeled.state_dict(), "corrupt": s.corrupt_state()}, path)
    saved = ckpt.load(path)  # weights_only: the record is plain ints and strings

    resumed = quiet_build(cfg)
    assert resumed.corrupt_counts() == {"corrupt_images": 0, "corrupt_skips": 0}
    resumed.load_corrupt_state(saved["corrupt"])
    resumed.labeled.load_state_dict(saved["labeled"])
    assert resumed.corrupt_counts() == counts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):  # four more passes over the 16 training files
            next(resumed.labeled)
    assert not [w for w in caught if "skipping corrupt image" in str(w.message)]
    assert resumed.stats["corrupt_images"] == 1 and resumed.stats["corrupt_skips"] > counts["corrupt_skips"]


def test_restore_corrupt_unions_files_and_keeps_the_larger_skip_count():
    from mpl_fast.data.bad_data import corrupt_state, new_stats, restore_corrupt

    built = new_stats("dali")  # a DALI build counts its bad files again
    built.update(corrupt_images=2, corrupt_skips=2, corrupt_files=["/d/b.jpg", "/d/c.jpg"])
    restore_corrupt(built, {"corrupt_images": 2, "corrupt_skips": 7, "corrupt_files": ["/d/a.jpg", "/d/b.jpg"]})
    assert corrupt_state(built) == {"corrupt_images": 3, "corrupt_skips": 7,
                                    "corrupt_files": ["/d/a.jpg", "/d/b.jpg", "/d/c.jpg"]}
    assert corrupt_state({"world_size": 2}) == {"corrupt_images": 0, "corrupt_skips": 0, "corrupt_files": []}


def test_strict_stops_naming_the_file(data):
    cfg = config(data, "imagefolder", labels_per_class=None, val_per_class=0, image_size=32,
                 batch_size=8, strict=True, num_workers=1)
    s = quiet_build(cfg)
    with pytest.raises(CorruptImageError, match=r"corrupt image .*truncated.jpg"):
        for _ in range(4):
            next(s.labeled)


def test_loader_choice_and_refusals(data, monkeypatch):
    s = quiet_build(config(data, "cifar10", loader="auto"))
    assert s.stats["loader"] == "torch"
    with pytest.raises(ValueError, match=r"--loader dali decodes image files; cifar10"):
        quiet_build(config(data, "cifar10", loader="dali"))
    with pytest.raises(ValueError, match=r"loader must be one of"):
        quiet_build(config(data, "imagefolder", loader="fast"))
    import mpl_fast.data.dali_pipeline as dp
    monkeypatch.setattr(dp, "dali_unavailable_reason", lambda: "DALI is not importable (test)")
    with pytest.raises(RuntimeError, match=r"--loader dali cannot run: DALI is not importable"):
        quiet_build(config(data, "imagefolder", loader="dali"))
    assert quiet_build(config(data, "imagefolder", loader="auto")).stats["loader"] == "torch"


def test_missing_data_dir_is_one_sentence():
    with pytest.raises(ValueError, match=r"give its folder with --data-dir"):
        build_streams(DataConfig(dataset="svhn"), seed=0)


@needs_dali
def test_dali_cpu_pipeline_streams(data):
    cfg = config(data, "imagefolder", loader="dali", image_size=48)
    s = quiet_build(cfg)
    assert s.stats["loader"] == "dali"
    for _ in range(3):
        x, y = next(s.labeled)
        assert x.shape == (4, 3, 48, 48) and x.dtype == torch.float32
        assert y.shape == (4,) and y.dtype == torch.int64 and ((0 <= y) & (y < 4)).all()
        weak, strong = next(s.unlabeled)
        assert weak.shape == strong.shape == (12, 3, 48, 48) and not torch.equal(weak, strong)
    # The truncated JPEGs (train/ and val/) are caught before DALI sees them.
    assert s.stats["corrupt_images"] == 2
    assert sum(len(y) for _, y in s.test) == 9


@needs_dali
def test_dali_strict_stops_at_build_naming_the_file(data):
    with pytest.raises(CorruptImageError, match=r"corrupt image .*truncated.jpg: truncated JPEG"):
        quiet_build(config(data, "imagefolder", loader="dali", strict=True))


@needs_dali
def test_dali_and_torch_agree_on_samples_and_labels(data):
    torch_s = quiet_build(config(data, "imagefolder", image_size=40))
    dali_s = quiet_build(config(data, "imagefolder", loader="dali", image_size=40))
    assert torch_s.split == dali_s.split
    next(iter(dali_s.test))  # an abandoned pass must not shift the next one
    next(iter(torch_s.test))
    for name in ("val", "test"):
        for _ in range(2):  # eval sets are re-iterable
            t = torch.cat([y for _, y in getattr(torch_s, name)])
            d = torch.cat([y for _, y in getattr(dali_s, name)])
            assert t.tolist() == d.tolist(), name
    # Eval views decode the same files with the same resize/crop: close, not bit-equal.
    xt = torch.cat([x for x, _ in torch_s.test])
    xd = torch.cat([x for x, _ in dali_s.test])
    assert xt.shape == xd.shape
    assert (xt - xd).abs().mean() < 0.02  # measured ~0.003 (normalised units)
    # Labeled streams draw the same labeled files (corrupt one excluded in both).
    wanted = sorted(int(k.split("class_")[1][:2]) for k in torch_s.split["labeled"])
    assert sorted(set(torch.cat([next(dali_s.labeled)[1] for _ in range(6)]).tolist())) == \
        sorted(set(wanted))


@pytest.mark.cuda
def test_torch_pipeline_strong_view_on_gpu(data):
    s = quiet_build(config(data, "imagefolder", image_size=64), device="cuda")
    x, y = next(s.labeled)
    weak, strong = next(s.unlabeled)
    assert x.is_cuda and y.is_cuda and weak.is_cuda and strong.is_cuda
    assert weak.shape == strong.shape == (12, 3, 64, 64) and not torch.equal(weak, strong)
    assert sum(len(y) for _, y in s.test) == 9


@pytest.mark.cuda
@needs_dali
def test_dali_gpu_decode_matches_cpu_counts(data):
    cfg = config(data, "imagefolder", loader="auto", image_size=48)
    s = quiet_build(cfg, device="cuda")
    assert s.stats["loader"] == "dali"  # auto picks DALI with CUDA present
    weak, strong = next(s.unlabeled)
    assert weak.is_cuda and strong.is_cuda and weak.shape == (12, 3, 48, 48)
    cpu = quiet_build(config(data, "imagefolder", loader="dali", image_size=48))
    assert [y.tolist() for _, y in s.test] == [y.tolist() for _, y in cpu.test]


def test_all_corrupt_training_images_stop_with_a_message_not_a_worker_traceback(tmp_path):
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "x.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    cfg = DataConfig(dataset="imagefolder", data_dir=str(tmp_path), batch_size=2, mu=1,
                     num_workers=1, image_size=16, loader="torch")
    s = quiet_build(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"a batch lost 2 images to 20 corrupt files in a row"):
            next(s.labeled)
        assert sum(len(y) for _, y in s.test) == 0 and s.stats["corrupt_images"] == 4


@needs_dali
def test_dali_ranks_read_disjoint_shards(data):
    """Two ranks of a DALI labeled stream over the 15 readable training files: between them
    they see every class, each sees only its shard (batches are full either way)."""
    streams = [quiet_build(config(data, "imagefolder", loader="dali", image_size=32,
                                  labels_per_class=None, val_per_class=0, batch_size=3),
                           rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([next(s.labeled)[1] for _ in range(6)]) for s in streams]
    assert all(len(y) == 18 for y in seen)
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == {0, 1, 2}
    # Shards of 7 and 8 files (seeded shuffle): the ranks do not read the same stream.
    assert np.bincount(seen[0], minlength=3).tolist() != np.bincount(seen[1], minlength=3).tolist()


def test_strong_view_left_to_the_main_process_as_on_a_gpu(data):
    """The GPU path on the CPU: workers send the weak uint8 batch only, the main process
    computes the strong view (there on the device) with the batch's own seed."""
    from mpl_fast.data.cifar import load_cifar
    from mpl_fast.data.torch_pipeline import UNLABELED, BatchDataset, _Finish

    src = load_cifar(data["cifar10"])
    strong = dict(num_ops=2, magnitude=9, policy="mpl", cutout=8)
    in_worker = BatchDataset(src.train, view=UNLABELED, image_size=32, flip=True, strong=strong)
    deferred = BatchDataset(src.train, view=UNLABELED, image_size=32, flip=True, strong=None)
    item = (1234, list(range(10)))
    a, b = in_worker[item], deferred[item]
    assert "strong" in a and "strong" not in b and torch.equal(a["weak"], b["weak"])
    finish = _Finish(device="cpu", mean=src.mean, std=src.std, strong=strong, stats={}, strict=False)
    weak, strong_b = finish.unlabeled(b, 10)
    assert weak.shape == strong_b.shape == (10, 3, 32, 32)
    # The strong view's generator comes from the batch seed alone: same views either way.
    assert torch.equal(finish.normalize(a["strong"]), strong_b)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_torch_streams_resume_with_the_next_batch(data, num_workers):
    cfg = config(data, "cifar10", num_workers=num_workers)
    first = quiet_build(cfg)
    for _ in range(3):
        next(first.labeled), next(first.unlabeled)
    state = {"labeled": first.labeled.state_dict(), "unlabeled": first.unlabeled.state_dict()}
    expected = [(next(first.labeled), next(first.unlabeled)) for _ in range(2)]
    resumed = quiet_build(cfg)
    resumed.labeled.load_state_dict(state["labeled"])
    resumed.unlabeled.load_state_dict(state["unlabeled"])
    assert state == {"labeled": {"consumed": 3}, "unlabeled": {"consumed": 3}}
    for (x, y), (weak, strong) in expected:
        (rx, ry), (rweak, rstrong) = next(resumed.labeled), next(resumed.unlabeled)
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert torch.equal(weak, rweak) and torch.equal(strong, rstrong)


def _interrupted_and_resumed(cfg, before, after, **build_kw):
    """(the batches after ``before`` of an uninterrupted stream, the same number from a stream
    rebuilt from the first one's state_dict, the saved state)."""
    first = quiet_build(cfg, **build_kw)
    for _ in range(before):
        next(first.labeled), next(first.unlabeled)
    state = {"labeled": first.labeled.state_dict(), "unlabeled": first.unlabeled.state_dict()}
    expected = [(next(first.labeled), next(first.unlabeled)) for _ in range(after)]
    resumed = quiet_build(cfg, **build_kw)
    resumed.labeled.load_state_dict(state["labeled"])
    resumed.unlabeled.load_state_dict(state["unlabeled"])
    return expected, [(next(resumed.labeled), next(resumed.unlabeled)) for _ in range(after)], state


def _assert_same_batches(expected, got):
    for ((x, y), (weak, strong)), ((rx, ry), (rweak, rstrong)) in zip(expected, got, strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        assert torch.equal(weak, rweak) and torch.equal(strong, rstrong)


@needs_dali
def test_dali_streams_resume_with_the_next_batch(data):
    # 5 labeled files in batches of 4 and 10 unlabeled in 12: the resumed batches cross epochs,
    # where DALI reshuffles (shuffle_after_epoch), and the random crops/flips continue.
    cfg = config(data, "imagefolder", loader="dali", image_size=32, num_workers=2)
    expected, got, state = _interrupted_and_resumed(cfg, before=3, after=3)
    assert state["labeled"]["consumed"] == 3 and state["unlabeled"]["consumed"] == 3
    assert isinstance(state["unlabeled"]["dali_checkpoint"], (str, bytes))
    _assert_same_batches(expected, got)
    # The continuation differs from a restart, so the comparison above can fail.
    restarted = quiet_build(cfg)
    assert not torch.equal(next(restarted.unlabeled)[0], expected[0][1][0])


@needs_dali
def test_dali_checkpoint_survives_a_checkpoint_file(data, tmp_path):
    """The state goes through torch.save / torch.load(weights_only=True) as the trainer's does."""
    cfg = config(data, "imagefolder", loader="dali", image_size=32)
    first = quiet_build(cfg)
    next(first.unlabeled)
    torch.save({"unlabeled": first.unlabeled.state_dict()}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    expected = next(first.unlabeled)
    resumed = quiet_build(cfg)
    resumed.unlabeled.load_state_dict(loaded["unlabeled"])
    got = next(resumed.unlabeled)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


@needs_dali
def test_dali_other_rank_resumes_by_skipping_ahead(data):
    # The fallback when a checkpoint holds no state of this rank's own (another world size, an
    # older checkpoint): rank 1 cannot use rank 0's DALI checkpoint (it names rank 0's shard),
    # so it replays its own stream up to `consumed`.
    cfg = config(data, "imagefolder", loader="dali", image_size=32)
    rank0 = quiet_build(cfg, rank=0, world_size=2)
    for _ in range(2):
        next(rank0.labeled), next(rank0.unlabeled)
    state0 = {n: getattr(rank0, n).state_dict() for n in ("labeled", "unlabeled")}
    rank1 = quiet_build(cfg, rank=1, world_size=2)
    for _ in range(2):
        next(rank1.labeled), next(rank1.unlabeled)
    expected = [(next(rank1.labeled), next(rank1.unlabeled)) for _ in range(2)]
    resumed1 = quiet_build(cfg, rank=1, world_size=2)
    resumed1.labeled.load_state_dict(state0["labeled"])
    resumed1.unlabeled.load_state_dict(state0["unlabeled"])
    _assert_same_batches(expected, [(next(resumed1.labeled), next(resumed1.unlabeled)) for _ in range(2)])
    assert resumed1.labeled._source.skipped_ahead == 2 and resumed1.unlabeled._source.skipped_ahead == 2
