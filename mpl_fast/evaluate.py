"""Accuracy of a trained network on labelled images:
``python -m mpl_fast.evaluate RUN_DIR [--data-dir DIR] [--model selected]``.

``--data-dir DIR``: an ImageFolder-style folder, DIR/<class>/<image> (JPEG/PNG, searched
recursively). Class folders named by integers are those class indices (a subset of the classes
is fine); otherwise the sorted folder names are classes 0..K-1, as the trainer numbers them, and
there must be as many as the network has. Without ``--data-dir`` the run's own test split is
used (the embedded data sets always; file data sets while their --data-dir still exists).

Prints top-1 and top-5 accuracy and the confusion matrix (rows: true class, columns:
predicted); ``--json FILE`` also writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from mpl_fast import runs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def folder_samples(data_dir: str, num_classes: int) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels, class names by index) of an ImageFolder-style folder."""
    if not os.path.isdir(data_dir):
        raise runs.RunError(f"--data-dir {data_dir} is not a folder")
    folders = sorted(e.name for e in os.scandir(data_dir) if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise runs.RunError(f"--data-dir {data_dir} has no class folders: expected DIR/<class>/<image>")
    if all(name.isdigit() for name in folders):
        index = {name: int(name) for name in folders}
        if max(index.values()) >= num_classes:
            raise runs.RunError(f"--data-dir {data_dir} has a class folder {max(index.values())}, but the network "
                                f"has classes 0..{num_classes - 1}")
        names = [str(i) for i in range(num_classes)]
    else:
        if len(folders) != num_classes:
            hint = (" (an ImageNet-layout folder: give its val/ or test/ sub-folder)"
                    if "train" in folders and {"val", "test"} & set(folders) else "")
            raise runs.RunError(f"--data-dir {data_dir} has {len(folders)} class folders and the network "
                                f"{num_classes} classes: with named folders, every class needs its folder "
                                f"(sorted names are the class indices){hint}")
        index = {name: i for i, name in enumerate(folders)}
        names = folders
    paths, labels = [], []
    for name in folders:
        for dirpath, dirnames, filenames in os.walk(os.path.join(data_dir, name)):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, fname))
                    labels.append(index[name])
    if not paths:
        raise runs.RunError(f"--data-dir {data_dir} holds no JPEG or PNG images under its class folders")
    return paths, labels, names


def folder_batches(paths: list[str], labels: list[int], preprocess: runs.Preprocess, batch_size: int,
                   unreadable: list):
    """(input, label) batches of the files; files that do not decode go to ``unreadable``."""
    for start in range(0, len(paths), batch_size):
        images, ys = [], []
        for path, y in zip(paths[start:start + batch_size], labels[start:start + batch_size]):
            try:
                images.append(preprocess.from_uint8(runs.load_image(path).unsqueeze(0)))
            except (RuntimeError, OSError, ValueError) as exc:  # a corrupt or unreadable file: counted, not fatal
                unreadable.append((path, f"{type(exc).__name__}: {str(exc).strip()[:120]}"))
                continue
            ys.append(y)
        if ys:
            yield torch.cat(images), torch.tensor(ys, dtype=torch.int64)


def own_test_batches(cfg, device: str):
    """The run's own test split, as the trainer evaluated it."""
    import copy  # noqa: PLC0415

    from mpl_fast.data import build_streams  # noqa: PLC0415

    data = copy.deepcopy(cfg.data)
    data.loader, data.num_workers = "torch", 0
    try:
        return build_streams(data, seed=cfg.seed, device=device).test
    except (FileNotFoundError, NotADirectoryError, ValueError, ModuleNotFoundError) as exc:
        raise runs.RunError(f"the run's own test split of {cfg.data.dataset} cannot be read ({exc}); "
                            f"give a labelled folder with --data-dir") from None


@torch.no_grad()
def measure(network: torch.nn.Module, batches, num_classes: int, device: str = "cpu") -> dict:
    """Top-1/top-5 accuracy (percent) and the confusion matrix over (input, label) batches."""
    k = min(5, num_classes)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    topk_hits = total = 0
    for x, y in batches:
        logits = network(x.to(device)).float().cpu()
        y = y.cpu()
        pred = logits.argmax(1)
        confusion += torch.bincount(y * num_classes + pred, minlength=num_classes ** 2).view(num_classes, -1)
        topk_hits += int((logits.topk(k, dim=1).indices == y[:, None]).any(1).sum())
        total += len(y)
    if total == 0:
        raise runs.RunError("no images to evaluate")
    return {"images": total, "top1": 100.0 * int(confusion.diag().sum()) / total,
            f"top{k}": 100.0 * topk_hits / total, "confusion": confusion.tolist()}


def format_confusion(confusion: list[list[int]], names: list[str]) -> str:
    short = [n[:8] for n in names]
    width = max([len(s) for s in short] + [len(str(max(max(r) for r in confusion)))]) + 1
    head = " " * width + "".join(f"{s:>{width}}" for s in short)
    rows = [f"{s:>{width}}" + "".join(f"{v:>{width}}" for v in row) for s, row in zip(short, confusion)]
    return "true \\ predicted\n" + "\n".join([head] + rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mpl_fast.evaluate",
                                description="Top-1/top-5 accuracy and confusion matrix of a trained network.")
    p.add_argument("run_dir", help="the training run's folder (its --output-dir)")
    p.add_argument("--data-dir", default=None,
                   help="labelled images as DIR/<class>/<image>; default: the run's own test split")
    p.add_argument("--model", default=runs.DEFAULT_MODEL, choices=runs.MODEL_CHOICES,
                   help="which network of the run (default: selected)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results to FILE")
    return p


def evaluate(run_dir: str, data_dir: str | None = None, model: str = runs.DEFAULT_MODEL,
             batch_size: int = 256, device: str = "cpu") -> dict:
    """The measurements ``main`` prints (plus ``classes`` and ``unreadable``)."""
    opened = runs.open_network(run_dir, model, device)
    num_classes = opened.spec.num_classes
    unreadable: list = []
    if data_dir is None:
        batches, names = own_test_batches(opened.config, device), [str(i) for i in range(num_classes)]
        source = f"the run's {opened.config.data.dataset} test split"
    else:
        if opened.preprocess.size is None:
            raise runs.RunError(f"this run's network takes {opened.config.data.dataset} points, not images: "
                                f"leave out --data-dir to use its own test split")
        paths, labels, names = folder_samples(data_dir, num_classes)
        batches = folder_batches(paths, labels, opened.preprocess, batch_size, unreadable)
        source = data_dir
    result = measure(opened.network, batches, num_classes, device)
    result.update(run_dir=run_dir, model=model, source=source, classes=names,
                  unreadable=[p for p, _ in unreadable], checkpoint_step=opened.checkpoint_step)
    if unreadable:
        result["unreadable_reasons"] = [r for _, r in unreadable]
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size <= 0:
        print("error: --batch-size must be a positive number of images", file=sys.stderr)
        return 2
    try:
        result = evaluate(args.run_dir, args.data_dir, args.model, args.batch_size, args.device)
    except runs.RunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    topk = next(k for k in result if k.startswith("top") and k != "top1")
    print(f"{args.model} network of {args.run_dir} (checkpoint step {result['checkpoint_step']}) on "
          f"{result['images']} images of {result['source']}:")
    print(f"top-1 {result['top1']:.2f}%   {topk[:3]}-{topk[3:]} {result[topk]:.2f}%")
    if result["unreadable"]:
        print(f"skipped {len(result['unreadable'])} files that do not decode, e.g. {result['unreadable'][0]}")
    print(format_confusion(result["confusion"], result["classes"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
