"""Reduced Meta Pseudo Labels, measured.

    python benchmarks/bench_reduced.py digits            # 5 seeds: reduced MPL vs distillation vs full MPL
    python benchmarks/bench_reduced.py digits --quick    # 2 seeds, 300 steps
    python benchmarks/bench_reduced.py step              # memory/time per step, reduced vs full MPL

digits: per seed, the two-step workflow as a user runs it: a teacher by ``--method uda``
(the digits preset, same seed), labelled offline (mpl_fast.reduced.label, top-8), then the
digits-reduced preset over those labels. Compared on the same split, steps and student:
  reduced-mpl          T_R trained by the feedback h (the preset: plain SGD, lr 0.05)
  reduced-mpl-lr0.5    the same with T_R's rate 10x (h is small: does more feedback help?)
  distill              T_R frozen at the identity (--teacher.lr 0): plain distillation from the
                       same stored labels (the student's hard pseudo labels = argmax of T's)
  mpl                  full MPL (the digits preset: teacher and student trained together)
The number per run is the headline (the finetuned best-on-validation student).

step: one training step of each method, side by side in one process, one thread: time (median
of --steps after --warmup) and peak memory. On the CPU the peak is the resident set's
high-water mark (VmHWM, reset before each method, after freeing the previous method's memory
back to the system with malloc_trim) above the resident set before the first step (networks,
optimizers and batches already built); on a GPU torch.cuda.max_memory_allocated above the
allocated memory then. Reduced MPL's step = the student's forward/backward on the
unlabeled batch, its labeled forward/backward for h, and T_R (an MLP over class vectors);
full MPL adds the teacher's forward/backward over labeled + weak + strong images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script
import torch  # noqa: E402

from mpl_fast.reduced.label import label  # noqa: E402
from mpl_fast.train import run  # noqa: E402
from mpl_fast.train.config import preset  # noqa: E402

ARMS = ("reduced-mpl", "reduced-mpl-lr0.5", "distill", "mpl")


def _cfg(name: str, seed: int, steps: int | None, out: str, threads: int, labels: str | None = None):
    cfg = preset(name)
    cfg.seed, cfg.threads, cfg.checkpoint_every, cfg.output_dir = seed, threads, 0, out
    if steps is not None:
        cfg.steps = steps
    if labels is not None:
        cfg.reduced.labels = labels
    return cfg


def digits(args) -> dict:
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    steps = 300 if args.quick else args.steps
    root = args.out or tempfile.mkdtemp(prefix="bench_reduced_")
    runs: dict[str, list] = {arm: [] for arm in ("teacher",) + ARMS}
    for seed in seeds:
        t0 = time.perf_counter()
        cfg = _cfg("digits", seed, steps, os.path.join(root, f"teacher-{seed}"), args.threads)
        cfg.method = "uda"
        summary = run(cfg, progress=False, quiet=True)
        runs["teacher"].append({"seed": seed, "test_top1": summary["headline"]["test_top1"],
                                "seconds": summary["seconds"]})
        labels = os.path.join(root, f"labels-{seed}")
        label(cfg.output_dir, labels, batch_size=512, progress=False, workers=0)
        for arm in ARMS:
            if arm == "mpl":
                cfg = _cfg("digits", seed, steps, os.path.join(root, f"mpl-{seed}"), args.threads)
            else:
                cfg = _cfg("digits-reduced", seed, steps, os.path.join(root, f"{arm}-{seed}"), args.threads, labels)
                cfg.teacher.lr = {"reduced-mpl": cfg.teacher.lr, "reduced-mpl-lr0.5": 0.5, "distill": 0.0}[arm]
            summary = run(cfg, progress=False, quiet=True)
            runs[arm].append({"seed": seed, "test_top1": summary["headline"]["test_top1"],
                              "seconds": summary["seconds"]})
        line = ", ".join(f"{k} {v[-1]['test_top1']:.2f}" for k, v in runs.items())
        print(f"seed {seed} ({time.perf_counter() - t0:.0f} s): {line}", flush=True)
    table = {}
    print(f"\ndigits, {len(seeds)} seeds, test top-1 % (mean +- std):")
    for arm, rows in runs.items():
        accs = [r["test_top1"] for r in rows]
        mean, std = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(r["seconds"] for r in rows)
        table[arm] = {"mean": mean, "std": std, "seconds_mean": secs}
        print(f"  {arm:16s} {mean:6.2f} +- {std:5.2f}   ({secs:.1f} s a run)")
    paired = [a["test_top1"] - b["test_top1"] for a, b in zip(runs["reduced-mpl"], runs["distill"])]
    print(f"  reduced-mpl - distill, paired by seed: {[round(d, 2) for d in paired]}")
    return {"seeds": seeds, "steps": steps, "runs": runs, "summary": table, "paired_reduced_minus_distill": paired}


# ----------------------------------------------------------------------------- step cost

def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Linux: the resident set's high-water mark (VmHWM) restarts from the current size."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _release_freed_memory() -> None:
    """Frees the previous case's memory back to the system, so that the next case's resident set
    grows by what it allocates (glibc would otherwise reuse pages it kept, unseen)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _step_cost(method: str, model: str, image: int, batch: int, mu: int, steps: int, warmup: int,
               device: str, labels_root: str) -> dict:
    """Time and peak memory of ``method``'s step on random images (MPL object as the trainer builds it)."""
    from mpl_fast.data.streams import DataStreams
    from mpl_fast.train.build import build_mpl

    classes = 10 if model == "wrn28-2" else 1000
    cfg = preset("cifar10-4k")
    cfg.method, cfg.device, cfg.model.name = method, device, model
    cfg.data.batch_size, cfg.data.mu = batch, mu
    cfg.mpl.student_wait_steps = 0
    shape = (3, image, image)
    streams = DataStreams(labeled=None, unlabeled=None, val=[], test=[], num_classes=classes, input_shape=shape)
    _release_freed_memory()
    torch.manual_seed(0)
    mpl = build_mpl(cfg, streams)
    g = torch.Generator().manual_seed(1)
    x_l = torch.randn(batch, *shape, generator=g).to(device)
    y_l = torch.randint(0, classes, (batch,), generator=g).to(device)
    x_us = torch.randn(batch * mu, *shape, generator=g).to(device)
    if method == "reduced-mpl":
        second = torch.softmax(3 * torch.randn(batch * mu, classes, generator=g), 1).to(device)
    else:
        second = torch.randn(batch * mu, *shape, generator=g).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    # The peak counts everything the step holds above the networks, optimizers and batches
    # (already allocated here): activations, gradients, momentum and g_u once created.
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss()
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        mpl.step((x_l, y_l), (second, x_us), clock=i)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _peak_rss()) - base
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in
              (("teacher", mpl.teacher), ("student", mpl.student))}
    return {"method": method, "model": model, "image": image, "batch": batch, "mu": mu,
            "ms_median": 1000 * statistics.median(times), "peak_growth_bytes": peak, "parameters": params}


