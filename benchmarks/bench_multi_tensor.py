"""Benchmark of the multi-tensor ops: ``multi_tensor_dot`` and the fused SGD step.

Parameter lists of real models (built on the meta device, then materialised as random fp32
tensors): WRN-28-2 (1.5M values), ResNet-50 (25.6M), EfficientNet-B7 (66M), plus 2000 small
tensors of 500 values (per-tensor overhead dominates).

dot baselines: a Python loop of torch.dot, torch.cat then torch.dot, torch._foreach_mul + sums,
torch.compile of the loop; yardstick: one torch.dot over pre-flattened buffers (what a perfect
fused pass reaches). step baselines: torch.optim.SGD(foreach=True) and (fused=True).
"ratio" = baseline time / ours (> 1: ours is faster). "% limit" = on CPU, ours' speed as a
percentage of the pre-flattened dot (or, for the step, ours' bytes/s as a percentage of the
pre-flattened dot's bytes/s); on a GPU, bytes moved / time / peak memory bandwidth.

    python benchmarks/bench_multi_tensor.py [--quick] [--json PATH] [--profile DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402 - benchmarks/ is on the path when run as a script

from mpl_fast import ops  # noqa: E402
from mpl_fast.optim import FusedSGD  # noqa: E402

# Peak memory bandwidth (GB/s) of cards the project runs on, by name fragment.
PEAK_GBPS = {"H200": 4800.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100-SXM4-80GB": 2039.0, "A100": 1555.0}


# ------------------------------------------------------------------ parameter lists


def wrn_28_2_shapes() -> list[tuple]:
    """Parameter shapes of WRN-28-2 (CIFAR, 10 classes): 1.47M values."""
    shapes = [(16, 3, 3, 3)]
    in_ch = 16
    for width in (32, 64, 128):
        for block in range(4):
            cin = in_ch if block == 0 else width
            shapes += [(cin,), (cin,), (width, cin, 3, 3), (width,), (width,), (width, width, 3, 3)]
            if block == 0 and cin != width:
                shapes.append((width, cin, 1, 1))
        in_ch = width
    return shapes + [(128,), (128,), (10, 128), (10,)]


def model_shapes(name: str) -> list[tuple]:
    import torchvision  # noqa: PLC0415 - only for the shapes of two reference models

    with torch.device("meta"):
        model = {"resnet50": torchvision.models.resnet50, "efficientnet_b7": torchvision.models.efficientnet_b7}[name]()
    return [tuple(p.shape) for p in model.parameters()]


def cases(quick: bool) -> dict[str, list[tuple]]:
    out = {"wrn_28_2": wrn_28_2_shapes(), "resnet50": model_shapes("resnet50")}
    if not quick:
        out["efficientnet_b7"] = model_shapes("efficientnet_b7")
    out["2000x500"] = [(500,)] * 2000
    return out


def make(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device) for s in shapes]


# ------------------------------------------------------------------ timing


def time_all(fns: dict, device, repeats) -> dict:
    """Best wall time (s) per candidate, measured round-robin (one sample of each in turn), so
    load from other processes on a shared machine hits every candidate alike; the minimum is
    the least disturbed sample. The syncs are the benchmark's, never the ops'."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inner = {}
    for name, fn in fns.items():  # warm-up, and enough calls per sample to last ~20 ms
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        inner[name] = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: min(v) for name, v in samples.items()}


# ------------------------------------------------------------------ dot


def dot_loop(xs, ys):
    total = torch.zeros((), device=xs[0].device)
    for x, y in zip(xs, ys):
        total = total + torch.dot(x.reshape(-1), y.reshape(-1))
    return total


def dot_cat(xs, ys):
    return torch.dot(torch.cat([x.reshape(-1) for x in xs]), torch.cat([y.reshape(-1) for y in ys]))


def dot_foreach(xs, ys):
    return torch.stack([p.sum() for p in torch._foreach_mul(xs, ys)]).sum()


def bench_dot(name, shapes, device, repeats, use_compile, peak):
    xs, ys = make(shapes, device, 0), make(shapes, device, 1)
    flat_x = torch.cat([x.reshape(-1) for x in xs])
    flat_y = torch.cat([y.reshape(-1) for y in ys])
    n = flat_x.numel()
    expected = float(torch.dot(flat_x.double(), flat_y.double()))
    got = float(ops.multi_tensor_dot(xs, ys))
    assert abs(got - expected) <= 1e-5 * float((flat_x.double().abs() * flat_y.double().abs()).sum()) + 1e-6, (got, expected)
    fns = {"ours": lambda: ops.multi_tensor_dot(xs, ys), "flat": lambda: torch.dot(flat_x, flat_y),
           "torch.dot loop": lambda: dot_loop(xs, ys), "cat + dot": lambda: dot_cat(xs, ys),
           "_foreach_mul + sum": lambda: dot_foreach(xs, ys)}
    if use_compile:
        compiled = torch.compile(dot_loop)
        start = time.perf_counter()
        compiled(xs, ys)
        print(f"  [{name}] torch.compile of the loop: first call {time.perf_counter() - start:.1f} s", flush=True)
        fns["compile(loop)"] = lambda: compiled(xs, ys)
    times = time_all(fns, device, repeats)
    t_ours, t_flat = times.pop("ours"), times.pop("flat")
    bytes_read = 2 * 4 * n
    rows = []
    for base, t_base in times.items():
        rows.append({"op": "dot", "case": name, "tensors": len(shapes), "values": n, "baseline": base,
                     "baseline_ms": t_base * 1e3, "ours_ms": t_ours * 1e3, "ratio": t_base / t_ours})
    limit = (bytes_read / t_ours / 1e9) / peak * 100 if peak else t_flat / t_ours * 100
    rows.append({"op": "dot", "case": name, "tensors": len(shapes), "values": n, "baseline": "pre-flattened dot (yardstick)",
                 "baseline_ms": t_flat * 1e3, "ours_ms": t_ours * 1e3, "ratio": t_flat / t_ours,
                 "ours_GBps": bytes_read / t_ours / 1e9, "flat_GBps": bytes_read / t_flat / 1e9, "pct_limit": limit})
    return rows, t_flat


