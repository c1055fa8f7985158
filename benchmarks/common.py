"""What every benchmark script shares (scripts import it as `common`: they run as
`python benchmarks/<name>.py`, which puts this folder on the path).

- `add_common_flags(parser, ...)`: the flags every benchmark takes (--quick --device --threads
  --json --profile); each script adds its own after them.
- `write_results(args, bench, results, tag)`: writes `results` under one `header` (bench, command,
  git commit, UTC date, machine, torch, device, threads) to `--json`, by default
  `benchmarks/results/<bench>/<UTC date>_<tag>.json`.
- `print_table(rows)`: case, baseline, ours, ratio, % of limit.
- The MPL-step helpers (recipe, schedules, random batches, device sync) the step benchmarks share.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")

# The CIFAR-10-4K recipe (docs/algorithm.md) that the MPL-step benchmarks run.
RECIPE = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
STEP_KW = dict(uda_temperature=0.7, uda_threshold=0.6, label_smoothing=0.15, ema_decay=0.995)


# ------------------------------------------------------------------ flags


def add_common_flags(parser: argparse.ArgumentParser, *, quick: str = "a small run, for a smoke test",
                     devices: tuple[str, ...] | None = None, device: str | None = None,
                     threads: int | None = None, threads_help: str = "torch threads (default: torch's own)",
                     profile: str = "write torch.profiler Chrome traces here") -> None:
    """Adds the five flags every benchmark shares. ``devices`` restricts --device (a CPU-only
    benchmark passes ("cpu",)); ``device`` is its default (by default CUDA when present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() and (devices is None or "cuda" in devices) else "cpu"
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--device", default=device, choices=devices,
                        help=f"device to run on (default {device})")
    parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="where to write the results (default benchmarks/results/<bench>/<date>_<tag>.json)")
    parser.add_argument("--profile", default=None, metavar="DIR", help=profile)


def apply_threads(n: int | None) -> None:
    """torch.set_num_threads(n) when a thread count was asked for (0 or None: torch's default)."""
    if n:
        torch.set_num_threads(n)


# ------------------------------------------------------------------ results


def _git_commit() -> str:
    """HEAD of the checkout the benchmark runs from, "+dirty" when tracked files differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(bench: str, device: str | None = None, threads: int | None = None) -> dict:
    """Where and how a result was measured; written first into every results file. ``threads``:
    torch threads per process where they differ from this process's (spawned ranks)."""
    dev = str(device) if device is not None else "cpu"
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name()})"
    return {
        "bench": bench,
        "command": "python " + shlex.join(sys.argv),
        "git_commit": _git_commit(),
        "utc_date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "torch": torch.__version__,
        "device": dev,
        "threads": threads if threads is not None else torch.get_num_threads(),
    }


def default_path(bench: str, tag: str) -> str:
    """benchmarks/results/<bench>/<UTC date>_<tag>.json."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return os.path.join(RESULTS_DIR, bench, f"{date}_{tag}.json")


def write_results(args: argparse.Namespace, bench: str, results: dict, tag: str | None = None,
                  threads: int | None = None) -> str:
    """Writes ``{"header": ..., **results}`` to ``args.json`` or the default path (tag: "quick"
    for --quick runs, else the script's tag or "full"); returns the path and says it."""
    if args.json:
        path = args.json
    else:
        if getattr(args, "quick", False):
            tag = f"{tag}_quick" if tag else "quick"
        path = default_path(bench, tag or "full")
    write_json(path, {"header": header(bench, getattr(args, "device", None), threads), **results})
    print(f"wrote {os.path.relpath(path)}")
    return path


def write_json(path: str, results) -> None:
    """Writes ``results`` to ``path`` (creating its folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


# ------------------------------------------------------------------ table


def _cell(value, unit: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}{unit}"


def print_table(rows: list[dict], *, unit: str = "", case_width: int = 0) -> None:
    """One line per row: case, baseline, ours, ratio (baseline / ours unless the row says),
    and % of the hardware limit where the row has one. Rows are dicts with keys "case",
    "baseline", "ours", optional "ratio" and "pct_limit"; values are numbers (printed with
    ``unit``) or strings."""
    width = max([len("case"), case_width] + [len(str(r["case"])) for r in rows])
    print(f"{'case':<{width}} {'baseline':>12} {'ours':>12} {'ratio':>8} {'% limit':>8}")
    for r in rows:
        ratio = r.get("ratio")
        if ratio is None and isinstance(r.get("baseline"), (int, float)) and isinstance(r.get("ours"), (int, float)) \
                and r["ours"]:
            ratio = r["baseline"] / r["ours"]
        pct = r.get("pct_limit")
        print(f"{str(r['case']):<{width}} {_cell(r.get('baseline'), unit):>12} {_cell(r.get('ours'), unit):>12} "
              f"{_cell(ratio, 'x') if ratio is not None else '-':>8} {f'{pct:.0f}%' if pct is not None else '':>8}")


# ------------------------------------------------------------------ the MPL step's inputs


def step_schedules():
    """Student active from step 0 (the feedback is the point), constant rates, full UDA weight."""
    from mpl_fast.algo import Schedules  # noqa: PLC0415 - scripts put the repo on the path first

    return Schedules(total_steps=10_000, teacher_lr=RECIPE["lr"], student_lr=RECIPE["lr"],
                     teacher_schedule="constant", student_schedule="constant", uda_weight=8.0, uda_ramp=0)


def make_batches(n: int, batch: int, mu: int, size: int, num_classes: int, device: torch.device, seed: int = 1):
    """n (labeled, unlabeled) batches of normalised random images (the step's cost does not
    depend on the pixel values; the data pipeline is timed by the trainer benchmark)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x_l = torch.randn(batch, 3, size, size, generator=g)
        y_l = torch.randint(0, num_classes, (batch,), generator=g)
        x_uw = torch.randn(mu * batch, 3, size, size, generator=g)
        x_us = x_uw + 0.5 * torch.randn(mu * batch, 3, size, size, generator=g)
        out.append(((x_l.to(device), y_l.to(device)), (x_uw.to(device), x_us.to(device))))
    return out


def sync(device: torch.device) -> None:
    """Waits for the device's queued work (timings of asynchronous GPU steps); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
