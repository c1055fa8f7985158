"""Accuracy of MPL against its baselines, over several seeds.

    python benchmarks/accuracy.py                 # digits and two-moons, 4 methods, 5 seeds
    python benchmarks/accuracy.py --quick         # 2 seeds, fewer steps
    python benchmarks/accuracy.py --datasets digits --seeds 0 1 2
    python benchmarks/accuracy.py --datasets two-moons --methods supervised pseudo-labels uda-h0 mpl true-labels
    python benchmarks/accuracy.py --datasets cifar10 --cifar10 cifar10-jpg.zip --seeds 0 1 2 --jobs 2 \
        --out runs/accuracy-cifar10 --methods mpl uda pseudo-labels supervised

cifar10 is CIFAR-10 as JPEG files (train/<class>/, test/<class>/; a folder, or a zip of one that
is unpacked into --cache) on the cifar10-4k-cpu preset. Besides the methods, probe variants run
on the same seeds (VARIANTS below): uda-h0 (MPL's step with the MPL term weighted 0: a UDA
teacher and its student; --method uda trains the same networks bit for bit), mpl-no-uda,
mpl-no-baseline (h without its moving-average baseline), mpl-sample and mpl-soft (other
pseudo-label kinds), true-labels (two-moons' ceiling). --jobs runs that many runs side by side
(one process each); with --out, a run whose folder already holds the same config's finished
summary.json is read, not rerun.

Every method runs the same preset (same data, split, model, steps, schedules) and differs
only in --method, or in the few settings of a variant; the number reported per run is the method's headline model (summary.json
"headline": MPL/pseudo-labels/supervised: the best-on-validation student, finetuned when the
preset finetunes; UDA: its teacher). Prints a mean +- std table and writes the same numbers
as JSON (--json, default benchmarks/results/accuracy/<date>_<data sets>.json).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast.algo.config import METHODS  # noqa: E402
from mpl_fast.plot import read_metrics  # noqa: E402
from mpl_fast.train import run  # noqa: E402
from mpl_fast.train.config import preset, set_field, to_dict  # noqa: E402

PRESET_OF = {"digits": "digits", "two-moons": "two-moons", "cifar10": "cifar10-4k-cpu"}
# Benchmark-only variants, run as methods of their own on the same seeds:
# (trainer method, config fields changed, the data sets it is defined for; None = all).
VARIANTS = {
    # MPL's step with the MPL term weighted 0 (h has no effect): a UDA teacher, its student as headline.
    "uda-h0": ("mpl", {"mpl.mpl_weight": 0.0}, None),
    # MPL without UDA on the teacher: the MPL term and the supervised loss alone.
    "mpl-no-uda": ("mpl", {"mpl.uda_weight": 0.0}, None),
    "mpl-no-baseline": ("mpl", {"mpl.baseline": "off"}, None),
    "mpl-sample": ("mpl", {"mpl.pseudo_labels": "sample"}, None),
    "mpl-soft": ("mpl", {"mpl.pseudo_labels": "soft"}, None),
    # The true-label ceiling: the student alone on every training point's true label, one full
    # batch of all 2000 points per step, with the preset's student optimizer and steps.
    "true-labels": ("supervised", {"data.labels_per_class": 1000, "data.batch_size": 2000}, ("two-moons",)),
}
# The network whose test accuracy a method's curve shows (its headline before selection).
CURVE_MODEL = {"uda": "teacher"}
# Fields that say where and how often a run writes, not what it computes.
_BOOKKEEPING = ("output_dir", "checkpoint_every", "plot", "tensorboard")


def run_config(dataset: str, variant: str, seed: int, steps: int | None, out_root: str, threads: int | None,
               amp: bool | None, device: str, data_dir: str | None):
    method, changes, _ = VARIANTS.get(variant, (variant, {}, None))
    cfg = preset(PRESET_OF[dataset])
    cfg.method, cfg.seed, cfg.device = method, seed, device
    if threads is not None:
        cfg.threads = threads
    if amp is not None:
        cfg.amp = amp
    if data_dir is not None:
        cfg.data.data_dir = data_dir
    for name, value in changes.items():
        set_field(cfg, name, value)
    if steps is not None:
        cfg.steps = steps
    cfg.checkpoint_every = 0
    cfg.output_dir = os.path.join(out_root, f"{dataset}-{variant}-{seed}")
    return cfg


def _same_run(cfg, run_dir: str) -> bool:
    """``run_dir`` holds a finished run of ``cfg`` (same config up to where it writes)."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            saved = json.load(f)
        with open(os.path.join(run_dir, "summary.json")) as f:
            if json.load(f).get("interrupted"):
                return False
    except (OSError, ValueError, AttributeError):
        return False
    wanted = to_dict(cfg)
    saved = saved.get("config", saved)
    return all(saved.get(k) == v for k, v in wanted.items() if k not in _BOOKKEEPING)


