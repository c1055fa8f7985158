"""The DALI pipeline for image files (ImageFolder): readers.file + decoders.image, decoded on
the GPU ("mixed") when the batches go to a CUDA device and on the CPU otherwise (device_id=None,
the same pipeline, as CI runs it). DALI does the weak view (random-resized-crop, flip);
the strong view is mpl_fast's batched RandAugment applied to the decoded uint8 batch as torch
tensors on the batch's device (not DALI's own rand_augment), so both loaders share one policy.

DALI cannot skip a sample it fails to decode (the pipeline dies), so files are checked before
the pipeline is built (header and end marker, no decoding: imagefolder.quick_check); a file
that still fails stops the run with a message pointing at --loader torch.

The training streams are resumable: their state is DALI's pipeline checkpoint plus the batch
count (which seeds the strong view), see DaliTrainBatches.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable

import numpy as np
import torch

from mpl_fast.data.bad_data import record_corrupt
from mpl_fast.data.imagefolder import quick_check
from mpl_fast.data.source import LabeledSet
from mpl_fast.data.torch_pipeline import _STREAM_IDS, LABELED, UNLABELED, _Finish, batch_seed, strong_generator
from mpl_fast.data.views import strong_view

EVAL_CROP_FRACTION = 0.875


def dali_unavailable_reason() -> str | None:
    """Why the DALI loader cannot run here, or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
        from nvidia.dali.plugin.pytorch import DALIGenericIterator  # noqa: F401
    except Exception as e:
        return (f"NVIDIA DALI is not importable ({type(e).__name__}: {e}); install the optional extra "
                "with `pip install nvidia-dali-cuda130` (or `pip install mpl_fast[dali]`)")
    return None


def find_bad_files(paths: list[str], stats: dict, strict: bool, threads: int = 16) -> set[str]:
    """The files among ``paths`` that quick_check rejects, each recorded once in ``stats``
    (or raised under ``strict``). Threads: the check is file I/O (two small reads a file)."""
    unique = sorted(set(paths))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        reasons = list(pool.map(quick_check, unique, chunksize=256))
    bad = set()
    for path, reason in zip(unique, reasons):
        if reason is not None:
            record_corrupt(stats, path, reason, strict=strict)
            bad.add(path)
    return bad


def _train_pipeline(files, labels, *, batch_size, image_size, flip, shard_id, num_shards,
                    reader_seed, seed, decode, device_id, num_threads, checkpoint=None,
                    checkpointing=True):
    from nvidia.dali import fn, pipeline_def, types

    # Checkpointing records the reader's position and every random op's state, so a pipeline
    # rebuilt from a checkpoint continues with the exact next batch.
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  enable_checkpointing=checkpointing)
    def weak_view():
        encoded, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id,
                                         num_shards=num_shards, shuffle_after_epoch=True,
                                         seed=reader_seed, name="reader")
        images = fn.decoders.image_random_crop(encoded, device=decode, output_type=types.RGB,
                                               random_area=[0.08, 1.0],
                                               random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10)
        images = fn.resize(images, size=[image_size, image_size], antialias=True)
        if flip:
            images = fn.flip(images, horizontal=fn.random.coin_flip())
        return fn.transpose(images, perm=[2, 0, 1]), label

    return weak_view(checkpoint=checkpoint)


def _eval_pipeline(files, labels, *, batch_size, image_size, decode, device_id, num_threads):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0)
    def eval_view():
        encoded, label = fn.readers.file(files=files, labels=labels, random_shuffle=False,
                                         pad_last_batch=True, name="reader")
        images = fn.decoders.image(encoded, device=decode, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=round(image_size / EVAL_CROP_FRACTION), antialias=True)
        images = fn.crop(images, crop=(image_size, image_size))
        return fn.transpose(images, perm=[2, 0, 1]), label

    return eval_view()


def _dali_failed(e: Exception) -> RuntimeError:
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    return RuntimeError(f"DALI stopped ({first}); it cannot skip an image it fails to decode: "
                        "remove the file or rerun with --loader torch, which skips and counts "
                        "corrupt images")


