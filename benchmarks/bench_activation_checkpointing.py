"""Benchmark of activation checkpointing (``--activation-checkpointing``) on the MPL step.

The step as mpl_fast.train runs it (FusedSGD, channels_last, grad-dot feedback, student EMA),
with teacher and student plain ("plain") or with every residual block checkpointed ("ckpt",
mpl_fast.models.checkpointing). Both start from the same seeded models, see the same batches and
dropout seeds, and are timed in alternation (one step of each in turn), so a load spike on a
shared machine hits both.

Measured per model:
  s/step            median wall time of the timed steps (ratio = ckpt / plain: the price, ~1 extra forward)
  saved MiB teacher bytes autograd keeps from the teacher's forward over labeled + weak + strong
                    (distinct storages saved through saved_tensors_hooks, parameters excluded:
                    mpl_fast.models.checkpointing.saved_activation_bytes); the teacher's graph is
                    alive across the whole student step, so this is the step's largest term
  saved MiB student the same for the student's forward over the strong batch
  peak MiB          CPU: growth of the peak RSS (VmHWM) over the RSS after setup, during 2 steps
                    in a fresh process per case, with glibc told to mmap every block >= 64 KiB
                    (MALLOC_MMAP_THRESHOLD_): a freed activation then leaves the RSS at once, so the
                    peak follows live memory (with glibc's default, freed heap memory stays resident
                    and both cases measured the same ~720 MiB at --quick); CUDA:
                    torch.cuda.max_memory_allocated during 2 steps (code path not run here: no GPU)
  |dθ| end          largest parameter difference ckpt vs plain after all steps (round-off only)

    python benchmarks/bench_activation_checkpointing.py [--quick] [--batch 16] [--mu 7] [--steps 4]
        [--models wrn28-2,resnet50] [--device cpu|cuda] [--json PATH] [--profile DIR] [--no-peak]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RECIPE, STEP_KW, add_common_flags, apply_threads, make_batches, print_table, sync, write_results  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast.algo import MPL, MPLConfig, Schedules  # noqa: E402
from mpl_fast.models import create_model  # noqa: E402
from mpl_fast.models.checkpointing import enable_activation_checkpointing, saved_activation_bytes  # noqa: E402
from mpl_fast.models.speed import to_channels_last  # noqa: E402
from mpl_fast.optim import FusedSGD  # noqa: E402

CASES = ("plain", "ckpt")
MODELS = {"wrn28-2": dict(size=32, dropout=0.2), "resnet50": dict(size=224, dropout=0.0)}
NUM_CLASSES = 10


def build_step(model: str, checkpointing: bool, device: torch.device) -> MPL:
    """Teacher and student as mpl_fast.train builds them (seed 0, channels_last, then checkpointing)."""
    torch.manual_seed(0)
    nets = []
    for _ in range(2):
        net = to_channels_last(create_model(model, NUM_CLASSES, dropout=MODELS[model]["dropout"]).to(device))
        if checkpointing:
            enable_activation_checkpointing(net)
        nets.append(net)
    teacher, student = nets
    schedules = Schedules(total_steps=10_000, teacher_lr=RECIPE["lr"], student_lr=RECIPE["lr"],
                          teacher_schedule="constant", student_schedule="constant", uda_weight=8.0)
    return MPL(teacher, student, FusedSGD(teacher.parameters(), **RECIPE), FusedSGD(student.parameters(), **RECIPE),
               schedules, MPLConfig(feedback="grad-dot", baseline="off", **STEP_KW), method="mpl")


def timed_step(mpl: MPL, batch, i: int, device: torch.device) -> float:
    torch.manual_seed(1000 + i)  # the same dropout masks in both cases
    sync(device)
    t0 = time.perf_counter()
    mpl.step(*batch, clock=i)
    sync(device)
    return time.perf_counter() - t0


def saved_mib(mpl: MPL, batch) -> dict[str, float]:
    """Saved-for-backward MiB of the teacher's forward (labeled + weak + strong) and the student's (strong)."""
    (x_l, _), (x_uw, x_us) = batch
    out = {}
    for name, net, x in (("teacher", mpl.teacher, torch.cat([x_l, x_uw, x_us])), ("student", mpl.student, x_us)):
        net.train()
        state = (*net.parameters(), *net.buffers())
        out[name] = saved_activation_bytes(lambda: net(x), exclude=state) / 2**20
    return out


def max_param_diff(a: MPL, b: MPL) -> float:
    return max((p.detach() - q.detach()).abs().max().item()
               for ma, mb in ((a.teacher, b.teacher), (a.student, b.student))
               for p, q in zip(ma.parameters(), mb.parameters()))


def _status_mib(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in MiB. VmHWM, not getrusage's ru_maxrss:
    Linux carries ru_maxrss across fork + exec, so a child of a big parent reports the parent's size."""
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def peak_child(model: str, case: str, batch: int, mu: int, device: str) -> dict:
    """In a fresh process: build, then 2 steps; the peak memory they add (see the docstring)."""
    dev = torch.device(device)
    mpl = build_step(model, case == "ckpt", dev)
    batches = make_batches(2, batch, mu, MODELS[model]["size"], NUM_CLASSES, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        for i, b in enumerate(batches):
            timed_step(mpl, b, i, dev)
        return {"peak_mib": (torch.cuda.max_memory_allocated(dev) - base) / 2**20, "kind": "cuda max_memory_allocated"}
    base = _status_mib("VmRSS")
    for i, b in enumerate(batches):
        timed_step(mpl, b, i, dev)
    peak = _status_mib("VmHWM")
    return {"peak_mib": peak - base, "kind": "cpu peak RSS growth"}


def measure_peak(model: str, case: str, batch: int, mu: int, device: str, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--peak-child", f"{model},{case},{batch},{mu},{device}",
           "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module docstring
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(model: str, batch: int, mu: int, steps: int, warmup: int, device: torch.device,
                profile_dir: str | None, peak: bool, threads: int) -> dict:
    size = MODELS[model]["size"]
    images = batch * (1 + 2 * mu)
    print(f"\n== {model} at {size}x{size}: B={batch} labeled + 2 x {mu * batch} unlabeled ({images} teacher images, "
          f"{mu * batch} student images per step), {warmup} warm-up + {steps} timed steps per case", flush=True)
    steps_by_case = {case: build_step(model, case == "ckpt", device) for case in CASES}
    batches = make_batches(min(warmup + steps, 3), batch, mu, size, NUM_CLASSES, device)
    times = {case: [] for case in CASES}
    for i in range(warmup + steps):
        for case, mpl in steps_by_case.items():
            dt = timed_step(mpl, batches[i % len(batches)], i, device)
            if i >= warmup:
                times[case].append(dt)
        if i >= warmup:
            print(f"  round {i - warmup + 1}/{steps}: " + ", ".join(f"{c} {times[c][-1]:.2f}s" for c in CASES), flush=True)
    diff = max_param_diff(*steps_by_case.values())
    saved = {case: saved_mib(mpl, batches[0]) for case, mpl in steps_by_case.items()}
    peaks = {}
    if peak:
        for case in CASES:
            if device.type == "cuda":
                peaks[case] = peak_child(model, case, batch, mu, str(device))
            else:
                peaks[case] = measure_peak(model, case, batch, mu, str(device), threads)
    if profile_dir:
        os.makedirs(profile_dir, exist_ok=True)
        for case, mpl in steps_by_case.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                        + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
                timed_step(mpl, batches[0], warmup + steps, device)
            path = os.path.join(profile_dir, f"actckpt_{model}_{case}.json")
            prof.export_chrome_trace(path)
            print(f"  trace: {path}")
    med = {case: statistics.median(times[case]) for case in CASES}
    rows = [{"case": "s/step (median)", "plain": med["plain"], "ckpt": med["ckpt"], "ratio": med["ckpt"] / med["plain"],
             "note": "ckpt / plain: the price"},
            {"case": "s/step (min)", "plain": min(times["plain"]), "ckpt": min(times["ckpt"]),
             "ratio": min(times["ckpt"]) / min(times["plain"]), "note": "ckpt / plain"}]
    for net in ("teacher", "student"):
        rows.append({"case": f"saved MiB {net}", "plain": saved["plain"][net], "ckpt": saved["ckpt"][net],
                     "ratio": saved["plain"][net] / saved["ckpt"][net], "note": "plain / ckpt: the saving"})
    if peaks:
        rows.append({"case": "peak MiB", "plain": peaks["plain"]["peak_mib"], "ckpt": peaks["ckpt"]["peak_mib"],
                     "ratio": peaks["plain"]["peak_mib"] / max(peaks["ckpt"]["peak_mib"], 1e-9),
                     "note": f"plain / ckpt ({peaks['plain']['kind']})"})
    print("baseline: plain, ours: checkpointed")
    print_table([{"case": f"{r['case']} ({r['note']})", "baseline": r["plain"], "ours": r["ckpt"], "ratio": r["ratio"]}
                 for r in rows])
    print(f"max |dθ| ckpt vs plain after {warmup + steps} steps: {diff:.1e}")
    return {"model": model, "image_size": size, "batch": batch, "mu": mu, "teacher_images": images,
            "warmup_steps": warmup, "timed_steps": steps, "times_s": times, "rows": rows,
            "max_param_diff_end": diff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(parser, quick="WRN-28-2 only, B=4, 2 timed steps", threads=0,
                     threads_help="torch threads (0: torch's default)",
                     profile="write a Chrome trace of one step per case here")
    parser.add_argument("--batch", type=int, default=16, help="labeled batch for WRN-28-2")
    parser.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * batch (each view)")
    parser.add_argument("--resnet-batch", type=int, default=2)
    parser.add_argument("--resnet-mu", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--models", default="wrn28-2,resnet50", help="which models (--quick: wrn28-2 only)")
    parser.add_argument("--no-peak", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    if args.peak_child:
        model, case, batch, mu, device = args.peak_child.split(",")
        print(json.dumps(peak_child(model, case, int(batch), int(mu), device)))
        return 0
    device = torch.device(args.device)
    if args.quick:
        args.batch, args.steps, args.models = 4, 2, "wrn28-2"
    results = {"models": []}
    for model in args.models.split(","):
        batch, mu = (args.batch, args.mu) if model == "wrn28-2" else (args.resnet_batch, args.resnet_mu)
        steps = args.steps if model == "wrn28-2" else max(3, args.steps // 2)
        results["models"].append(bench_model(model, batch, mu, steps, args.warmup, device, args.profile,
                                             not args.no_peak, args.threads))
    print()
    write_results(args, "activation_checkpointing", results, tag=args.models.replace(",", "_"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
