"""Tiny data sets written in the real on-disk formats (CIFAR python batches, SVHN .mat,
ImageFolder of JPEGs): for tests, smoke runs and benchmarks without the real data."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np


def _images(rng: np.random.Generator, n: int, labels: np.ndarray) -> np.ndarray:
    """(n, 32, 32, 3) uint8 images whose mean colour depends on the label (learnable)."""
    base = (labels[:, None, None, None] * 37 + np.array([0, 85, 170])) % 256
    noise = rng.integers(-40, 41, size=(n, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


class _Global:
    """A module-level name to write as it is (a Python 2 numpy's name, not this numpy's)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # never called: the pickler only writes the name
        raise TypeError(f"{self.module}.{self.name} is only a name to pickle")


class _Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle (protocol 2) wrote for the CIFAR batches: str as
    SHORT_BINSTRING/BINSTRING, numpy arrays through numpy.core.multiarray._reconstruct with
    their raw bytes, dtypes through numpy.dtype; ints, lists, dicts and tuples as usual."""

    dispatch = pickle._Pickler.dispatch.copy()

    def __init__(self, file):
        super().__init__(file, protocol=2)

    def save_str(self, obj):  # a Python 2 str holds bytes (latin-1 for the text here)
        self.save_bytes(obj.encode("latin1"))
    dispatch[str] = save_str

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_bytes

    def save_name(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
        self.memoize(obj)
    dispatch[_Global] = save_name

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            raw = np.ascontiguousarray(obj).tobytes()
            return (_Global("numpy.core.multiarray", "_reconstruct"),
                    (_Global("numpy", "ndarray"), (0,), b"b"), (1, obj.shape, obj.dtype, False, raw))
        if isinstance(obj, np.dtype):
            if obj.itemsize != 1:
                raise ValueError("the Python 2 writer here handles byte-sized dtypes only (CIFAR's uint8)")
            return _Global("numpy", "dtype"), (obj.str[1:], 0, 1), (3, "|", None, None, None, -1, -1, 0)
        return NotImplemented


def write_python2_pickle(obj, path: str) -> None:
    """``obj`` (dicts, lists, str, ints, uint8 arrays) pickled at ``path`` byte for byte as
    Python 2 wrote the real CIFAR batches (protocol 2, str keys)."""
    with open(path, "wb") as f:
        _Python2Pickler(f).dump(obj)


def write_tiny_cifar(root: str, *, num_classes: int = 10, train_per_class: int = 10,
                     test_per_class: int = 3, seed: int = 0) -> str:
    """CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test, meta)
    pickles with a few images per class in ``root``, written as Python 2 wrote the real ones;
    returns ``root``."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    label_key = "labels" if num_classes == 10 else "fine_labels"

    def batch(name, labels):
        images = _images(rng, len(labels), labels)
        data = images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        return {"batch_label": f"tiny batch {name}", label_key: [int(v) for v in labels],
                "data": data, "filenames": [f"{name}_{i:05d}.png" for i in range(len(labels))]}

    train = rng.permutation(np.repeat(np.arange(num_classes), train_per_class))
    test = np.repeat(np.arange(num_classes), test_per_class)
    if num_classes == 10:
        parts = {f"data_batch_{i + 1}": chunk for i, chunk in enumerate(np.array_split(train, 5))}
        parts["test_batch"] = test
        meta = ("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    else:
        parts = {"train": train, "test": test}
        meta = ("meta", {"fine_label_names": [f"class{i}" for i in range(num_classes)]})
    for name, labels in parts.items():
        write_python2_pickle(batch(name, labels), os.path.join(root, name))
    write_python2_pickle(meta[1], os.path.join(root, meta[0]))
    return root


def write_tiny_svhn(root: str, *, train_per_class: int = 10, test_per_class: int = 3,
                    seed: int = 0) -> str:
    """train_32x32.mat and test_32x32.mat (X (32, 32, 3, N) uint8, y (N, 1) with 10 for the
    digit 0) in ``root``; returns ``root``."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for name, per_class in (("train_32x32.mat", train_per_class), ("test_32x32.mat", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class))
        images = _images(rng, len(labels), labels)
        y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
        savemat(os.path.join(root, name), {"X": images.transpose(1, 2, 3, 0), "y": y})
    return root


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "moon",
          "immunohistochemistry", "camera", "coins", "page", "brick")  # shipped, no download


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle and friends return several
        image = image[0]
    if image.dtype != np.uint8:
        image = (image.astype(np.float64) / max(image.max(), 1) * 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return image[..., :3]


def write_tiny_imagefolder(root: str, *, num_classes: int = 3, train_per_class: int = 6,
                           val_per_class: int = 2, size: int | None = None, seed: int = 0,
                           bad_files: bool = True) -> str:
    """An ImageFolder (train/<class>/*.jpg, val/<class>/*.jpg) of real photos from
    scikit-image, each image a random crop of a photo, so no two files are the same.

    With ``bad_files``, also a truncated JPEG in train/, a non-image file and an empty class
    folder (the cases the readers must survive). ``size`` resizes crops (default: keep).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [_photo(n) for n in PHOTOS]
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            folder = os.path.join(root, split, f"class_{c:02d}")
            os.makedirs(folder, exist_ok=True)
            for i in range(per_class):
                photo = photos[(c * 5 + i) % len(photos)]
                h, w = photo.shape[:2]
                ch, cw = rng.integers(h // 2, h + 1), rng.integers(w // 2, w + 1)
                top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
                crop = Image.fromarray(photo[top:top + ch, left:left + cw])
                if size:
                    crop = crop.resize((size, size), Image.BILINEAR)
                crop.save(os.path.join(folder, f"{split}_{c}_{i}.jpg"), quality=90)
    if bad_files:
        train0 = os.path.join(root, "train", "class_00")
        with open(os.path.join(train0, "train_0_0.jpg"), "rb") as f:
            whole = f.read()
        with open(os.path.join(train0, "truncated.jpg"), "wb") as f:
            f.write(whole[: len(whole) // 3])
        with open(os.path.join(train0, "notes.txt"), "w") as f:
            f.write("not an image\n")
        os.makedirs(os.path.join(root, "train", "class_zz_empty"), exist_ok=True)
    return root