def step(args) -> dict:
    cases = [("wrn28-2", 32, 8, 7)] if args.quick else [("wrn28-2", 32, 16, 7), (args.large_model, 224, 2, 3)]
    out = []
    for model, image, batch, mu in cases:
        pair = {}
        for method in ("reduced-mpl", "mpl"):
            pair[method] = _step_cost(method, model, image, batch, mu, args.steps, args.warmup, args.device,
                                      args.out or "")
        ratio_t = pair["mpl"]["ms_median"] / pair["reduced-mpl"]["ms_median"]
        ratio_m = pair["mpl"]["peak_growth_bytes"] / max(pair["reduced-mpl"]["peak_growth_bytes"], 1)
        print(f"{model} {image}px batch {batch} mu {mu}: full MPL {pair['mpl']['ms_median']:.0f} ms, "
              f"{pair['mpl']['peak_growth_bytes'] / 2**20:.0f} MiB; reduced {pair['reduced-mpl']['ms_median']:.0f} ms, "
              f"{pair['reduced-mpl']['peak_growth_bytes'] / 2**20:.0f} MiB; full/reduced time {ratio_t:.2f}x, "
              f"memory {ratio_m:.2f}x", flush=True)
        out.append({"model": model, "image": image, "batch": batch, "mu": mu, "full": pair["mpl"],
                    "reduced": pair["reduced-mpl"], "time_ratio_full_over_reduced": ratio_t,
                    "memory_ratio_full_over_reduced": ratio_m})
    return {"cases": out}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("digits", "step"))
    common.add_common_flags(parser, device="cpu", threads=1, threads_help="torch threads (default 1)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="digits: training steps (default: the presets'); "
                        "step: timed steps (default 5)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--large-model", default="efficientnet_b3", help="step: the large timm model")
    parser.add_argument("--out", default=None, help="digits: keep the run folders here (default: a temp folder)")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    if args.what == "digits":
        results = digits(args)
        tag = "digits"
    else:
        args.steps = args.steps or 5
        results = step(args)
        tag = f"step_{args.device}"
    common.write_results(args, "reduced", results, tag, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
