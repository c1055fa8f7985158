"""Accuracy of MPL against its baselines on the embedded data sets, over several seeds.

    python benchmarks/accuracy.py                 # digits and two-moons, 4 methods, 5 seeds
    python benchmarks/accuracy.py --quick         # 2 seeds, fewer steps
    python benchmarks/accuracy.py --datasets digits --seeds 0 1 2
    python benchmarks/accuracy.py --datasets two-moons --methods supervised pseudo-labels uda-h0 mpl true-labels

Every method runs the same preset (same data, split, model, steps, schedules) and differs
only in --method, or in a few settings for the variants named in VARIANTS below; the number
reported per run is the method's headline model (summary.json "headline": MPL/pseudo-labels/
supervised: the best-on-validation student, finetuned when the preset finetunes; UDA: its
teacher). Prints a mean +- std table and writes the same numbers
as JSON (--json, default benchmarks/results/accuracy/<date>_<data sets>.json).
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

from mpl_fast.train import run  # noqa: E402
from mpl_fast.algo.config import METHODS  # noqa: E402
from mpl_fast.train.config import preset  # noqa: E402

PRESET_OF = {"digits": "digits", "two-moons": "two-moons"}

# Benchmark-only variants, run as methods of their own: (trainer method, config overrides, data sets).
VARIANTS = {
    # MPL's step with the MPL term weighted 0 (h has no effect): a UDA teacher, and its student as headline.
    "uda-h0": ("mpl", {"mpl.mpl_weight": 0.0}, ("digits", "two-moons")),
    # MPL without UDA on the teacher: the MPL term and the supervised loss alone.
    "mpl-no-uda": ("mpl", {"mpl.uda_weight": 0.0}, ("digits", "two-moons")),
    # The true-label ceiling: the student alone on every training point's true label, one full
    # batch of all 2000 points per step, with the preset's student optimizer and steps.
    "true-labels": ("supervised", {"data.labels_per_class": 1000, "data.batch_size": 2000}, ("two-moons",)),
}


def _override(cfg, dotted: str, value) -> None:
    *path, leaf = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, leaf, value)


def run_one(dataset: str, method: str, seed: int, steps: int | None, out_root: str, threads: int,
            profile: str | None = None, amp: bool = False, device: str = "cpu") -> dict:
    cfg = preset(PRESET_OF[dataset])
    trainer_method, overrides, _ = VARIANTS.get(method, (method, {}, ()))
    cfg.method, cfg.seed, cfg.threads, cfg.amp, cfg.device = trainer_method, seed, threads, amp, device
    for dotted, value in overrides.items():
        _override(cfg, dotted, value)
    if steps is not None:
        cfg.steps = steps
    cfg.checkpoint_every = 0
    cfg.output_dir = os.path.join(out_root, f"{dataset}-{method}-{seed}")
    if profile:
        import torch.profiler as tp  # noqa: PLC0415

        with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
            summary = run(cfg, progress=False, quiet=True)
        os.makedirs(profile, exist_ok=True)
        prof.export_chrome_trace(os.path.join(profile, f"{dataset}-{method}-{seed}.json"))
        return summary
    return run(cfg, progress=False, quiet=True)


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "two-moons"], choices=sorted(PRESET_OF))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "reduced-mpl"],
                        choices=list(METHODS) + list(VARIANTS),
                        help="default: all but reduced-mpl (it needs stored labels: benchmarks/bench_reduced.py); "
                             "variants: uda-h0 (MPL with --mpl.mpl-weight 0), mpl-no-uda (--mpl.uda-weight 0), "
                             "true-labels (two-moons: the student on all true labels)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the presets' step counts")
    common.add_common_flags(parser, quick="2 seeds", device="cpu", threads=1, threads_help="torch threads per run",
                            profile="write a torch.profiler Chrome trace per run")
    parser.add_argument("--amp", action="store_true", help="train with --amp (bf16 autocast, see docs/amp.md)")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one)")
    args = parser.parse_args(argv)
    for method in args.methods:
        if method in VARIANTS and any(d not in VARIANTS[method][2] for d in args.datasets):
            parser.error(f"--methods {method} is defined for {', '.join(VARIANTS[method][2])} only: "
                         f"drop it or choose --datasets among those")
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    out_root = args.out or tempfile.mkdtemp(prefix="mpl-accuracy-")

    results: dict = {"seeds": seeds, "amp": args.amp, "runs": [], "table": {}}
    for dataset in args.datasets:
        for method in args.methods:
            for seed in seeds:
                t0 = time.perf_counter()
                s = run_one(dataset, method, seed, args.steps, out_root, args.threads, args.profile, args.amp,
                            args.device)
                if s.get("interrupted"):  # SIGINT/SIGTERM: the run saved a checkpoint and returned early
                    sys.exit(f"accuracy.py: {dataset} {method} seed {seed} was stopped by a signal at step "
                             f"{s['step']}; no results file written (the finished runs are printed above)")
                row = {"dataset": dataset, "method": method, "seed": seed,
                       "headline_model": s["headline"]["model"], "test_top1": s["headline"]["test_top1"],
                       "all_test_top1": s["test_top1"], "seconds": round(time.perf_counter() - t0, 1)}
                results["runs"].append(row)
                print(f"  {dataset:<9} {method:<13} seed {seed}: {row['test_top1']:6.2f}%  "
                      f"({row['headline_model']}, {row['seconds']} s)", flush=True)

    print(f"\nTest top-1 (%), mean ± std over seeds {seeds}; headline model of each method\n")
    header = f"| {'data set':<9} | " + " | ".join(f"{m:>15}" for m in args.methods) + " |"
    print(header)
    print("|" + "-" * 11 + "|" + "|".join("-" * 17 for _ in args.methods) + "|")
    for dataset in args.datasets:
        cells = []
        for method in args.methods:
            accs = [r["test_top1"] for r in results["runs"] if r["dataset"] == dataset and r["method"] == method]
            mean, std = _stats(accs)
            results["table"].setdefault(dataset, {})[method] = {"mean": mean, "std": std, "n": len(accs)}
            cells.append(f"{mean:6.2f} ± {std:5.2f}")
        print(f"| {dataset:<9} | " + " | ".join(f"{c:>15}" for c in cells) + " |")
    print()
    common.write_results(args, "accuracy", results, tag="_".join(args.datasets) + ("_amp" if args.amp else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
