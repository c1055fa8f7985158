"""Offline labelling: the large teacher T run once over a data set's training images, its
top-k predictions written to a TeacherLabelStore (mpl_fast.reduced.store).

    python -m mpl_fast.label --teacher RUN_DIR_or_CKPT --out LABELS_DIR [--data-dir DIR]
        [--unlabeled-dir DIR] [--top-k K] [--batch-size N] [--amp] [--device cpu|cuda] [--network auto]
    torchrun --nproc_per_node=N -m mpl_fast.label ...   (ranks split the images)

Deterministic: the teacher in eval mode, the eval preprocessing only, batches cut at the
multiples of --batch-size from image 0 whatever the rank or resume point (images.batch_grid),
so one process, N ranks and a resumed run compute the very same batches.

Ranks: the batches are split into contiguous, disjoint runs of batches, one per rank. Every
--commit-every batches all ranks flush their rows and rank 0 records the finished ranges in
the manifest (one gather per round: the manifest has one writer, and rank 0 writes only after
every rank's rows are on disk).

Resumable: the same command again labels only the ranges the manifest does not list; a store
made by another teacher checkpoint, data set, k, preprocessing, batch size or precision is
refused with a sentence saying which.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist

from mpl_fast.reduced.images import ImagesToLabel, batch_grid, images_to_label
from mpl_fast.reduced.run_folder import NETWORKS, RunFolderError, TrainedRun, load_network, read_run, sha256_of_file
from mpl_fast.reduced.store import MANIFEST, StoreError, TeacherLabelStore

DEFAULT_TOP_K = 8  # 32 bytes an image with int16 indices: 3.2 GB for 100M images


class LabelError(ValueError):
    """Bad input to the labeller; the message is one sentence."""


def build_teacher(run: TrainedRun, images: ImagesToLabel, network: str, device: str) -> tuple[torch.nn.Module, str]:
    """The run's network for ``images`` (eval mode, on ``device``) and what it is."""
    from mpl_fast.models import create_model  # noqa: PLC0415

    shape = images.input_shape
    in_channels = shape[0] if len(shape) == 3 else 1
    try:
        model = create_model(run.model_name, images.num_classes, dropout=run.dropout, in_channels=in_channels)
    except ValueError as exc:
        raise LabelError(f"the run in {run.checkpoint_path} names a model this mpl_fast cannot build: {exc}") from None
    what = load_network(run, model, network)
    return model.to(device).eval(), what


def shard_batches(num_images: int, batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) image range of ``rank``: a contiguous run of whole batches of the grid."""
    num_batches = -(-num_images // batch_size)
    first = num_batches * rank // world_size
    last = num_batches * (rank + 1) // world_size
    return min(first * batch_size, num_images), min(last * batch_size, num_images)


def chunks(ranges, batch_size: int, commit_every: int) -> list[list[tuple[int, int]]]:
    """The batches of ``ranges`` grouped by up to ``commit_every``: one commit per group."""
    out: list[list[tuple[int, int]]] = []
    for a, b in ranges:
        group: list[tuple[int, int]] = []
        for batch in batch_grid(a, b, batch_size):
            group.append(batch)
            if len(group) == commit_every:
                out.append(group)
                group = []
        if group:
            out.append(group)
    return out


@torch.no_grad()
def teacher_topk(model: torch.nn.Module, x: torch.Tensor, k: int, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k probabilities fp32, their class indices) of softmax(T(x)), descending."""
    with autocast():
        logits = model(x)
    probs = torch.softmax(logits.float(), dim=1)
    return probs.topk(k, dim=1, sorted=True)