def run_one(cfg, profile: str | None = None) -> dict:
    if _same_run(cfg, cfg.output_dir):
        with open(os.path.join(cfg.output_dir, "summary.json")) as f:
            return {**json.load(f), "reused": True}
    if os.path.exists(cfg.output_dir):
        raise SystemExit(f"error: {cfg.output_dir} holds another run (or an unfinished one): remove it or give "
                         "another --out")
    if profile:
        import torch.profiler as tp  # noqa: PLC0415

        with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
            summary = run(cfg, progress=False, quiet=True)
        os.makedirs(profile, exist_ok=True)
        prof.export_chrome_trace(os.path.join(profile, os.path.basename(cfg.output_dir) + ".json"))
        return summary
    return run(cfg, progress=False, quiet=True)


def _timed_run(cfg, profile):
    t0 = time.perf_counter()
    summary = run_one(cfg, profile)
    return summary, round(time.perf_counter() - t0, 1)


def cifar10_folder(path: str, cache: str) -> str:
    """The CIFAR-10 JPEG folder: ``path`` itself, or ``path`` (a zip) unpacked once into ``cache``."""
    if os.path.isdir(path):
        return path
    if not zipfile.is_zipfile(path):
        raise SystemExit(f"error: --cifar10 {path}: not a folder or a zip file")
    target = os.path.join(cache, os.path.splitext(os.path.basename(path))[0])
    if not os.path.isdir(os.path.join(target, "train")):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if any(os.path.isabs(n) or ".." in n.split("/") for n in names):
                raise SystemExit(f"error: --cifar10 {path}: a member's path leaves the folder; not unpacked")
            tmp = target + ".partial"
            z.extractall(tmp)
        os.replace(tmp, target)
    return target


def h_statistics(run_dir: str) -> dict | None:
    """h over the run's log lines (each the mean over --log-every steps) after the student starts."""
    hs = [float(m["h"]) for m in read_metrics(run_dir)["train"] if "h" in m and m.get("loss_student", 0) != 0]
    if not hs:
        return None
    return {"mean": statistics.mean(hs), "std": statistics.pstdev(hs), "positive": sum(h > 0 for h in hs) / len(hs),
            "mean_abs": statistics.mean(abs(h) for h in hs), "lines": len(hs)}


def accuracy_curve(run_dir: str, model: str) -> tuple[list[int], list[float]]:
    evals = [m for m in read_metrics(run_dir)["eval"] if f"test_{model}" in m]
    return [int(m["step"]) for m in evals], [float(m[f"test_{model}"]) for m in evals]


