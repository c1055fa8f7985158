"""The unlabeled stream of a reduced-MPL run: the large teacher's stored distributions of the
images in each batch, fetched by the images' indices, next to the student's strong view."""

from __future__ import annotations

from mpl_fast.reduced.store import TeacherLabelStore


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