def _batches(iterator):
    """(uint8 images, int64 labels) from a DALIGenericIterator, with DALI's int32 (N, 1)
    labels flattened, and DALI failures turned into one clear error."""
    while True:
        try:
            out = next(iterator)[0]
        except StopIteration:
            return
        except Exception as e:
            raise _dali_failed(e) from None
        yield out["images"], out["labels"].reshape(-1).long()


class DaliTrainBatches:
    """Endless (batch number, uint8 images, int64 labels) from a training pipeline that can
    save its position: state_dict() holds the batches handed out and DALI's checkpoint of the
    pipeline (reader position, random ops' states), so load_state_dict() makes the next batch
    the one an uninterrupted stream would give. The pipeline is built at the first ``next``.

    Under data parallel the trainer saves every rank's state and each rank loads its own. DALI's
    checkpoint holds the shard, so a state saved by another rank or number of ranks makes the
    stream skip ahead instead: it runs its pipeline from the start and drops ``consumed``
    batches (exact, as the pipeline is seeded, but it decodes them); ``skipped_ahead`` counts
    the batches so dropped."""

    def __init__(self, build_pipeline: Callable[[bytes | str | None], object], *, rank: int, world_size: int):
        self._build, self._where = build_pipeline, (rank, world_size)
        self.consumed, self._checkpoint, self._batches, self._iterator = 0, None, None, None
        self.skipped_ahead = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._start()
        images, labels = next(self._batches)
        self.consumed += 1
        return self.consumed - 1, images, labels

    def _start(self) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        try:  # the iterator runs the pipeline's first batches already
            self._iterator = DALIGenericIterator(self._build(self._checkpoint), ["images", "labels"])
        except Exception as e:
            raise _dali_failed(e) from None
        self._batches = _batches(self._iterator)  # no reader_name: endless
        if self._checkpoint is None:
            for _ in range(self.consumed):  # skip-ahead (see the class docstring)
                next(self._batches)
                self.skipped_ahead += 1

    def state_dict(self) -> dict:
        # The iterator's checkpoint accounts for the batches DALI has prefetched but not handed out.
        checkpoint = self._iterator.checkpoints()[0] if self._iterator is not None else self._checkpoint
        return {"consumed": self.consumed, "dali_checkpoint": checkpoint,
                "rank": self._where[0], "world_size": self._where[1]}

    def load_state_dict(self, state: dict) -> None:
        same_shard = (state.get("rank"), state.get("world_size")) == self._where
        self.consumed = int(state["consumed"])
        self._checkpoint = state.get("dali_checkpoint") if same_shard else None
        self._batches = self._iterator = None


class ResumableStream:
    """A DaliTrainBatches turned into finished batches by ``finish(number, images, labels)``,
    with the batches' state_dict/load_state_dict passed through (what the trainer checks)."""

    def __init__(self, batches: DaliTrainBatches, finish_batch):
        self._source, self._finish = batches, finish_batch

    def __iter__(self):
        return self

    def __next__(self):
        return self._finish(*next(self._source))

    def state_dict(self) -> dict:
        return self._source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._source.load_state_dict(state)


class DaliEvalBatches:
    """A finite, re-iterable evaluation set read by a DALI pipeline: normalised (x, y)."""

    def __init__(self, files, labels, *, finish: _Finish, batch_size, image_size, decode,
                 device_id, num_threads):
        self.num_samples = len(files)
        self.finish = finish
        self.batch_size = batch_size
        self.iterator = None
        self.unfinished = False
        if files:
            from nvidia.dali.plugin.base_iterator import LastBatchPolicy
            from nvidia.dali.plugin.pytorch import DALIGenericIterator

            pipe = _eval_pipeline(files, labels, batch_size=batch_size, image_size=image_size,
                                  decode=decode, device_id=device_id, num_threads=num_threads)
            self.iterator = DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader",
                                                last_batch_policy=LastBatchPolicy.PARTIAL,
                                                auto_reset=True)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self):
        if self.iterator is None:
            return
        if self.unfinished:  # DALI cannot reset mid-epoch: finish the abandoned pass first
            for _ in _batches(self.iterator):
                pass
        self.unfinished = True
        for images, labels in _batches(self.iterator):
            yield self.finish.normalize(images.to(self.finish.device)), labels.to(self.finish.device)
        self.unfinished = False


