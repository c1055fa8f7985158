"""ImageFolder trees of JPEG/PNG files in the ImageNet layout: DATA/train/<class>/<image> and
DATA/val/<class>/<image> (or DATA/test/<class>/<image>, as CIFAR-10's JPEG copies name their
held-out split). Class indices follow the sorted folder names of train/."""

from __future__ import annotations

import os
import warnings

import numpy as np

from mpl_fast.data.source import DatasetSource, LabeledSet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_LAYOUT_HINT = ("expected an ImageFolder in the ImageNet layout in {dir}: train/<class>/<image> and "
                "val/<class>/<image> (or test/<class>/<image>) with JPEG or PNG files (for ImageNet, "
                "extract the train and val archives there and sort val/ into class folders)")
HELD_OUT_NAMES = ("val", "test")  # the held-out (test) split's folder: whichever of these exists


def _class_folders(split_dir: str, root_real: str, skipped: dict,
                   other_split: dict[str, str] | None = None) -> dict[str, str]:
    """{class folder name: resolved path} of ``split_dir``, sorted by name. A symlinked folder
    that resolves inside the data root (to its parent, say, which would make a class of every
    image), above it, or onto the files of another class (of this split or ``other_split``) is
    left out, with a warning, and listed in ``skipped["symlinked_class"]``: each would put the
    same image under two labels or in two splits. Symlinks out of the root onto their own files
    (class folders kept on another disk) are followed."""
    entries = sorted((e for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")),
                     key=lambda e: e.name)
    # Plain folders first: a symlink never displaces a real class, whatever the names' order.
    taken = {e.name: os.path.realpath(e.path) for e in entries if not e.is_symlink()}
    for entry in (e for e in entries if e.is_symlink()):
        real = os.path.realpath(entry.path)
        others = [*taken.items(), *((f"train/{n}", r) for n, r in (other_split or {}).items())]
        clash = next((name for name, other in others if _within(real, other) or _within(other, real)), None)
        if _within(real, root_real) or _within(root_real, real):
            why = f"a symlink to {real}, inside (or above) the data root"
        elif clash is not None:
            why = f"it resolves to {real}, the files of class {clash!r}"
        else:
            taken[entry.name] = real
            continue
        skipped.setdefault("symlinked_class", []).append(entry.path)
        warnings.warn(f"skipped class folder {entry.path}: {why} (its images would repeat under a "
                      "second label)", stacklevel=3)
    return dict(sorted(taken.items()))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _scan(root: str, split: str, names: list[str], class_to_index: dict[str, int],
          skipped: dict) -> LabeledSet:
    """Image files under ``root/split/<class>/`` (recursively; symlinked sub-folders are not
    followed), sorted, with their labels."""
    paths, labels, keys = [], [], []
    split_dir = os.path.join(root, split)
    for name in names:
        if name not in class_to_index:
            raise ValueError(f"{split_dir} has a class folder {name!r} that train/ does not have; "
                             "the class folders of train/ and val/ must match")
        found = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(split_dir, name)):
            dirnames.sort()
            for fname in sorted(filenames):
                full = os.path.join(dirpath, fname)
                if not fname.lower().endswith(IMAGE_EXTENSIONS):
                    skipped.setdefault("non_image", []).append(full)
                    continue
                paths.append(full)
                labels.append(class_to_index[name])
                keys.append(os.path.relpath(full, root))
                found += 1
        if found == 0:
            skipped.setdefault("empty_class", []).append(os.path.join(split_dir, name))
    return LabeledSet(paths, np.asarray(labels, dtype=np.int64), keys)


def held_out_folder(data_dir: str) -> str | None:
    """The name of ``data_dir``'s held-out split folder: "val" or "test", whichever exists (None
    if neither). Both present is refused: which one is the test set would be a guess."""
    present = [name for name in HELD_OUT_NAMES if os.path.isdir(os.path.join(data_dir, name))]
    if len(present) > 1:
        raise ValueError(f"{data_dir} has both val/ and test/: the trainer takes one held-out folder as the test "
                         "set (its validation split is carved from train/); move or rename the other")
    return present[0] if present else None


def load_imagefolder(data_dir: str, image_size: int | None = None) -> DatasetSource:
    """The train/ and val/ (or test/) trees under ``data_dir``; val/ or test/ serves as the test set.

    Files without a JPEG/PNG extension, empty class folders and symlinked class folders that
    would repeat images under another label are left out with one warning each (and listed in
    ``source.skipped``); an empty class keeps its index so train and val labels agree.
    """
    train_dir = os.path.join(data_dir, "train")
    held_out = held_out_folder(data_dir)
    val_dir = os.path.join(data_dir, held_out or "val")
    if not (os.path.isdir(train_dir) and held_out is not None):
        raise FileNotFoundError(_LAYOUT_HINT.format(dir=data_dir) + "; train/ or val/ (test/) is missing")
    train_real, val_real = os.path.realpath(train_dir), os.path.realpath(val_dir)
    if _within(train_real, val_real) or _within(val_real, train_real):
        raise ValueError(f"{val_dir} and {train_dir} resolve to overlapping folders ({val_real}, "
                         f"{train_real}): the test images would be training images; give {held_out}/ its own images")
    root_real = os.path.realpath(data_dir)
    skipped: dict[str, list[str]] = {}
    train_folders = _class_folders(train_dir, root_real, skipped)
    classes = list(train_folders)
    if not classes:
        raise FileNotFoundError(_LAYOUT_HINT.format(dir=data_dir) + "; train/ has no class folders")
    val_classes = list(_class_folders(val_dir, root_real, skipped, other_split=train_folders))
    class_to_index = {c: i for i, c in enumerate(classes)}
    train = _scan(data_dir, "train", classes, class_to_index, skipped)
    test = _scan(data_dir, held_out, val_classes, class_to_index, skipped)
    if len(train) == 0:
        raise FileNotFoundError(_LAYOUT_HINT.format(dir=data_dir) + "; train/ holds no image files")
    if skipped.get("non_image"):
        files = skipped["non_image"]
        warnings.warn(f"skipped {len(files)} non-image files in {data_dir} (only "
                      f"{', '.join(IMAGE_EXTENSIONS)} are read), e.g. {files[0]}", stacklevel=2)
    if skipped.get("empty_class"):
        folders = skipped["empty_class"]
        warnings.warn(f"{len(folders)} class folders hold no images: {', '.join(folders[:5])}",
                      stacklevel=2)
    return DatasetSource(name="imagefolder", train=train, test=test, num_classes=len(classes),
                         classes=classes, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         image_size=image_size or 224, flip=True, skipped=skipped)


def quick_check(path: str) -> str | None:
    """Why ``path`` cannot be a whole JPEG/PNG image, or None when it looks fine.

    Reads the first and last bytes only (no decoding): catches non-images, empty files and
    truncated files, which is what stops a DALI pipeline (it cannot skip a bad sample).
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(max(0, size - 256))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if head.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no end-of-image marker)"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return None if b"IEND" in tail else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG file"
