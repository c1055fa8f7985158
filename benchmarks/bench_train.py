"""The trainer as a user runs it, data loading and augmentation included.

1. Writes a CIFAR-10-format data set (python pickles, ``--per-class`` images per class; the
   cifar10-4k preset needs 500 per class for its labeled + validation split) with
   ``mpl_fast.data.tiny.write_tiny_cifar``.
2. Runs ``python -m mpl_fast.train --preset cifar10-4k --steps N`` on it as a subprocess
   (batch shrunk to ``--batch`` for a CPU, student active from step 0 so every step is a full
   MPL step, no finetuning, a small validation split so the final evaluation stays short) and
   reads steps/s from its metrics.jsonl (whole run wall time reported too).
3. In process, with the trainer's own builders (``mpl_fast.train.build_streams`` and
   ``build_mpl``): times ``next()`` on the two streams and the step separately, and the streams
   alone (no step: what the data pipeline delivers when nothing competes with it).

    python benchmarks/bench_train.py [--steps 20] [--batch 16] [--quick] [--json PATH] [--profile DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast.data.tiny import write_tiny_cifar  # noqa: E402


def overrides(data_dir: str, steps: int, batch: int, out_dir: str) -> list[str]:
    """The flags that turn the cifar10-4k preset into a short CPU timing run (same step math)."""
    return ["--preset", "cifar10-4k", "--steps", str(steps), "--data.data-dir", data_dir,
            "--data.batch-size", str(batch), "--data.val-per-class", "10",
            "--mpl.student-wait-steps", "0", "--finetune.steps", "0",
            "--log-every", str(max(1, steps // 4)), "--eval-every", str(10 * steps), "--checkpoint-every", "0",
            "--output-dir", out_dir]


def run_cli(data_dir: str, steps: int, batch: int, work: str) -> dict:
    out_dir = os.path.join(work, "run")
    cmd = [sys.executable, "-m", "mpl_fast.train"] + overrides(data_dir, steps, batch, out_dir)
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = [json.loads(ln) for ln in open(os.path.join(out_dir, "metrics.jsonl")) if ln.strip()]
    intervals = [ln for ln in lines if "steps_per_s" in ln]
    # The first interval includes warm-up (first allocations, worker start-up): report it apart.
    later = intervals[1:] or intervals
    return {"command": " ".join(cmd[1:]), "wall_s": round(wall, 2),
            "steps_per_s_first_interval": round(intervals[0]["steps_per_s"], 3),
            "steps_per_s": round(statistics.mean(ln["steps_per_s"] for ln in later), 3),
            "intervals": [round(ln["steps_per_s"], 3) for ln in intervals]}


def run_split(data_dir: str, steps: int, batch: int, work: str, profile_dir: str | None) -> dict:
    """Data wait vs step time inside one process, built exactly as the trainer builds it."""
    from mpl_fast import train  # noqa: PLC0415

    args = train.build_parser().parse_args(overrides(data_dir, steps, batch, os.path.join(work, "split")))
    cfg = train.config_from_args(args)
    torch.manual_seed(cfg.seed)
    streams = train.build_streams(cfg)
    mpl = train.build_mpl(cfg, streams)
    data_s, step_s = [], []
    warmup = 2
    prof = None
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    for i in range(warmup + steps):
        if prof is not None and i == warmup:
            prof.__enter__()
        t0 = time.perf_counter()
        with torch.profiler.record_function("data next()"):
            labeled, unlabeled = next(streams.labeled), next(streams.unlabeled)
        t1 = time.perf_counter()
        with torch.profiler.record_function("mpl step"):
            mpl.step(labeled, unlabeled, clock=i)
        t2 = time.perf_counter()
        if i >= warmup:
            data_s.append(t1 - t0)
            step_s.append(t2 - t1)
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(os.path.join(profile_dir, "train_loop.json"))
    # The streams alone: how fast the pipeline delivers when the step does not compete for the CPU.
    # Drain what the loader workers prefetched while the step ran (2 batches per worker and
    # stream), then time the pipeline's own rate.
    for _ in range(2 * max(1, cfg.data.num_workers)):
        next(streams.labeled), next(streams.unlabeled)
    alone_steps = max(10, 2 * steps)
    t0 = time.perf_counter()
    for _ in range(alone_steps):
        next(streams.labeled), next(streams.unlabeled)
    alone = (time.perf_counter() - t0) / alone_steps
    data, step = statistics.mean(data_s), statistics.mean(step_s)
    return {"data_wait_s_per_step": round(data, 4), "step_s_per_step": round(step, 4),
            "data_fraction": round(data / (data + step), 3), "steps_per_s": round(1 / (data + step), 3),
            "streams_alone_s_per_step": round(alone, 4),
            "streams_alone_images_per_s": round(batch * (1 + 2 * cfg.data.mu) / alone, 1),
            "num_workers": cfg.data.num_workers, "loader": cfg.data.loader}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="trainer steps (CLI run) and timed in-process steps")
    parser.add_argument("--batch", type=int, default=16, help="labeled batch (unlabeled = 7x per view)")
    parser.add_argument("--per-class", type=int, default=600, help="training images per class to generate")
    common.add_common_flags(parser, quick="5 steps, batch 4", devices=("cpu",),
                            threads_help="torch threads of the in-process part (the CLI run keeps its own)",
                            profile="Chrome trace of the in-process loop")
    args = parser.parse_args(argv)
    common.apply_threads(args.threads)
    if args.quick:
        args.steps, args.batch = 5, 4
    with tempfile.TemporaryDirectory() as work:
        data_dir = write_tiny_cifar(os.path.join(work, "cifar10"), train_per_class=args.per_class,
                                    test_per_class=20, seed=0)
        cli = run_cli(data_dir, args.steps, args.batch, work)
        split = run_split(data_dir, max(3, args.steps // 2), args.batch, work, args.profile)
    images = args.batch * 15
    print(f"\ncifar10-4k preset, B={args.batch} + 2 x {7 * args.batch} unlabeled ({images} images/step), "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"{'measure':<44} {'value':>10}")  # no baseline: what the trainer does, not a comparison
    rows = [("CLI steps/s (after the first log interval)", cli["steps_per_s"]),
            ("CLI steps/s (first interval)", cli["steps_per_s_first_interval"]),
            ("CLI images/s", round(cli["steps_per_s"] * images, 1)),
            ("CLI whole run wall s (start-up, eval incl.)", cli["wall_s"]),
            ("in-process data wait s/step", split["data_wait_s_per_step"]),
            ("in-process step s/step", split["step_s_per_step"]),
            ("data share of the loop", split["data_fraction"]),
            ("streams alone s/step", split["streams_alone_s_per_step"]),
            ("streams alone images/s", split["streams_alone_images_per_s"])]
    for name, value in rows:
        print(f"{name:<44} {value:>10}")
    common.write_results(args, "train", {"batch": args.batch, "steps": args.steps, "cli": cli, "split": split},
                         tag="cifar10-4k")
    return 0


if __name__ == "__main__":
    sys.exit(main())