def plot_curves(rows: list[dict], dataset: str, path: str) -> None:
    """Mean (line) and min..max over seeds (band) of each variant's test top-1 against the step."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows if r["dataset"] == dataset):
        curves = [r["curve"] for r in rows if r["dataset"] == dataset and r["variant"] == variant and r["curve"][0]]
        if not curves:
            continue
        n = min(len(c[0]) for c in curves)
        steps = curves[0][0][:n]
        per_step = list(zip(*(c[1][:n] for c in curves)))
        ax.plot(steps, [statistics.mean(v) for v in per_step], marker="o", label=f"{variant} ({len(curves)} seeds)")
        ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{dataset} ({PRESET_OF[dataset]}): test top-1 during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {os.path.relpath(path)}")


def _stats(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["digits", "two-moons"], choices=sorted(PRESET_OF))
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "reduced-mpl"],
                        choices=[*METHODS, *VARIANTS],
                        help="methods and probe variants (default: every method but reduced-mpl, which needs "
                             "stored labels: benchmarks/bench_reduced.py); the variants are listed above")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="override the presets' step counts")
    common.add_common_flags(parser, quick="2 seeds", device="cpu", threads=None,
                            threads_help="torch threads per run (default: the preset's)",
                            profile="write a torch.profiler Chrome trace per run")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="train with or without --amp (default: the preset's; see docs/amp.md)")
    parser.add_argument("--cifar10", default=None, help="cifar10: CIFAR-10 as JPEG files, a folder or a zip of one")
    parser.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "mpl_fast"),
                        help="where --cifar10's zip is unpacked (once)")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side, one process each")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary one); finished "
                                                   "runs found there are read, not rerun")
    parser.add_argument("--plot", default=None, help="accuracy-vs-step PNG per data set (default: beside the JSON)")
    args = parser.parse_args(argv)
    for method in args.methods:
        allowed = VARIANTS.get(method, (None, None, None))[2]
        if allowed is not None and any(d not in allowed for d in args.datasets):
            parser.error(f"--methods {method} is defined for {', '.join(allowed)} only: drop it or choose "
                         "--datasets among those")
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    out_root = args.out or tempfile.mkdtemp(prefix="mpl-accuracy-")
    data_dirs = {d: None for d in args.datasets}
    if "cifar10" in args.datasets:
        if not args.cifar10:
            parser.error("--datasets cifar10 reads CIFAR-10 as JPEG files: give --cifar10 FOLDER_OR_ZIP")
        data_dirs["cifar10"] = cifar10_folder(args.cifar10, args.cache)

    # Seed-major: every variant's first seed finishes before any second seed starts.
    configs = [run_config(d, v, seed, args.steps, out_root, args.threads, args.amp, args.device, data_dirs[d])
               for seed in seeds for d in args.datasets for v in args.methods]
    results: dict = {"seeds": seeds, "amp": args.amp, "runs": [], "table": {}, "h": {}}
    pool = concurrent.futures.ProcessPoolExecutor(args.jobs) if args.jobs > 1 else None
    try:
        if pool is None:
            outcomes = (_timed_run(cfg, args.profile) for cfg in configs)
        else:
            outcomes = pool.map(_timed_run, configs, [args.profile] * len(configs))
        for cfg, (s, seconds) in zip(configs, outcomes):
            if s.get("interrupted"):  # SIGINT/SIGTERM: the run saved a checkpoint and returned early
                sys.exit(f"accuracy.py: {os.path.basename(cfg.output_dir)} was stopped by a signal at step "
                         f"{s.get('step')}; no results file written (the finished runs are printed above)")
            name = os.path.basename(cfg.output_dir)
            dataset = next(d for d in sorted(args.datasets, key=len, reverse=True) if name.startswith(d + "-"))
            variant = name[len(dataset) + 1:name.rindex("-")]
            row = {"dataset": dataset, "method": variant, "variant": variant, "seed": cfg.seed,
                   "headline_model": s["headline"]["model"], "test_top1": s["headline"]["test_top1"],
                   "all_test_top1": s["test_top1"], "seconds": seconds if not s.get("reused") else None,
                   "h": h_statistics(cfg.output_dir),
                   "curve": accuracy_curve(cfg.output_dir, CURVE_MODEL.get(cfg.method, "student"))}
            results["runs"].append(row)
            print(f"  {dataset:<9} {variant:<15} seed {cfg.seed}: {row['test_top1']:6.2f}%  "
                  f"({row['headline_model']}, {'reused' if s.get('reused') else f'{seconds} s'})", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()

    print(f"\nTest top-1 (%), mean ± std over seeds {seeds}; headline model of each method\n")
    header = f"| {'data set':<9} | " + " | ".join(f"{m:>15}" for m in args.methods) + " |"
    print(header)
    print("|" + "-" * 11 + "|" + "|".join("-" * 17 for _ in args.methods) + "|")
    for dataset in args.datasets:
        cells = []
        for method in args.methods:
            runs = [r for r in results["runs"] if r["dataset"] == dataset and r["variant"] == method]
            mean, std = _stats([r["test_top1"] for r in runs])
            results["table"].setdefault(dataset, {})[method] = {"mean": mean, "std": std, "n": len(runs)}
            cells.append(f"{mean:6.2f} ± {std:5.2f}")
            hs = [r["h"] for r in runs if r["h"]]
            if hs:
                results["h"].setdefault(dataset, {})[method] = {
                    k: statistics.mean(h[k] for h in hs) for k in ("mean", "std", "positive", "mean_abs")}
        print(f"| {dataset:<9} | " + " | ".join(f"{c:>15}" for c in cells) + " |")
    for dataset, per_variant in results["h"].items():
        print(f"\nh over the log lines after the student starts ({dataset}; mean over seeds):")
        for variant, h in per_variant.items():
            print(f"  {variant:<15} mean {h['mean']:+.2e}  std {h['std']:.2e}  |h| {h['mean_abs']:.2e}  "
                  f"positive {100 * h['positive']:.0f}%")
    print()
    tag = "_".join(args.datasets) + ("_amp" if args.amp else "")
    path = common.write_results(args, "accuracy", results, tag=tag)
    for dataset in args.datasets:
        plot_curves(results["runs"], dataset, args.plot or os.path.splitext(path)[0] + f"_{dataset}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
