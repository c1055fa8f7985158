"""Throughput of batched RandAugment (2 ops) + 16-px Cutout against torchvision, per image.

Cases: 32x32 (CIFAR) and 224x224 images (real photos: scikit-image's bundled astronaut, coffee,
chelsea, rocket, resized). Baselines: torchvision's RandAugment(2, 9) plus a 16-px cutout applied
one image at a time, to PIL images (transforms.RandAugment), to uint8 tensors
(transforms.RandAugment) and to uint8 tensors with transforms.v2.RandAugment. Ours:
mpl_fast.augment.rand_augment(batch, 2, 9, cutout=16) on the whole batch. "1 thread": everything on
one core (torch.set_num_threads(1)), timed as this thread's CPU time (time.thread_time), so that
other jobs on a shared machine do not count; "all threads": ours with torch's intra-op threads,
the baselines in a pool of worker processes (how a DataLoader would run them), wall time. The
"limit" row: one read and one write of every image (a copy into a preallocated batch), the
least any augmentation that rewrites each image must do. On a GPU (when
present) ours runs on CUDA and, if nvidia.dali is importable, DALI's auto_aug.rand_augment on the
same GPU is timed too.

    python benchmarks/bench_augment.py [--quick] [--json PATH] [--profile DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast import augment, ops  # noqa: E402

CUTOUT = 16


def _images(n: int, size: int) -> torch.Tensor:
    """Real photos (scikit-image) cropped/resized to size x size, cycled to n images."""
    from skimage import data
    from torchvision.transforms import functional as F

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    base = [F.resize(torch.from_numpy(p).permute(2, 0, 1).contiguous(), [size, size], antialias=True) for p in photos]
    flips = base + [b.flip(-1) for b in base]
    return torch.stack([flips[i % len(flips)] for i in range(n)])


def _pil_cutout(img, rng):
    w, h = img.size
    cy, cx = rng.integers(h), rng.integers(w)
    img.paste((128, 128, 128), (max(cx - CUTOUT // 2, 0), max(cy - CUTOUT // 2, 0),
                                min(cx + CUTOUT // 2, w), min(cy + CUTOUT // 2, h)))
    return img


def _tensor_cutout(img, rng):
    h, w = img.shape[-2:]
    cy, cx = rng.integers(h), rng.integers(w)
    img = img.clone()
    img[:, max(cy - CUTOUT // 2, 0):cy + CUTOUT // 2, max(cx - CUTOUT // 2, 0):cx + CUTOUT // 2] = 128
    return img


BASELINES = ("pil", "tensor", "v2")
BASELINE_NAMES = {"pil": "torchvision pil", "tensor": "torchvision tensor", "v2": "torchvision v2 tensor"}


def _baseline_chunk(args):
    """Worker: torchvision RandAugment + cutout over a chunk, one image at a time."""
    kind, arrays, clock = args
    from PIL import Image
    from torchvision.transforms import RandAugment, v2

    torch.set_num_threads(1)
    ra, rng = (v2.RandAugment(2, 9) if kind == "v2" else RandAugment(2, 9)), np.random.default_rng(0)
    if kind == "pil":
        items = [Image.fromarray(a) for a in arrays]
        start = clock()
        for img in items:
            _pil_cutout(ra(img), rng)
    else:
        items = [torch.from_numpy(a).permute(2, 0, 1).contiguous() for a in arrays]
        start = clock()
        for img in items:
            _tensor_cutout(ra(img), rng)
    return clock() - start


def _time_baseline_once(kind: str, arrays: list, workers: int, pool) -> float:
    """Seconds for one pass of torchvision over all images (one process, or a pool)."""
    if workers == 1:
        return _baseline_chunk((kind, arrays, time.thread_time))
    chunks = [(kind, arrays[i::workers], time.perf_counter) for i in range(workers)]
    start = time.perf_counter()
    pool.map(_baseline_chunk, chunks)
    return time.perf_counter() - start


def _time_ours_once(images: torch.Tensor, repeats: int, g: torch.Generator, device: str = "cpu",
                    clock=time.perf_counter) -> float:
    """Seconds per batch of ours, averaged over `repeats` calls."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = clock()
    for _ in range(repeats):
        augment.rand_augment(images, 2, 9, generator=g, cutout=CUTOUT)
    sync()
    return (clock() - start) / repeats


def _time_copy_once(images: torch.Tensor, out: torch.Tensor, repeats: int, clock) -> float:
    """Seconds per batch of one read + one write of every image (the limit row)."""
    start = clock()
    for _ in range(repeats):
        out.copy_(images)
    return (clock() - start) / repeats


