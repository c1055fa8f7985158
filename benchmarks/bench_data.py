"""Images/s of the full weak+strong unlabeled pipeline at 224x224 on real JPEGs:

  baseline  torch DataLoader, PIL decode, per-image PIL RandomResizedCrop/flip and per-image
            PIL RandAugment + cutout, ToTensor/Normalize per image (as the popular MPL ports do)
  torch     mpl_fast's DataLoader pipeline: torchvision.io decode, weak view in the workers,
            strong view batched on the collated uint8 batch
  dali      mpl_fast's DALI pipeline (CPU decode here; "mixed" GPU decode with --device cuda)

All in the same run, same files, same worker/thread count. Prints a table and writes JSON.
Usage: python benchmarks/bench_data.py [--quick] [--json PATH] [--profile DIR] [--device cuda]
       python benchmarks/bench_data.py --dataset cifar10 --batch 64   (32x32 arrays in memory)
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast.data import DataConfig, build_streams  # noqa: E402
from mpl_fast.data.dali_pipeline import dali_unavailable_reason  # noqa: E402
from mpl_fast.data.tiny import write_tiny_imagefolder  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PerImagePIL(torch.utils.data.Dataset):
    """The per-image PIL pipeline of the popular ports: decode, RRC + flip (or, for CIFAR
    arrays, reflect-pad-4 crop + flip), then RandAugment and cutout on PIL images one by one,
    two float tensors per image."""

    def __init__(self, files, size, num_ops, magnitude, cutout):
        from torchvision import transforms as T

        self.files = files  # paths, or a uint8 (N, H, W, 3) array
        self.weak = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()]) \
            if isinstance(files, list) else \
            T.Compose([T.RandomCrop(size, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip()])
        self.randaugment = T.RandAugment(num_ops=num_ops, magnitude=magnitude)
        self.to_input = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])
        self.cutout = cutout

    def __len__(self):
        return 10**9  # sampled endlessly

    def __getitem__(self, i):
        from PIL import Image, ImageDraw

        item = self.files[i % len(self.files)]
        image = Image.open(item).convert("RGB") if isinstance(item, str) else Image.fromarray(item)
        weak = self.weak(image)
        strong = self.randaugment(weak)
        x, y = torch.randint(0, strong.width, (2,)).tolist()
        h = self.cutout // 2
        ImageDraw.Draw(strong).rectangle([x - h, y - h, x + h, y + h], fill=(127, 127, 127))
        return self.to_input(weak), self.to_input(strong)


def time_batches(stream, batches, warmup):
    for _ in range(warmup):
        next(stream)
    start = time.perf_counter()
    images = 0
    for _ in range(batches):
        weak, strong = next(stream)
        images += weak.shape[0]
    if weak.is_cuda:
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def strong_impl():
    return "mpl_fast.augment.rand_augment"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_flags(parser, quick="few batches, for a smoke run", device="cpu", threads=1,
                            threads_help="torch threads of the main process (the workers use 1 each)",
                            profile="write a Chrome trace of the torch pipeline here")
    parser.add_argument("--dataset", choices=("imagefolder", "cifar10"), default="imagefolder",
                        help="imagefolder: real JPEGs at --size; cifar10: 32x32 arrays in memory")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="labeled batch; unlabeled = 7x")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--magnitude", type=int, default=9)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many rounds per case")
    parser.add_argument("--machine", default=None,
                        help="a note on the machine's state (e.g. 'quiet'), kept in the JSON")
    args = parser.parse_args()
    batches, warmup = (3, 1) if args.quick else (12, 2)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    if args.dataset == "cifar10":
        from mpl_fast.data.cifar import load_cifar
        from mpl_fast.data.tiny import write_tiny_cifar

        args.size = 32
        root = write_tiny_cifar(tempfile.mkdtemp(prefix="bench_data_"), train_per_class=500)
        files = load_cifar(root).train.images
        cutout = 16
    else:
        root = write_tiny_imagefolder(tempfile.mkdtemp(prefix="bench_data_"), num_classes=8,
                                      train_per_class=16 if args.quick else 48, val_per_class=1,
                                      bad_files=False)
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, "train")) for f in fs]
        cutout = args.size // 4
    cfg = DataConfig(dataset=args.dataset, data_dir=root, batch_size=args.batch, mu=7,
                     image_size=args.size, num_workers=args.workers, randaug_num_ops=2,
                     randaug_magnitude=args.magnitude, randaug_policy="torchvision", cutout=cutout)

    def baseline_stream():
        dataset = PerImagePIL(files, args.size, 2, args.magnitude, cutout)
        sampler = torch.utils.data.RandomSampler(range(len(files)), replacement=True,
                                                 num_samples=10**9)
        return iter(torch.utils.data.DataLoader(dataset, batch_size=7 * args.batch,
                                                sampler=sampler, num_workers=args.workers))

    def ours(loader, weak_only=False):
        def stream():
            if not weak_only:
                return build_streams(DataConfig(**{**cfg.__dict__, "loader": loader}), seed=0,
                                     device=args.device).unlabeled
            # Labeled stream at the unlabeled batch size: the weak view alone, the ceiling
            # that any strong-view op can reach in this pipeline.
            labeled = build_streams(DataConfig(**{**cfg.__dict__, "loader": loader,
                                                  "batch_size": 7 * args.batch}),
                                    seed=0, device=args.device).labeled
            return ((x, x) for x, _ in labeled)
        return stream

    cases = {"per-image PIL DataLoader": baseline_stream,
             "mpl_fast torch DataLoader + batched strong view": ours("torch"),
             "mpl_fast torch DataLoader, weak view only (ceiling)": ours("torch", True)}
    reason = dali_unavailable_reason()
    if reason is None and args.dataset == "imagefolder":
        decode = "GPU (mixed)" if args.device.startswith("cuda") else "CPU"
        cases[f"mpl_fast DALI ({decode} decode) + batched strong view"] = ours("dali")
        cases[f"mpl_fast DALI ({decode} decode), weak view only (ceiling)"] = ours("dali", True)

    # Rounds interleave the cases and the best round counts: the machine is shared. Each case
    # is torn down (workers stopped) before the next starts, so none runs in the background.
    results = {}
    for _ in range(args.rounds):
        for case, make in cases.items():
            stream = make()
            rate = time_batches(stream, batches, warmup)
            del stream
            gc.collect()
            results[case] = max(results.get(case, 0.0), rate)

    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        stream = ours("torch")()
        next(stream)
        with torch.profiler.profile() as prof:
            for _ in range(2):
                next(stream)
        prof.export_chrome_trace(os.path.join(args.profile, "bench_data_torch.json"))

    baseline = results["per-image PIL DataLoader"]
    print(f"\nweak+strong unlabeled images/s at {args.size}x{args.size}, {len(files)} "
          f"{'JPEGs' if args.dataset == 'imagefolder' else 'CIFAR-format images'}, "
          f"{args.workers} workers, {args.threads} main thread(s), unlabeled batch {7 * args.batch}, "
          f"device {args.device}")
    print(f"strong view: {strong_impl()}")
    rows = [{"case": case, "baseline_img_s": baseline, "img_s": rate, "ratio": rate / baseline}
            for case, rate in results.items()]
    print("images/s (ratio: ours / baseline)")
    common.print_table([{"case": r["case"], "baseline": r["baseline_img_s"], "ours": r["img_s"], "ratio": r["ratio"]}
                        for r in rows])
    if reason is not None and args.dataset == "imagefolder":
        print(f"DALI skipped: {reason}")
    out = {"machine_note": args.machine, "dataset": args.dataset, "size": args.size, "workers": args.workers,
           "unlabeled_batch": 7 * args.batch,
           "files": len(files), "quick": args.quick,
           "strong_view": strong_impl(), "main_threads": args.threads, "rounds": args.rounds,
           "batches_timed": batches, "rows": rows}
    common.write_results(args, "data", out, tag=f"{args.dataset}-{args.size if args.dataset == 'imagefolder' else 32}")


if __name__ == "__main__":
    main()
