"""Readers of CIFAR-10/100 pickles, SVHN .mat files and ImageFolder trees, on tiny data sets
written in the real formats; bad layouts and bad data give one clear sentence."""

import os
import pickle

import numpy as np
import pytest
import torch

from mpl_fast.data.cifar import load_cifar
from mpl_fast.data.imagefolder import load_imagefolder, quick_check
from mpl_fast.data.svhn import load_svhn
from mpl_fast.data.tiny import write_python2_pickle, write_tiny_cifar, write_tiny_imagefolder, write_tiny_svhn

# torchvision 0.29 deprecates its image decoders (for TorchCodec); they still work and are used.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def test_cifar10_reads_batches_into_hwc_images(tmp_path):
    root = write_tiny_cifar(str(tmp_path), train_per_class=4, test_per_class=2)
    # Overwrite one training row with a known pattern: red ramp, green 7, blue 200.
    with open(tmp_path / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch["data"][0] = np.concatenate([np.arange(1024) % 256, np.full(1024, 7), np.full(1024, 200)])
    write_python2_pickle(batch, str(tmp_path / "data_batch_1"))
    src = load_cifar(root, 10)
    assert src.train.images.shape == (40, 32, 32, 3) and src.train.images.dtype == np.uint8
    assert src.test.images.shape == (20, 32, 32, 3)
    assert src.train.labels.dtype == np.int64 and sorted(np.bincount(src.train.labels)) == [4] * 10
    first = src.train.images[0]
    assert first[0, :, 0].tolist() == list(range(32)) and first[1, 0, 0] == 32  # row-major red
    assert (first[..., 1] == 7).all() and (first[..., 2] == 200).all()
    assert src.classes[3] == "class3" and src.num_classes == 10 and src.flip


def test_cifar100_uses_fine_labels_and_finds_the_extracted_subfolder(tmp_path):
    write_tiny_cifar(str(tmp_path / "cifar-100-python"), num_classes=100, train_per_class=2,
                     test_per_class=1)
    src = load_cifar(str(tmp_path), 100)
    assert len(src.train) == 200 and len(src.test) == 100
    assert set(src.train.labels.tolist()) == set(range(100))


def test_cifar_missing_layout_says_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected CIFAR-10 python batches .*data_batch_1.*"
                                                r"test_batch.* in .*cifar-10-python.tar.gz"):
        load_cifar(str(tmp_path), 10)


def test_cifar_label_out_of_range_names_the_file(tmp_path):
    write_tiny_cifar(str(tmp_path))
    with open(tmp_path / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    batch["labels"][5] = 10
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump(batch, f)  # re-pickled by Python 3 (protocol 5): read as well
    with pytest.raises(ValueError, match=r"test_batch: label 10 at position 5 is outside 0..9"):
        load_cifar(str(tmp_path), 10)


def test_cifar_garbage_batch_is_a_clear_error(tmp_path):
    write_tiny_cifar(str(tmp_path))
    (tmp_path / "data_batch_3").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match=r"data_batch_3 is not a readable CIFAR python batch"):
        load_cifar(str(tmp_path), 10)


