"""Benchmark: what fp16 loss scaling costs in the MPL step, and why fp16 is refused on a CPU.

Cases (the same seeded models and batches; timed in alternation, one step of each in turn, so a
load spike on a shared machine hits all of them):
  fp32           mpl_fast.algo.MPL, no autocast, no scaler (the baseline)
  fp32+scaler    the same with an enabled GradScaler but no autocast: the cost of the scaling
                 machinery alone (scaled backward, unscale_, the inf flag, update, the flag in ok)
  bf16           the teacher's forward under bf16 autocast (--amp's default on a CPU)
  fp16+scaler    the teacher's forward under fp16 autocast with the scaler (--amp --amp-dtype fp16);
                 on a CPU this is the case the trainer refuses

"ratio" = fp32 s/step / case s/step (> 1: faster than fp32). "skipped" = overflow skips in the
timed steps (a fresh scaler at 2^16 may skip the first steps).

    python benchmarks/bench_amp_fp16.py [--quick] [--model digits-cnn|wrn28-2] [--steps 10]
        [--device cpu|cuda] [--json PATH] [--profile DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast.algo import MPL, MPLConfig, Schedules, StepPrecision  # noqa: E402
from mpl_fast.models import create_model  # noqa: E402
from mpl_fast.optim import FusedSGD  # noqa: E402

CASES = ("fp32", "fp32+scaler", "bf16", "fp16+scaler")
SHAPES = {"digits-cnn": (1, 8, 10), "wrn28-2": (3, 32, 10)}  # in_channels, side, classes


def build(case: str, model: str, device: torch.device, seed: int = 0) -> MPL:
    channels, _, classes = SHAPES[model]
    torch.manual_seed(seed)
    teacher, student = (create_model(model, classes, dropout=0.0, in_channels=channels).to(device) for _ in range(2))
    opts = [FusedSGD(m.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4) for m in (teacher, student)]
    sched = Schedules(total_steps=10_000, teacher_lr=0.05, student_lr=0.05, teacher_schedule="constant",
                      student_schedule="constant", uda_weight=1.0)
    dtype = {"bf16": torch.bfloat16, "fp16+scaler": torch.float16}.get(case)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if case.endswith("+scaler") else None
    return MPL(teacher, student, *opts, sched,
               MPLConfig(ema_decay=0.995, uda_temperature=0.7, uda_threshold=0.6, label_smoothing=0.15),
               precision=StepPrecision(autocast=autocast, grad_scaler=scaler))


def batches(model: str, batch: int, mu: int, n: int, device: torch.device, seed: int = 1):
    channels, side, classes = SHAPES[model]
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x_l = torch.randn(batch, channels, side, side, generator=g)
        x_uw = torch.randn(mu * batch, channels, side, side, generator=g)
        out.append(((x_l.to(device), torch.randint(0, classes, (batch,), generator=g).to(device)),
                    (x_uw.to(device), (x_uw + 0.3 * torch.randn(x_uw.shape, generator=g)).to(device))))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_flags(parser, quick="2 warm-up and 3 timed steps", device="cpu",
                            profile="write a torch.profiler Chrome trace per case")
    parser.add_argument("--model", default="digits-cnn", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mu", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (after 3 warm-up steps)")
    args = parser.parse_args()
    common.apply_threads(args.threads)
    device = torch.device(args.device)
    warmup, steps = (2, 3) if args.quick else (3, args.steps)
    mpls = {case: build(case, args.model, device) for case in CASES}
    data = batches(args.model, args.batch, args.mu, warmup + steps, device)
    times = {case: [] for case in CASES}
    for i, (labeled, unlabeled) in enumerate(data):
        for case, mpl in mpls.items():  # alternation: one step of each case in turn
            _sync(device)
            t0 = time.perf_counter()
            mpl.step(labeled, unlabeled, clock=i)
            _sync(device)
            if i >= warmup:
                times[case].append(time.perf_counter() - t0)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        for case, mpl in mpls.items():
            with torch.profiler.profile() as prof:
                mpl.step(*data[-1], clock=len(data))
            prof.export_chrome_trace(os.path.join(args.profile, f"amp_{case.replace('+', '_')}.json"))
    base = statistics.median(times["fp32"])
    rows = []
    for case, mpl in mpls.items():
        med = statistics.median(times[case])
        rows.append({"case": case, "s_per_step": med, "ratio_vs_fp32": base / med,
                     "skipped": int(mpl.skipped_total),
                     "scale": mpl.grad_scaler.get_scale() if mpl.grad_scaler is not None else None})
    print(f"MPL step, {args.model}, batch {args.batch} + 2x{args.mu * args.batch} unlabeled, {device}, "
          f"median of {steps} steps ({torch.get_num_threads()} threads)")
    print("s/step; baseline: fp32")
    common.print_table([{"case": f"{r['case']} (skipped {r['skipped']}, scale "
                                 f"{'-' if r['scale'] is None else format(r['scale'], '.0f')})",
                         "baseline": base, "ours": r["s_per_step"], "ratio": r["ratio_vs_fp32"]} for r in rows])
    common.write_results(args, "amp_fp16", {"model": args.model, "batch": args.batch, "mu": args.mu, "steps": steps,
                                            "rows": rows}, tag=args.model)


if __name__ == "__main__":
    main()
