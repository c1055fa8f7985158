"""The teacher-label store: the large teacher's top-k predictions for every image of a set,
written once by ``python -m mpl_fast.label`` and read by reduced MPL at every step.

Layout of a store folder:
  manifest.json  what the labels are (format, teacher checkpoint sha256, preprocessing, k,
                 number of images and classes, the data set's identity) and which image
                 index ranges are done;
  probs.f16      (num_images, k) float16: the k largest probabilities of each image, descending;
  classes.i16    (num_images, k) int16 class indices of those probabilities (classes.i32, int32,
                 when there are more than 32767 classes). int16 halves the index bytes of int32
                 and holds every class count in use (ImageNet 1000, ImageNet-21k 21841, JFT 18291).
Row i belongs to the image with index i in the labelled set (for the data sets of the trainer:
its index in the training set, the index the unlabeled streams draw).

Size: bytes per image = k * 2 (fp16 probabilities) + k * idx_bytes (2 for int16, 4 for int32);
k = 8 with int16 indices is 32 bytes an image, 3.2 GB for 100M images; k = 1000 (all of
ImageNet's classes) is 4000 bytes an image, 400 GB for 100M images.

Crash safety: rows are written in place (np.memmap opened r+); ``commit`` first flushes the
rows to disk (msync), then records the finished index ranges in the manifest by an atomic
replace (temp file, fsync, rename, fsync of the folder). A kill at any moment leaves a manifest
that lists only rows that are on disk; rows of unlisted ranges are recomputed on resume.

Reading: ``distributions(indices)`` puts the k stored probabilities of each image back in
their classes and spreads the probability mass not stored, 1 - sum(top k), evenly over the
classes not stored (clamped at 0 against fp16 round-off). Our choice (the paper does not say):
the stored values stay exactly what the teacher said (renormalising would inflate them), and
every class keeps a non-zero probability, so the reduced teacher's log-probabilities are finite.
With k = num_classes nothing is spread: the distribution is the stored one.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from mpl_fast.checkpoint import write_text_atomic

FORMAT = "mpl_fast.teacher_labels/1"
MANIFEST = "manifest.json"
PROBS_FILE = "probs.f16"
INT16_MAX_CLASSES = 32767


def index_dtype(num_classes: int) -> np.dtype:
    """int16 while every class index fits (num_classes <= 32767), else int32."""
    return np.dtype(np.int16) if num_classes <= INT16_MAX_CLASSES else np.dtype(np.int32)


def bytes_per_image(k: int, num_classes: int) -> int:
    """k * 2 bytes of fp16 probabilities + k * (2 or 4) bytes of class indices."""
    return k * 2 + k * index_dtype(num_classes).itemsize


def _classes_file(dtype: np.dtype) -> str:
    return "classes.i16" if dtype == np.int16 else "classes.i32"


class StoreError(ValueError):
    """A store that does not fit what it is used for; the message is one sentence."""


def merge_ranges(ranges) -> list[list[int]]:
    """Sorted, non-overlapping [start, stop) ranges covering the union of ``ranges``."""
    out: list[list[int]] = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        else:
            out.append([start, stop])
    return out


def missing_ranges(done, start: int, stop: int) -> list[list[int]]:
    """The parts of [start, stop) that ``done`` (merged ranges) does not cover."""
    out, pos = [], start
    for a, b in merge_ranges(done):
        if b <= pos or a >= stop:
            continue
        if a > pos:
            out.append([pos, a])
        pos = max(pos, b)
    if pos < stop:
        out.append([pos, stop])
    return out


def write_json_atomic(data: dict, path: str) -> None:
    """``data`` as JSON at ``path``, atomically (mpl_fast.checkpoint.write_text_atomic): a crash
    leaves the old file or the new one, never a mix."""
    write_text_atomic(path, json.dumps(data, indent=1), prefix=".manifest-")


class TeacherLabelStore:
    """One store folder (see the module docstring). ``create`` makes a new one; ``open`` an
    existing one, read-only (``writable=False``, the trainer's side) or to write (the labeller's)."""

    def __init__(self, folder: str, manifest: dict, writable: bool):
        self.folder, self.manifest, self.writable = folder, manifest, writable
        n, k = manifest["num_images"], manifest["k"]
        mode = "r+" if writable else "r"
        self.index_dtype = np.dtype(manifest["index_dtype"])
        self.probs = np.memmap(os.path.join(folder, PROBS_FILE), dtype=np.float16, mode=mode, shape=(n, k))
        self.classes = np.memmap(os.path.join(folder, _classes_file(self.index_dtype)), dtype=self.index_dtype,
                                 mode=mode, shape=(n, k))

    # ------------------------------------------------------------------ making and opening

    @classmethod
    def create(cls, folder: str, *, num_images: int, num_classes: int, k: int, teacher: dict,
               preprocessing: dict, dataset: dict, labelling: dict | None = None) -> "TeacherLabelStore":
        """A new, empty store (no range done): files sized for ``num_images`` rows of ``k``.

        ``teacher`` must hold the checkpoint's "sha256"; ``dataset`` identifies the labelled
        set (name, number of images, a hash of its ordered contents or file list);
        ``labelling``: settings that change the numbers (batch size, precision), checked on resume."""
        if num_images < 1:
            raise StoreError(f"a label store needs at least one image, got {num_images}")
        if not 1 <= k <= num_classes:
            raise StoreError(f"--top-k {k} must be between 1 and the teacher's {num_classes} classes")
        if "sha256" not in teacher:
            raise StoreError("the teacher's description must include its checkpoint's sha256")
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, MANIFEST)):
            raise StoreError(f"{folder} already holds a label store; open it to resume, or choose another --out")
        dtype = index_dtype(num_classes)
        for name, item in ((PROBS_FILE, np.dtype(np.float16)), (_classes_file(dtype), dtype)):
            with open(os.path.join(folder, name), "wb") as f:  # sparse, sized, zero rows
                f.truncate(num_images * k * item.itemsize)
        manifest = {
            "format": FORMAT, "num_images": int(num_images), "num_classes": int(num_classes), "k": int(k),
            "prob_dtype": "float16", "index_dtype": dtype.name,
            "bytes_per_image": bytes_per_image(k, num_classes),
            "teacher": teacher, "preprocessing": preprocessing, "dataset": dataset,
            "labelling": labelling or {}, "done": [], "complete": False,
        }
        write_json_atomic(manifest, os.path.join(folder, MANIFEST))
        return cls(folder, manifest, writable=True)

    @classmethod
    def open(cls, folder: str, *, writable: bool = False) -> "TeacherLabelStore":
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise StoreError(f"{folder} is not a teacher-label store (no {MANIFEST}); "
                             "make one with python -m mpl_fast.label")
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path} cannot be read as JSON ({exc}); the store is damaged: label again") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path} is not a {FORMAT} manifest (format "
                             f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
        n, k, c = manifest["num_images"], manifest["k"], manifest["num_classes"]
        if not 1 <= k <= c:
            raise StoreError(f"{path} says k = {k} for {c} classes: k must be between 1 and the number of "
                             "classes; the manifest is damaged, label again")
        dtype = np.dtype(manifest["index_dtype"])
        for name, item in ((PROBS_FILE, 2), (_classes_file(dtype), dtype.itemsize)):
            file = os.path.join(folder, name)
            want = n * k * item
            have = os.path.getsize(file) if os.path.exists(file) else None
            if have != want:
                raise StoreError(f"{file} has {have} bytes where the manifest's {n} images x k={k} need {want}; "
                                 "the store is damaged or incomplete: label again")
        return cls(folder, manifest, writable)

    # ------------------------------------------------------------------ what it is

    @property
    def num_images(self) -> int:
        return self.manifest["num_images"]

    @property
    def num_classes(self) -> int:
        return self.manifest["num_classes"]

    @property
    def k(self) -> int:
        return self.manifest["k"]

    @property
    def done(self) -> list[list[int]]:
        return self.manifest["done"]

    @property
    def complete(self) -> bool:
        return self.missing(0, self.num_images) == []

    def missing(self, start: int, stop: int) -> list[list[int]]:
        """The index ranges within [start, stop) not labelled yet."""
        return missing_ranges(self.done, start, stop)

    def check_compatible(self, *, num_classes: int | None = None, dataset: dict | None = None,
                         require_complete: bool = True) -> None:
        """Refuses, in one sentence, a store that does not belong to the run reading it:
        another class count, another data set, or labelling not finished."""
        where = self.folder
        if num_classes is not None and num_classes != self.num_classes:
            raise StoreError(f"the labels in {where} are over {self.num_classes} classes but this run's data set "
                             f"and networks have {num_classes}: the teacher was trained on another data set; "
                             "label this data set with a teacher of the same classes")
        if dataset is not None:
            mismatch = dataset_mismatch(self.manifest["dataset"], dataset)
            if mismatch:
                raise StoreError(f"the labels in {where} were made for another data set ({mismatch}); "
                                 "label this data set with python -m mpl_fast.label")
        if require_complete and not self.complete:
            todo = sum(b - a for a, b in self.missing(0, self.num_images))
            raise StoreError(f"the labels in {where} are incomplete ({todo} of {self.num_images} images not "
                             "labelled yet): run the same python -m mpl_fast.label command again to finish them")

    # ------------------------------------------------------------------ writing

    def write(self, start: int, probs: torch.Tensor | np.ndarray, classes: torch.Tensor | np.ndarray) -> None:
        """Rows start .. start+len(probs) get these top-k probabilities and class indices (in
        place; durable only after ``flush``)."""
        if not self.writable:
            raise StoreError(f"{self.folder} was opened read-only")
        probs, classes = _numpy(probs), _numpy(classes)
        stop = start + len(probs)
        fits = probs.shape == (stop - start, self.k) and classes.shape == probs.shape
        if not fits or not 0 <= start <= stop <= self.num_images:
            raise StoreError(f"rows {start}..{stop} of shape {probs.shape} do not fit a store of "
                             f"{self.num_images} images x k={self.k}")
        self.probs[start:stop] = probs.astype(np.float16)
        self.classes[start:stop] = classes.astype(self.index_dtype)

    def flush(self) -> None:
        """Rows written so far reach the disk (msync) before this returns."""
        self.probs.flush()
        self.classes.flush()

    def commit(self, ranges) -> None:
        """Flushes the rows, then records ``ranges`` ([start, stop) pairs) as done in the manifest
        (atomically): a range is never listed before its rows are on disk."""
        self.flush()
        done = merge_ranges(list(self.done) + [list(r) for r in ranges])
        manifest = dict(self.manifest, done=done)
        manifest["complete"] = missing_ranges(done, 0, self.num_images) == []
        write_json_atomic(manifest, os.path.join(self.folder, MANIFEST))
        self.manifest = manifest

    def reload_manifest(self) -> None:
        """Rereads the manifest (another process committed ranges)."""
        with open(os.path.join(self.folder, MANIFEST)) as f:
            self.manifest = json.load(f)

    # ------------------------------------------------------------------ reading

    def topk(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs float32 (B, k), classes int64 (B, k)) of the images ``indices``, on the CPU."""
        idx = _check_indices(indices, self.num_images)
        return (torch.from_numpy(np.asarray(self.probs[idx], dtype=np.float32)),
                torch.from_numpy(np.asarray(self.classes[idx], dtype=np.int64)))

    def distributions(self, indices, device: torch.device | str | None = None) -> torch.Tensor:
        """(B, num_classes) float32 distributions of the images ``indices`` (see the module
        docstring: stored top-k in place, the rest of the mass spread evenly over the other
        classes). On ``device`` (default: the device of ``indices`` when it is a tensor, else CPU)."""
        if device is None:
            device = indices.device if isinstance(indices, torch.Tensor) else "cpu"
        probs, classes = self.topk(indices)
        return spread_topk(probs, classes, self.num_classes).to(device)


def spread_topk(probs: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Full distributions from top-k (probs, classes): the mass 1 - sum(probs) (at least 0)
    spread evenly over the num_classes - k classes not given."""
    b, k = probs.shape
    rest = num_classes - k
    fill = (1.0 - probs.sum(1, keepdim=True)).clamp_(min=0.0) / rest if rest else torch.zeros(b, 1)
    out = fill.expand(b, num_classes).clone()
    return out.scatter_(1, classes, probs)


def dataset_mismatch(stored: dict, given: dict) -> str | None:
    """A short description of the first field where two data set identities differ, or None."""
    for key in ("name", "num_images", "sha256"):
        if key in stored and key in given and stored[key] != given[key]:
            if key == "sha256":
                return "the images or their order differ (content hash)"
            return f"{key} {stored[key]!r} there, {given[key]!r} here"
    return None


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _check_indices(indices, n: int) -> np.ndarray:
    idx = _numpy(indices).astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][0]
        raise StoreError(f"image index {bad} is outside the label store's 0..{n - 1}: the labels belong to "
                         "another (smaller) data set")
    return idx