def test_cifar_batches_are_the_real_python2_format_and_load(tmp_path):
    """The fake batches are what Python 2's cPickle wrote (protocol 2, str keys as BINSTRING,
    arrays through numpy.core.multiarray._reconstruct): the restricted reader must load that,
    and the same data re-pickled by Python 3 with bytes keys (as pickle.load(encoding='bytes')
    gives them) under protocol 2, which writes bytes through _codecs.encode."""
    import pickletools

    root = write_tiny_cifar(str(tmp_path / "c10"), train_per_class=2, test_per_class=1)
    raw = (tmp_path / "c10" / "data_batch_1").read_bytes()
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    assert ops[0] == ("PROTO", 2)
    assert ("GLOBAL", "numpy.core.multiarray _reconstruct") in ops and ("SHORT_BINSTRING", "data") in ops
    with open(tmp_path / "c10" / "data_batch_1", "rb") as f:
        as_bytes = pickle.load(f, encoding="bytes")
    assert sorted(as_bytes) == [b"batch_label", b"data", b"filenames", b"labels"]
    expected = load_cifar(root, 10)

    for name in ("data_batch_1", "batches.meta"):
        with open(tmp_path / "c10" / name, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        with open(tmp_path / "c10" / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    assert b"_codecs\nencode" in (tmp_path / "c10" / "data_batch_1").read_bytes()
    again = load_cifar(root, 10)
    assert np.array_equal(again.train.images, expected.train.images)
    assert np.array_equal(again.train.labels, expected.train.labels)
    assert again.classes == expected.classes == [f"class{i}" for i in range(10)]


class _RunsCode:
    """A pickle payload: unpickling it calls os.system, which writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran > '{self.marker}'",)


class _Py2Eval:
    """The same payload as Python 2 would write it: __builtin__.eval on an expression."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("target", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("payload,protocol", [(_RunsCode, 2), (_RunsCode, 5), (_Py2Eval, 2)])
def test_cifar_pickle_that_would_run_code_is_refused_naming_the_file(tmp_path, target, payload, protocol):
    root = write_tiny_cifar(str(tmp_path / "c10"), train_per_class=2, test_per_class=1)
    marker = tmp_path / "payload-ran"
    with open(os.path.join(root, target), "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    key = "data" if target == "data_batch_1" else "label_names"
    entry[key] = payload(marker)  # hidden inside an otherwise well-formed file
    with open(os.path.join(root, target), "wb") as f:
        pickle.dump(entry, f, protocol=protocol)
    with pytest.raises(ValueError) as caught:
        load_cifar(root, 10)
    message = str(caught.value)
    assert message.startswith(os.path.join(root, target) + " asks to load ")
    assert "refusing to unpickle it" in message and "\n" not in message
    assert not marker.exists()


def test_cifar_pickle_with_a_non_latin1_codec_or_a_persistent_id_is_refused(tmp_path):
    root = write_tiny_cifar(str(tmp_path / "c10"), train_per_class=2, test_per_class=1)
    path = os.path.join(root, "data_batch_2")
    # _codecs.encode('x', 'rot13') then a persistent id: both plain-data readers never need
    with open(path, "wb") as f:
        f.write(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(ValueError, match=r"data_batch_2 asks for _codecs.encode with 'rot13'.*refusing"):
        load_cifar(root, 10)
    with open(path, "wb") as f:
        f.write(b"\x80\x02X\x01\x00\x00\x00aQ.")
    with pytest.raises(ValueError, match=r"data_batch_2 holds a persistent reference.*refusing"):
        load_cifar(root, 10)


def test_svhn_maps_label_10_to_digit_0_and_transposes(tmp_path):
    from scipy.io import loadmat

    write_tiny_svhn(str(tmp_path), train_per_class=3, test_per_class=2)
    raw = loadmat(str(tmp_path / "train_32x32.mat"))
    src = load_svhn(str(tmp_path))
    assert src.train.images.shape == (30, 32, 32, 3) and len(src.test) == 20
    assert set(src.train.labels.tolist()) == set(range(10))
    expected = np.where(raw["y"].reshape(-1) == 10, 0, raw["y"].reshape(-1))
    assert (src.train.labels == expected).all()
    assert (src.train.images[4] == raw["X"][..., 4]).all()
    assert not src.flip  # digits are not mirrored


def test_svhn_missing_and_bad_labels(tmp_path):
    from scipy.io import savemat

    with pytest.raises(FileNotFoundError, match=r"expected SVHN files train_32x32.mat and "
                                                r"test_32x32.mat in .*ufldl"):
        load_svhn(str(tmp_path))
    write_tiny_svhn(str(tmp_path))
    x = np.zeros((32, 32, 3, 2), np.uint8)
    savemat(str(tmp_path / "test_32x32.mat"), {"X": x, "y": np.array([[3], [11]], np.uint8)})
    with pytest.raises(ValueError, match=r"test_32x32.mat: label 11 .* outside 0..9"):
        load_svhn(str(tmp_path))


def test_imagefolder_scan_skips_non_images_and_keeps_empty_class_index(tmp_path):
    root = write_tiny_imagefolder(str(tmp_path), num_classes=3, train_per_class=4, val_per_class=2)
    with pytest.warns(UserWarning) as caught:
        src = load_imagefolder(root)
    messages = " ".join(str(w.message) for w in caught)
    assert "non-image" in messages and "class_zz_empty" in messages
    assert src.classes == ["class_00", "class_01", "class_02", "class_zz_empty"]
    assert len(src.train) == 3 * 4 + 1  # + the truncated JPEG, found only when decoded
    assert len(src.test) == 3 * 2
    assert all(k.startswith("train" + os.sep) for k in src.train.keys)
    assert all(os.path.isabs(p) for p in src.train.images)
    assert src.skipped["non_image"][0].endswith("notes.txt")
    assert src.image_size == 224


def test_imagefolder_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected an ImageFolder in the ImageNet layout"):
        load_imagefolder(str(tmp_path))
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"class folder 'dog' that train/ does not have"):
        load_imagefolder(str(tmp_path))


def _tiny_images(folder, names):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (6, 5), (40 * i, 90, 200)).save(os.path.join(folder, name))


def test_imagefolder_symlinked_class_folders_never_repeat_images(tmp_path):
    """train/all -> train (the issue's case: a class of every image under a second label),
    train/up -> above the root, train/dog_twin -> the same outside folder as train/dog_ext:
    each skipped with one warning naming it; a symlink out of the root onto its own files is
    a class like any other; val/ext_shared -> a folder train/ uses is skipped too."""
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    _tiny_images(root / "train" / "cat", ["c0.png", "c1.jpg"])
    _tiny_images(root / "train" / "dog", ["d0.jpg", "d1.png"])
    _tiny_images(root / "val" / "cat", ["vc.png"])
    _tiny_images(root / "val" / "dog", ["vd.jpg"])
    _tiny_images(outside / "dogs", ["e0.png", "e1.png"])
    os.symlink("..", root / "train" / "all")
    os.symlink(os.path.join("..", ".."), root / "train" / "aa_up")
    os.symlink(outside / "dogs", root / "train" / "dog_ext")
    os.symlink(outside / "dogs", root / "train" / "dog_twin")
    os.symlink(outside / "dogs", root / "val" / "ext_shared")
    with pytest.warns(UserWarning) as caught:
        src = load_imagefolder(str(root))
    messages = [str(w.message) for w in caught if "skipped class folder" in str(w.message)]
    assert len(messages) == 4
    for name, why in (("train/all", "inside (or above) the data root"),
                      ("train/aa_up", "inside (or above) the data root"),
                      ("train/dog_twin", "the files of class 'dog_ext'"),
                      ("val/ext_shared", "the files of class 'train/dog_ext'")):
        assert any(m.startswith(f"skipped class folder {root / name}: ") and why in m for m in messages), name
    assert src.classes == ["cat", "dog", "dog_ext"]
    assert sorted(src.skipped["symlinked_class"]) == sorted(
        str(root / n) for n in ("train/aa_up", "train/all", "train/dog_twin", "val/ext_shared"))
    real_train = [os.path.realpath(p) for p in src.train.images]
    real_test = [os.path.realpath(p) for p in src.test.images]
    assert len(real_train) == len(set(real_train)) == 6 and not set(real_train) & set(real_test)
    assert dict(zip(src.train.keys, src.train.labels.tolist()))[os.path.join("train", "dog_ext", "e0.png")] == 2


def test_imagefolder_val_that_is_train_is_refused(tmp_path):
    root = tmp_path / "data"
    _tiny_images(root / "train" / "cat", ["c0.png"])
    os.symlink("train", root / "val")
    with pytest.raises(ValueError, match=r"val and .*train resolve to overlapping folders.*give val/ its own"):
        load_imagefolder(str(root))


def test_quick_check_flags_truncated_and_non_images(tmp_path):
    root = write_tiny_imagefolder(str(tmp_path), num_classes=1, train_per_class=1, val_per_class=1)
    train0 = os.path.join(root, "train", "class_00")
    assert quick_check(os.path.join(train0, "train_0_0.jpg")) is None
    assert "truncated JPEG" in quick_check(os.path.join(train0, "truncated.jpg"))
    assert quick_check(os.path.join(train0, "notes.txt")) == "not a JPEG or PNG file"
    from PIL import Image
    png = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(png)
    assert quick_check(str(png)) is None
    png.write_bytes(png.read_bytes()[:30])
    assert "truncated PNG" in quick_check(str(png))


def test_decode_gives_uint8_rgb_for_grey_16bit_palette_and_alpha(tmp_path):
    from PIL import Image

    from mpl_fast.data.torch_pipeline import decode_file

    ramp = (np.arange(40 * 30).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    Image.fromarray(np.full((30, 40, 4), 77, np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((30, 40), 5, np.uint8)).convert("P").save(tmp_path / "p.png")
    Image.fromarray(np.full((30, 40), 9, np.uint8)).save(tmp_path / "grey.jpg")
    for name in ("g16.png", "rgba.png", "p.png", "grey.jpg"):
        image = decode_file(str(tmp_path / name))
        assert image.shape == (3, 30, 40) and image.dtype == torch.uint8, name
    assert decode_file(str(tmp_path / "rgba.png"))[:, 0, 0].tolist() == [77, 77, 77]


def test_pil_decode_fallback_matches_torchvision_on_png(tmp_path):
    from PIL import Image

    from mpl_fast.data.torch_pipeline import _pil_decode, decode_file

    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    assert torch.equal(_pil_decode(str(tmp_path / "x.png")), decode_file(str(tmp_path / "x.png")))
    assert torch.equal(decode_file(str(tmp_path / "x.png")), torch.from_numpy(pixels).permute(2, 0, 1))


def test_pil_decode_opens_only_jpeg_and_png_whatever_the_content(tmp_path):
    """PIL picks a decoder by content; an EPS file named .jpg would go to Ghostscript."""
    from PIL import Image, UnidentifiedImageError

    from mpl_fast.data.torch_pipeline import _pil_decode

    (tmp_path / "x.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "y.png", format="GIF")
    for name in ("x.jpg", "y.png"):
        with pytest.raises(UnidentifiedImageError):
            _pil_decode(str(tmp_path / name))