# ------------------------------------------------------------------ step


def bench_step(name, shapes, device, repeats, t_flat_dot, peak):
    hyper = dict(lr=1e-6, momentum=0.9, nesterov=True, weight_decay=5e-4)
    params = [torch.nn.Parameter(p) for p in make(shapes, device, 2)]
    for p, g in zip(params, make(shapes, device, 3)):
        p.grad = g
    n = sum(p.numel() for p in params)
    optimizers = {"ours": FusedSGD(params, **hyper), "ours keep_update": FusedSGD(params, keep_update=True, **hyper),
                  "SGD foreach=True": torch.optim.SGD(params, foreach=True, **hyper),
                  "SGD foreach=False": torch.optim.SGD(params, foreach=False, **hyper)}
    try:
        fused = torch.optim.SGD(params, fused=True, **hyper)
        fused.step()
        optimizers["SGD fused=True"] = fused
    except (RuntimeError, ValueError) as exc:
        print(f"  [{name}] torch.optim.SGD(fused=True) unavailable on {device}: {exc}", flush=True)
    times = time_all({k: opt.step for k, opt in optimizers.items()}, device, repeats)
    t_ours = times["ours"]
    bytes_moved = 5 * 4 * n  # read p, g, buf; write p, buf
    rows = []
    for base, t_base in times.items():
        if base.startswith("ours"):
            continue
        rows.append({"op": "step", "case": name, "tensors": len(shapes), "values": n, "baseline": base,
                     "baseline_ms": t_base * 1e3, "ours_ms": t_ours * 1e3, "ratio": t_base / t_ours})
    # CPU limit: the bandwidth the pre-flattened dot reached (bytes/s), applied to the step's bytes.
    limit = (bytes_moved / t_ours / 1e9) / peak * 100 if peak else (bytes_moved / t_ours) / (2 * 4 * n / t_flat_dot) * 100
    rows.append({"op": "step", "case": name, "tensors": len(shapes), "values": n, "baseline": "ours keep_update (Δθ written)",
                 "baseline_ms": times["ours keep_update"] * 1e3, "ours_ms": t_ours * 1e3,
                 "ratio": times["ours keep_update"] / t_ours, "ours_GBps": bytes_moved / t_ours / 1e9, "pct_limit": limit})
    return rows


# ------------------------------------------------------------------ main


def machine(device) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), torch threads {torch.get_num_threads()}"


def print_table(rows):
    common.print_table([{"case": f"{r['op']} {r['case']} vs {r['baseline']}", "baseline": r["baseline_ms"],
                         "ours": r["ours_ms"], "ratio": r["ratio"], "pct_limit": r.get("pct_limit")} for r in rows],
                       unit=" ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_flags(parser, quick="small cases, few repeats, no torch.compile",
                            threads_help="torch.set_num_threads (CPU)",
                            profile="write a torch.profiler Chrome trace of one call of each op here")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--peak-gbps", type=float, default=None, help="GPU peak memory bandwidth (default: by card name)")
    args = parser.parse_args()
    repeats = args.repeats or (5 if args.quick else 15)
    common.apply_threads(args.threads)
    peak = None
    if args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = args.peak_gbps or next((v for k, v in PEAK_GBPS.items() if k in name), None)
    print(f"device: {machine(args.device)}; backend {ops.backend()}; peak {peak or 'n/a'} GB/s", flush=True)

    rows = []
    for name, shapes in cases(args.quick).items():
        use_compile = not (args.quick or args.no_compile) and len(shapes) <= 400
        dot_rows, t_flat = bench_dot(name, shapes, args.device, repeats, use_compile, peak)
        rows += dot_rows
        rows += bench_step(name, shapes, args.device, repeats, t_flat, peak)
        print_table([r for r in rows if r["case"] == name])
        print(flush=True)
    print("== all ==")
    print_table(rows)

    common.write_results(args, "multi_tensor", {"peak_GBps": peak, "rows": rows},
                         tag=f"{args.device}_{torch.get_num_threads()}thread")

    if args.profile:
        shapes = wrn_28_2_shapes()
        xs, ys = make(shapes, args.device, 0), make(shapes, args.device, 1)
        params = [torch.nn.Parameter(p) for p in xs]
        for p, g in zip(params, ys):
            p.grad = g
        opt = FusedSGD(params, lr=1e-6, momentum=0.9, keep_update=True)
        with torch.profiler.profile() as prof:
            ops.multi_tensor_dot(xs, ys)
            dot_loop(xs, ys)
            opt.step()
        os.makedirs(args.profile, exist_ok=True)
        path = os.path.join(args.profile, "bench_multi_tensor_trace.json")
        prof.export_chrome_trace(path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
