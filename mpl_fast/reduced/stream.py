"""The unlabeled stream of a reduced-MPL run: the large teacher's stored distributions of the
images in each batch, fetched by the images' indices, next to the student's strong view; and
the check that a store covers the images that stream draws."""

from __future__ import annotations

from mpl_fast.data.config import DataConfig
from mpl_fast.reduced.images import UNLABELED_FOLDER, images_to_label
from mpl_fast.reduced.store import StoreError, TeacherLabelStore, dataset_mismatch


def open_store_for_run(labels: str, data: DataConfig, num_classes: int) -> TeacherLabelStore:
    """The store ``labels`` (read-only), after checking that it holds the labels of the images
    this run's unlabeled stream draws: the images of ``data.unlabeled_dir`` when given (the
    paper's separate unlabeled set), else the training set; over ``num_classes`` classes; and
    finished. Every refusal is one sentence (a StoreError) naming the flag at fault."""
    store = TeacherLabelStore.open(labels)
    stored, folder = store.manifest["dataset"], data.unlabeled_dir
    of_folder = stored.get("name") == UNLABELED_FOLDER
    if folder and data.dataset != "imagefolder":
        raise StoreError(f"--data.unlabeled-dir holds image files, and the run's data set {data.dataset!r} is not an "
                         "image folder: use --data.dataset imagefolder or leave --data.unlabeled-dir out")
    if folder and not of_folder:
        raise StoreError(f"--reduced.labels {labels} holds labels of the training set ({stored.get('name')}), but "
                         f"with --data.unlabeled-dir {folder} the unlabeled images are that folder's: label it with "
                         f"python -m mpl_fast.label --unlabeled-dir {folder}, or leave --data.unlabeled-dir out")
    if of_folder and not folder:
        raise StoreError(f"--reduced.labels {labels} holds labels of a separate unlabeled folder "
                         f"({stored.get('num_images')} images), but without --data.unlabeled-dir the unlabeled "
                         "images are the training set's: pass the labelled folder as --data.unlabeled-dir")
    identity = images_to_label(data, unlabeled_dir=folder).identity
    if folder:
        mismatch = dataset_mismatch(stored, identity)
        if mismatch:
            raise StoreError(f"--reduced.labels {labels} was labelled from another folder than --data.unlabeled-dir "
                             f"{folder} ({mismatch}): label this folder with python -m mpl_fast.label "
                             f"--unlabeled-dir {folder}")
    try:
        store.check_compatible(num_classes=num_classes, dataset=identity)
    except StoreError as exc:
        raise StoreError(f"--reduced.labels: {exc}") from None
    return store


class StoredTeacherInputs:
    """Wraps an unlabeled stream of (weak, strong, index) batches into one of (p, strong):
    p (B, num_classes) = ``store.distributions(index)`` on the strong view's device. The
    weak view is dropped (no teacher forward over images, no UDA); the wrapped stream's
    state_dict/load_state_dict pass through, so resumption stays what the stream makes it."""

    def __init__(self, stream, store: TeacherLabelStore):
        self.stream, self.store = stream, store

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.stream)
        if len(batch) != 3:
            raise ValueError("the unlabeled stream yields no image indices (weak, strong) instead of (weak, "
                             "strong, index): build the streams with image indices for reduced MPL")
        _, strong, index = batch
        return self.store.distributions(index, device=strong.device), strong

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