def build_dali_streams(data: LabeledSet, test: LabeledSet, split: dict, *, cfg, source, seed: int,
                       rank: int, world_size: int, device, stats: dict, image_size: int,
                       with_indices: bool = False, unlabeled_set: LabeledSet | None = None):
    """(labeled, unlabeled, val, test) streams through DALI pipelines; ``with_indices``: the
    unlabeled stream yields (weak, strong, index). ``unlabeled_set``: the unlabeled stream reads
    this set (``split["unlabeled"]`` indexes it) instead of ``data``.

    The unlabeled reader's "label" of each file is the file's index in its set (the labels of
    unlabeled images are never read): it travels with the file through DALI's shuffling,
    sharding and checkpoints, so each image's index comes out next to it, and a resumed stream
    gives the same indices as an uninterrupted one."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    device_id = (device.index or 0) if on_gpu else None
    decode = "mixed" if on_gpu else "cpu"
    threads = max(1, cfg.num_workers)
    strong = dict(num_ops=cfg.randaug_num_ops, magnitude=cfg.randaug_magnitude,
                  policy=cfg.randaug_policy, cutout=cfg.cutout)
    finish = _Finish(device=device, mean=source.mean, std=source.std, strong=strong, stats=stats,
                     strict=cfg.strict)
    pool = data if unlabeled_set is None else unlabeled_set

    used = np.unique(np.concatenate([split["labeled"], split["val"]]))
    bad = find_bad_files([data.images[i] for i in used] + [pool.images[i] for i in np.unique(split["unlabeled"])]
                         + list(test.images), stats, cfg.strict)

    def subset(labeled_set, indices):
        keep = [int(i) for i in indices if labeled_set.images[i] not in bad]
        return [labeled_set.images[i] for i in keep], [int(labeled_set.labels[i]) for i in keep], keep

    def train(view, indices, batch_size, images=data):
        files, labels, keep = subset(images, indices)
        if view == UNLABELED:
            labels = keep  # each file's index in its set (see the docstring)
        if len(files) < world_size:
            raise ValueError(f"the {view} set has {len(files)} readable images, fewer than the "
                             f"{world_size} ranks")
        # Shuffle once with the shared seed: DALI's shuffle_after_epoch leaves epoch 0 in order.
        order = np.random.default_rng([seed, _STREAM_IDS[view]]).permutation(len(files))
        build = partial(_train_pipeline, [files[i] for i in order], [labels[i] for i in order],
                        batch_size=batch_size, image_size=image_size, flip=source.flip,
                        shard_id=rank, num_shards=world_size,
                        reader_seed=batch_seed(seed, _STREAM_IDS[view]) % 2**31,
                        seed=batch_seed(seed, _STREAM_IDS[view], rank) % 2**31,
                        decode=decode, device_id=device_id, num_threads=threads)
        return DaliTrainBatches(lambda checkpoint: build(checkpoint=checkpoint), rank=rank,
                                world_size=world_size)

    def labeled_batch(number, images, labels):
        return finish.normalize(images.to(device)), labels.to(device)

    def unlabeled_batch(number, images, indices):
        # Seeded by the batch number, which a resumed stream continues from.
        weak = images.to(device)
        g = strong_generator(batch_seed(seed, _STREAM_IDS[UNLABELED], rank, number))
        views = finish.normalize(weak), finish.normalize(strong_view(weak, generator=g, **strong))
        return (*views, indices.to(device)) if with_indices else views

    def evaluation(labeled_set, indices):
        files, labels, _ = subset(labeled_set, indices)
        return DaliEvalBatches(files, labels, finish=finish, batch_size=cfg.eval_batch_size,
                               image_size=image_size, decode=decode, device_id=device_id,
                               num_threads=threads)

    labeled = ResumableStream(train(LABELED, split["labeled"], cfg.batch_size), labeled_batch)
    unlabeled = ResumableStream(train(UNLABELED, split["unlabeled"], cfg.mu * cfg.batch_size, pool),
                                unlabeled_batch)
    return labeled, unlabeled, evaluation(data, split["val"]), evaluation(test, np.arange(len(test)))