def _compare(images: torch.Tensor, workers: int, pool, repeats: int, rounds: int = 5) -> tuple[dict, dict]:
    """img/s of ours, the copy limit and the baselines, measured in alternation (`rounds` times),
    so that load changes on a shared machine hit all of them alike. Returns the median rates and,
    per baseline, the (min, max) over rounds of the ratio ours / baseline within a round."""
    arrays = [im.permute(1, 2, 0).numpy().copy() for im in images]
    g = torch.Generator().manual_seed(0)
    clock = time.thread_time if workers == 1 else time.perf_counter
    out = torch.empty_like(images)
    augment.rand_augment(images, 2, 9, generator=g, cutout=CUTOUT)  # warm-up
    for kind in BASELINES:
        _time_baseline_once(kind, arrays[: max(workers, len(arrays) // 8)], workers, pool)
    times = {key: [] for key in ("ours", "copy") + BASELINES}
    for _ in range(rounds):
        times["ours"].append(_time_ours_once(images, repeats, g, clock=clock))
        times["copy"].append(_time_copy_once(images, out, repeats, clock))
        for kind in BASELINES:
            times[kind].append(_time_baseline_once(kind, arrays, workers, pool))
    rates = {key: len(arrays) / float(np.median(seconds)) for key, seconds in times.items()}
    spread = {kind: (min(b / o for b, o in zip(times[kind], times["ours"])),
                     max(b / o for b, o in zip(times[kind], times["ours"]))) for kind in BASELINES}
    return rates, spread


def _time_ours(images: torch.Tensor, repeats: int, device: str = "cpu") -> float:
    g = torch.Generator().manual_seed(0)
    images = images.to(device)
    augment.rand_augment(images, 2, 9, generator=g, cutout=CUTOUT)
    best = min(_time_ours_once(images, repeats, g, device) for _ in range(3))
    return images.shape[0] / best


def _time_dali(size: int, batch: int) -> float | None:
    try:
        from nvidia.dali import fn, pipeline_def
        from nvidia.dali.auto_aug import rand_augment
    except ImportError:
        return None
    images = _images(batch, size).permute(0, 2, 3, 1).numpy()

    @pipeline_def(enable_conditionals=True, batch_size=batch, num_threads=4, device_id=0, seed=0)
    def pipe():
        x = fn.external_source(source=lambda: list(images), batch=True, layout="HWC", device="gpu")
        return rand_augment.rand_augment(x, n=2, m=9, shape=[size, size])

    p = pipe()
    p.build()
    p.run()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        p.run()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(parser, quick="small batches, for a smoke run", devices=("cpu", "cuda"),
                            threads=os.cpu_count() or 1,
                            threads_help="the 'all threads' case: ours with this many torch threads, the "
                                         "baselines in this many worker processes (default: all cores)",
                            profile="write a torch.profiler Chrome trace of ours here")
    args = parser.parse_args()

    threads = args.threads
    cases = [(32, 256 if args.quick else 1024), (224, 16 if args.quick else 64)]
    rows = []
    ctx = mp.get_context("fork")
    with ctx.Pool(threads) as pool:
        for size, batch in cases:
            images = _images(batch, size)
            repeats = 3 if args.quick else 10
            for label, n_threads in (("1 thread", 1), (f"all threads ({threads})", threads)):
                torch.set_num_threads(n_threads)
                rates, spread = _compare(images, n_threads, pool, repeats)
                for kind in BASELINES:
                    rows.append({"case": f"{size}x{size} N={batch} {label}", "baseline": BASELINE_NAMES[kind],
                                 "baseline_img_s": rates[kind], "ours_img_s": rates["ours"],
                                 "ratio": rates["ours"] / rates[kind], "ratio_range": spread[kind]})
                rows.append({"case": f"{size}x{size} N={batch} {label}", "baseline": "limit: copy (1 read+1 write)",
                             "baseline_img_s": rates["copy"], "ours_img_s": rates["ours"],
                             "ratio": rates["ours"] / rates["copy"]})
            if args.device == "cuda":
                ours = _time_ours(images, repeats, "cuda")
                try:  # untested here (no GPU on the dev VM): report a failure instead of crashing
                    dali = _time_dali(size, batch)
                except Exception as exc:  # noqa: BLE001
                    print(f"DALI rand_augment failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                    dali = None
                rows.append({"case": f"{size}x{size} N={batch} cuda", "baseline": "DALI rand_augment" if dali else "none",
                             "baseline_img_s": dali, "ours_img_s": ours, "ratio": ours / dali if dali else None})

    print(f"{'case':<34} {'baseline':<30} {'baseline img/s':>15} {'ours img/s':>12} {'ratio':>8} {'range':>13}")
    for r in rows:
        base = f"{r['baseline_img_s']:.0f}" if r["baseline_img_s"] else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        span = f"{r['ratio_range'][0]:.1f}-{r['ratio_range'][1]:.1f}" if r.get("ratio_range") else ""
        print(f"{r['case']:<34} {r['baseline']:<30} {base:>15} {r['ours_img_s']:>12.0f} {ratio:>8} {span:>13}")

    common.write_results(args, "augment", {"backend": ops.backend(), "quick": args.quick, "rows": rows},
                         tag=args.device)

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        os.makedirs(args.profile, exist_ok=True)
        images = _images(256, 32)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                augment.rand_augment(images, 2, 9, generator=torch.Generator().manual_seed(0), cutout=CUTOUT)
        path = os.path.join(args.profile, "bench_augment_trace.json")
        prof.export_chrome_trace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