def label(teacher: str, out: str, *, data_dir: str | None = None, unlabeled_dir: str | None = None,
          top_k: int | None = None, batch_size: int = 256, amp: bool = False, device: str = "cpu",
          network: str = "auto", commit_every: int = 20, workers: int = 4, progress: bool = True,
          rank: int = 0, world_size: int = 1,
          after_commit: Callable[[int], None] | None = None) -> dict:
    """Labels the training images of the run ``teacher`` into the store ``out`` (see the module
    docstring); returns the manifest. Under torchrun every rank calls this with its rank.
    ``workers``: DataLoader worker processes decoding image files (in-memory sets load in place).
    ``after_commit(n)`` is called after each of this process's commits (tests stop runs there)."""
    if batch_size < 1 or commit_every < 1 or workers < 0:
        raise LabelError(f"--batch-size and --commit-every must be >= 1 and --workers >= 0, got {batch_size}, "
                         f"{commit_every} and {workers}")
    try:
        run = read_run(teacher)
        images = images_to_label(run.data, data_dir, unlabeled_dir)
    except (RunFolderError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise LabelError(str(exc)) from None
    k = min(DEFAULT_TOP_K, images.num_classes) if top_k is None else images.num_classes if top_k == 0 else top_k
    if not 1 <= k <= images.num_classes:
        raise LabelError(f"--top-k {top_k} must be between 1 and the data set's {images.num_classes} classes")
    try:
        model, what = build_teacher(run, images, network, device)
    except RunFolderError as exc:
        raise LabelError(str(exc)) from None
    precision = _amp_dtype(amp, device)
    expect = {
        "teacher": {"sha256": sha256_of_file(run.checkpoint_path), "path": os.path.abspath(run.checkpoint_path),
                    "model": run.model_name, "network": what},
        "preprocessing": images.preprocessing, "dataset": images.identity,
        "labelling": {"batch_size": batch_size, "amp": precision and str(precision).replace("torch.", "")},
    }
    store = _open_or_create(out, images, k, expect, rank, world_size)
    start, stop = shard_batches(images.num_images, batch_size, rank, world_size)
    todo = chunks(store.missing(start, stop), batch_size, commit_every)
    rounds = _max_over_ranks(len(todo), world_size)
    autocast = ((lambda: torch.autocast(torch.device(device).type, dtype=precision)) if precision
                else contextlib.nullcontext)
    bar = _progress_bar(progress and rank == 0, images.num_images, store)
    corrupt: list[int] = []
    loaded = _loaded_batches(images, [batch for group in todo for batch in group], workers)
    for n in range(rounds):
        done = None
        if n < len(todo):  # this rank's n-th group of batches (ranks with fewer just join the gather)
            for a, _end in todo[n]:
                x, bad = next(loaded)
                corrupt += _label_batch(store, model, x.to(device), a, bad, k, autocast, run.checkpoint_path)
            done = [todo[n][0][0], todo[n][-1][1]]
            store.flush()
        finished = _gather(done, world_size)
        if rank == 0:
            store.commit(finished)
            if bar is not None:
                bar.update(sum(b - a for a, b in finished))
        if after_commit is not None:
            after_commit(n + 1)
    if bar is not None:
        bar.close()
    if world_size > 1:
        dist.barrier()
    if corrupt:
        print(f"warning: {len(corrupt)} images did not decode and got a uniform distribution "
              f"(first: index {corrupt[0]})", file=sys.stderr)
    store.reload_manifest()
    return store.manifest


def _label_batch(store: TeacherLabelStore, model, x: torch.Tensor, start: int, bad: list[int], k: int, autocast,
                 checkpoint: str) -> list[int]:
    """T's top k of images start..start+len(x) into the store's rows; returns the corrupt ones."""
    probs, classes = teacher_topk(model, x, k, autocast)
    if not torch.isfinite(probs).all():
        raise LabelError(f"the teacher's outputs for images {start}..{start + len(x) - 1} are not finite: the "
                         f"checkpoint {checkpoint} holds damaged weights")
    if bad:  # no prediction for a file that does not decode: a uniform distribution
        probs[bad] = 1.0 / store.num_classes
        classes[bad] = torch.arange(k, device=classes.device)
    store.write(start, probs, classes)
    return [start + i for i in bad]


class _Batches(torch.utils.data.Dataset):
    """Item (a, b) = the loaded images a..b-1: one DataLoader item per batch."""

    def __init__(self, load):
        self.load = load

    def __getitem__(self, item):
        return self.load(*item)


def _loaded_batches(images: ImagesToLabel, batches: list[tuple[int, int]], workers: int):
    """(x, corrupt) of ``batches`` in order; image files decoded by ``workers`` DataLoader
    processes, at most one per CPU this process may use (the order is kept: the DataLoader
    yields items in sampler order)."""
    if not images.decodes_files or workers == 0 or not batches:
        return (images.load(a, b) for a, b in batches)
    workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(_Batches(images.load), batch_size=None, sampler=batches,
                                         num_workers=workers, prefetch_factor=2)
    return iter(loader)


def _amp_dtype(amp: bool, device: str):
    if not amp:
        return None
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16  # softmax and top-k stay fp32 (teacher_topk); no gradients to scale
    return torch.bfloat16


def _open_or_create(out: str, images: ImagesToLabel, k: int, expect: dict, rank: int,
                    world_size: int) -> TeacherLabelStore:
    """Rank 0 creates the store (or checks the one there fits); then every rank opens it to write."""
    error = None
    if rank == 0:
        try:
            if os.path.exists(os.path.join(out, MANIFEST)):
                _check_resume(TeacherLabelStore.open(out), images, k, expect)
            else:
                TeacherLabelStore.create(out, num_images=images.num_images, num_classes=images.num_classes, k=k,
                                         teacher=expect["teacher"], preprocessing=expect["preprocessing"],
                                         dataset=expect["dataset"], labelling=expect["labelling"])
        except (StoreError, OSError) as exc:
            error = str(exc)
    if world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise LabelError(error)
    return TeacherLabelStore.open(out, writable=True)


def _check_resume(store: TeacherLabelStore, images: ImagesToLabel, k: int, expect: dict) -> None:
    """Refuses to add rows to a store made differently (each rule one sentence)."""
    m, where = store.manifest, store.folder
    if store.num_classes != images.num_classes:
        raise StoreError(f"{where} holds labels over {store.num_classes} classes and this data set has "
                         f"{images.num_classes}: choose another --out")
    if m["dataset"] != expect["dataset"]:
        raise StoreError(f"{where} holds labels of another data set ({m['dataset'].get('name')}, "
                         f"{m['dataset'].get('num_images')} images, or other images): choose another --out")
    if m["teacher"]["sha256"] != expect["teacher"]["sha256"]:
        raise StoreError(f"{where} was labelled by another teacher checkpoint (sha256 "
                         f"{m['teacher']['sha256'][:12]}..., this one {expect['teacher']['sha256'][:12]}...): "
                         "choose another --out")
    if store.k != k:
        raise StoreError(f"{where} stores the top {store.k} classes, not {k}: resume with --top-k {store.k}")
    if m["teacher"].get("network") != expect["teacher"]["network"]:
        raise StoreError(f"{where} holds labels of the {m['teacher'].get('network')} weights, not the "
                         f"{expect['teacher']['network']}: pass the same --network as before")
    if m["preprocessing"] != expect["preprocessing"]:
        raise StoreError(f"{where} was labelled with another preprocessing ({m['preprocessing'].get('description')}, "
                         f"image size {m['preprocessing'].get('image_size')}): choose another --out")
    for key, flag in (("batch_size", "--batch-size"), ("amp", "--amp")):
        if m["labelling"].get(key) != expect["labelling"][key]:
            raise StoreError(f"{where} was started with {flag} {m['labelling'].get(key)}, not "
                             f"{expect['labelling'][key]}: resume with the same {flag} (labels of a store "
                             "come from one setting, so a resumed store equals an uninterrupted one)")


def _max_over_ranks(n: int, world_size: int) -> int:
    if world_size == 1:
        return n
    t = torch.tensor([n])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def _gather(done, world_size: int) -> list:
    if world_size == 1:
        return [done] if done else []
    box = [None] * world_size
    dist.all_gather_object(box, done)
    return [r for r in box if r]


def _progress_bar(show: bool, total: int, store: TeacherLabelStore):
    if not show:
        return None
    from tqdm import tqdm  # noqa: PLC0415

    already = total - sum(b - a for a, b in store.missing(0, total))
    return tqdm(total=total, initial=already, desc="labelling", unit="img", dynamic_ncols=True, disable=None)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpl_fast.label",
                                description="Run a trained teacher once over a data set's training images and "
                                            "store its top-k predictions for reduced Meta Pseudo Labels.")
    p.add_argument("--teacher", required=True, help="a trainer run folder (config.json + checkpoint.pt) or its "
                                                    "checkpoint.pt")
    p.add_argument("--out", required=True, help="the label store's folder (created; the same folder resumes)")
    p.add_argument("--data-dir", "--data", dest="data_dir", default=None,
                   help="the data set's folder, when it moved since training (default: the run's)")
    p.add_argument("--unlabeled-dir", default=None,
                   help="label separate unlabeled images instead of the training set: every JPEG/PNG under this "
                        "folder (sorted walk order) or the files a list names, one a line; give the trainer the "
                        "same path as --data.unlabeled-dir")
    p.add_argument("--top-k", type=int, default=None,
                   help=f"probabilities kept per image (default: {DEFAULT_TOP_K}, or all classes when fewer; 0: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", action="store_true", help="the teacher's forward in bf16 (fp16 on GPUs without bf16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when visible; under torchrun "
                                                  "cuda:LOCAL_RANK)")
    p.add_argument("--network", default="auto", choices=NETWORKS,
                   help="which weights of the run: auto = the best-validation weights when kept, else the "
                        "model the trainer selects (the teacher for --method uda, else the EMA or the student)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding image files")
    p.add_argument("--commit-every", type=int, default=20, help="batches between manifest updates")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mpl_fast.parallel.distributed import init_from_env, shutdown  # noqa: PLC0415

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ctx = init_from_env(device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        manifest = label(args.teacher, args.out, data_dir=args.data_dir, unlabeled_dir=args.unlabeled_dir,
                         top_k=args.top_k, batch_size=args.batch_size, amp=args.amp, device=str(ctx.device),
                         network=args.network, commit_every=args.commit_every, workers=args.workers,
                         progress=not args.no_progress, rank=ctx.rank, world_size=ctx.world_size)
    except LabelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    if ctx.rank == 0:
        n, bpi = manifest["num_images"], manifest["bytes_per_image"]
        print(f"labelled {n} images with the top {manifest['k']} of {manifest['num_classes']} classes "
              f"({bpi} bytes an image, {n * bpi / 1e6:.1f} MB) into {args.out}")
    return 0
