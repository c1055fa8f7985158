"""--data.in-memory: an ImageFolder of small images (CIFAR-10 stored as JPEG files, say) decoded
once into a uint8 array, so that it trains like CIFAR's own arrays: the small-image views
(pad-and-crop, the official strong view's recrop), the test images as they are (no resize and
centre crop), and no decoding per step.

Every image must decode and have the same square size; a file that does not is refused by name
(the file pipeline, without the flag, skips corrupt files instead). The whole data set must fit
in ``MAX_BYTES``."""

from __future__ import annotations

import dataclasses

import numpy as np

from mpl_fast.data.source import DatasetSource, LabeledSet

MAX_BYTES = 8 << 30  # past this, the file pipeline (which decodes per batch) is the right tool


def decode_into_memory(source: DatasetSource, image_size: int | None = None) -> DatasetSource:
    """``source`` (files) with its train and test sets decoded into (N, S, S, 3) uint8 arrays."""
    from mpl_fast.data.torch_pipeline import decode_file  # noqa: PLC0415 - torchvision is slow to import

    if not source.train.is_files:
        return source
    if source.extra_unlabeled is not None:
        raise ValueError("--data.in-memory decodes one ImageFolder; this data set has a separate unlabeled "
                         "source: drop --data.in-memory")
    first = decode_file(source.train.images[0]) if len(source.train) else None
    size = int(first.shape[-1]) if first is not None else 0
    if image_size is not None and image_size != size:
        raise ValueError(f"--data.in-memory keeps the images at their own size ({size}x{size}, e.g. "
                         f"{source.train.images[0]}); drop --data.image-size {image_size} or set it to {size}")
    total = (len(source.train) + len(source.test)) * 3 * size * size
    if total > MAX_BYTES:
        raise ValueError(f"--data.in-memory would hold {total / 2**30:.1f} GiB of decoded images (limit "
                         f"{MAX_BYTES / 2**30:.0f} GiB): drop the flag and let the file pipeline decode per batch")

    def decode_all(labeled: LabeledSet) -> LabeledSet:
        images = np.empty((len(labeled), size, size, 3), dtype=np.uint8)
        for i, path in enumerate(labeled.images):
            try:
                image = decode_file(path)
            except Exception as e:  # any decoder failure: name the file, say what to do
                raise ValueError(f"--data.in-memory cannot decode {path} ({type(e).__name__}); remove the file, "
                                 "or train without --data.in-memory (the file pipeline skips corrupt files)") from None
            if tuple(image.shape[1:]) != (size, size):
                raise ValueError(f"--data.in-memory needs every image to be {size}x{size} like "
                                 f"{labeled.images[0]}, but {path} is {image.shape[2]}x{image.shape[1]}: "
                                 "resize the data set, or train without --data.in-memory")
            images[i] = image.permute(1, 2, 0).numpy()
        return LabeledSet(images=images, labels=labeled.labels, keys=labeled.keys)

    return dataclasses.replace(source, train=decode_all(source.train), test=decode_all(source.test), image_size=size)
