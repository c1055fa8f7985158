"""The one-command acceptance run for a machine with a CUDA GPU (docs/cuda_testing.md):

    python benchmarks/gpu_acceptance.py            # on the GPU machine, from the checkout
    python benchmarks/gpu_acceptance.py --dry-run  # anywhere: the plan + tiny CPU versions

Stages, each timed, each recorded even when it fails (the run goes on and exits non-zero):
  1. build    the extension from this checkout with the CUDA kernels (MPL_FAST_CUDA=1).
  2. tests    the `cuda`-marked tests (pytest -m cuda) on the GPU.
  3. kernels  multi_tensor_dot, fused_sgd_ against torch's fused SGD, augment_apply against
              DALI's rand_augment and torchvision's RandAugment on the GPU; achieved bandwidth as a
              fraction of the card's peak (nominal, from the device name, and a measured copy).
  4. trainer  100 steps of `python -m mpl_fast.train` with --amp on CUDA, DALI GPU decode, on a
              generated ImageFolder.
One table is printed and the results are written as JSON (--json). Budget: under 8 minutes on
one H100. --dry-run runs the same stages on the CPU at toy sizes without CUDA (no build, tests
collected rather than run, DALI on its CPU backend), which CI runs so this script cannot rot.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Nominal HBM bandwidth (bytes/s) by device-name substring, most specific first.
PEAK_BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.039e12),
                  ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12)]
STAGE_TIMEOUT_S = {"build": 300, "tests": 240, "trainer": 240}


class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.failed = False

    def add(self, stage: str, item: str, value, note: str = "", ok: bool = True):
        self.rows.append(dict(stage=stage, item=item, value=value, note=note, ok=ok))
        self.failed |= not ok

    def print(self):
        width = max(len(f"{r['stage']} / {r['item']}") for r in self.rows) + 2
        print(f"{'stage / item':<{width}}{'value':>14}  note")
        for r in self.rows:
            value = f"{r['value']:.4g}" if isinstance(r["value"], float) else str(r["value"])
            flag = "" if r["ok"] else "FAILED: "
            print(f"{r['stage'] + ' / ' + r['item']:<{width}}{value:>14}  {flag}{r['note']}")


def _run(cmd, report: Report, stage: str, timeout: int, env=None) -> subprocess.CompletedProcess | None:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        report.add(stage, "seconds", round(time.perf_counter() - start, 1), f"timed out after {timeout} s", ok=False)
        return None
    seconds = round(time.perf_counter() - start, 1)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    report.add(stage, "seconds", seconds, f"exit {proc.returncode}: {tail[0][:120]}", ok=proc.returncode == 0)
    return proc


# ------------------------------------------------------------------ stages 1 and 2

def stage_build(report: Report, dry: bool):
    cmd = [sys.executable, "setup.py", "build_ext", "--inplace"]
    if dry:
        missing = [p for p in ("setup.py", "csrc/cuda") if not (REPO / p).exists()]
        report.add("build", "plan", "MPL_FAST_CUDA=1 " + " ".join(cmd[1:]), "dry run: not built",
                   ok=not missing)
        return
    _run(cmd, report, "build", STAGE_TIMEOUT_S["build"], env={"MPL_FAST_CUDA": "1"})


def stage_tests(report: Report, dry: bool):
    files = ["tests/ops/test_multi_tensor_dot.py", "tests/ops/test_fused_sgd.py", "tests/ops/test_augment.py"]
    if dry:  # collected, not run: the marker selects what a GPU would run
        proc = _run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-m", "cuda", "-p", "no:cacheprovider",
                     *files], report, "tests", STAGE_TIMEOUT_S["tests"])
        if proc is not None:
            count = sum(1 for line in proc.stdout.splitlines() if "::" in line)
            report.add("tests", "cuda tests collected", count, "dry run: not executed", ok=count > 0)
        return
    proc = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/"],
                report, "tests", STAGE_TIMEOUT_S["tests"])
    if proc is not None and "skipped" in proc.stdout.splitlines()[-1] and "passed" not in proc.stdout.splitlines()[-1]:
        report.add("tests", "cuda tests", "all skipped", "torch sees no GPU", ok=False)


# ------------------------------------------------------------------ stage 3: kernels

def _timer(device):
    import torch

    def measure(fn, iters: int) -> float:
        """Median seconds per call after two warm-up calls."""
        fn()
        fn()
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]
    return measure


def _peaks(device, measure):
    import torch

    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    nominal = next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)
    src = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = 2 * src.numel() / measure(lambda: dst.copy_(src), 10)
    return nominal, copy


def _bandwidth(report, stage, item, nbytes, seconds, peaks, note=""):
    nominal, copy = peaks
    report.add(stage, f"{item} ms", seconds * 1e3, note)
    if nominal or copy:
        fractions = []
        if nominal:
            fractions.append(f"{nbytes / seconds / nominal:.0%} of nominal peak")
        if copy:
            fractions.append(f"{nbytes / seconds / copy:.0%} of measured copy")
        report.add(stage, f"{item} GB/s", nbytes / seconds / 1e9, ", ".join(fractions))


def _param_list(device, scale: float):
    """A ResNet-50-like list of tensors (about 25M values at scale 1)."""
    import torch

    g = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 7, 7)] + [(256, 64, 1, 1), (64, 64, 3, 3), (64,)] * 12 + [(512, 256, 3, 3)] * 8 + \
             [(2048, 1024, 1, 1)] * 6 + [(1000, 2048), (1000,)]
    shapes = [tuple(max(1, int(d * scale)) if i == 0 else d for i, d in enumerate(s)) for s in shapes]
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def stage_kernels(report: Report, dry: bool):
    import torch

    from mpl_fast import ops

    device = torch.device("cpu" if dry else "cuda")
    measure = _timer(device)
    iters = 3 if dry else 20
    peaks = _peaks(device, measure)
    if peaks[1]:
        report.add("kernels", "copy GB/s", peaks[1] / 1e9, torch.cuda.get_device_name(device))

    params = _param_list(device, 0.02 if dry else 1.0)
    numel = sum(p.numel() for p in params)
    report.add("kernels", "parameters", numel, f"{len(params)} tensors")
    try:
        grads = [torch.randn_like(p) for p in params]
        seconds = measure(lambda: ops.multi_tensor_dot(params, grads), iters)
        _bandwidth(report, "kernels", "multi_tensor_dot fp32", 8 * numel, seconds, peaks)
    except Exception as e:  # noqa: BLE001 - recorded in the table, the run goes on
        report.add("kernels", "multi_tensor_dot", "error", str(e)[:120], ok=False)

    try:
        bufs = [torch.zeros_like(p) for p in params]
        ours = lambda: ops.fused_sgd_(params, grads, bufs, lr=0.01, momentum=0.9, weight_decay=5e-4,  # noqa: E731
                                      nesterov=True)
        seconds = measure(ours, iters)
        _bandwidth(report, "kernels", "fused_sgd_ fp32", 20 * numel, seconds, peaks)  # p, g, buf read; p, buf written
        torch_params = [p.clone().requires_grad_() for p in params]
        for p, g in zip(torch_params, grads):
            p.grad = g
        kind = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
        opt = torch.optim.SGD(torch_params, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True, **kind)
        theirs = measure(opt.step, iters)
        report.add("kernels", f"torch SGD({next(iter(kind))}) ms", theirs * 1e3, f"ours / torch = {seconds / theirs:.2f}")
    except Exception as e:  # noqa: BLE001
        report.add("kernels", "fused_sgd_", "error", str(e)[:120], ok=False)

    _augment_timings(report, device, measure, iters, dry, peaks)


def _augment_timings(report, device, measure, iters, dry, peaks):
    import torch

    from mpl_fast import augment

    n, size = (8, 32) if dry else (256, 224)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    try:
        ours = measure(lambda: augment.rand_augment(images, 2, 9, generator=torch.Generator().manual_seed(0)), iters)
        _bandwidth(report, "kernels", f"rand_augment {n}x3x{size}x{size}", 2 * images.numel(), ours, peaks,
                   f"{n / ours:.0f} images/s")
    except Exception as e:  # noqa: BLE001
        report.add("kernels", "rand_augment", "error", str(e)[:120], ok=False)
        ours = None
    try:
        from torchvision.transforms import RandAugment

        tv = RandAugment(2, 9)
        # torchvision draws one op sequence per call: per image, as a training loader applies it.
        theirs = measure(lambda: [tv(img) for img in images], max(1, iters // 4))
        report.add("kernels", "torchvision RandAugment ms", theirs * 1e3,
                   f"{n / theirs:.0f} images/s" + (f"; ours is {theirs / ours:.1f}x faster" if ours else ""))
    except Exception as e:  # noqa: BLE001
        report.add("kernels", "torchvision RandAugment", "error", str(e)[:120], ok=False)
    try:
        dali = _dali_rand_augment_seconds(images, dry, iters)
        report.add("kernels", "DALI rand_augment ms", dali * 1e3,
                   f"{n / dali:.0f} images/s" + (f"; ours / DALI = {ours / dali:.2f}" if ours else "") +
                   (" (DALI CPU backend)" if dry else ""))
    except Exception as e:  # noqa: BLE001
        report.add("kernels", "DALI rand_augment", "error", str(e)[:120], ok=False)


def _dali_rand_augment_seconds(images, dry: bool, iters: int) -> float:
    """Median seconds per batch of DALI's rand_augment on the same images (HWC)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def
    from nvidia.dali.auto_aug import rand_augment

    batch = [np.ascontiguousarray(img.permute(1, 2, 0).cpu().numpy()) for img in images]

    @pipeline_def(enable_conditionals=True, batch_size=len(batch), num_threads=2, device_id=None if dry else 0,
                  seed=0)
    def pipe():
        data = fn.external_source(source=lambda: batch, device="cpu", layout="HWC")
        if not dry:
            data = data.gpu()
        return rand_augment.rand_augment(data, n=2, m=9)

    p = pipe()
    p.build()
    p.run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        p.run()  # outputs are ready (synchronised) when run returns
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# ------------------------------------------------------------------ stage 4: trainer

def stage_trainer(report: Report, dry: bool, steps: int):
    from mpl_fast.data.tiny import write_tiny_imagefolder

    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_imagefolder(os.path.join(tmp, "data"), num_classes=4, train_per_class=40 if not dry else 6,
                                      val_per_class=4, size=64 if dry else 256, bad_files=False)
        cmd = [sys.executable, "-m", "mpl_fast.train", "--preset", "imagenet-10pct", "--steps", str(steps),
               "--data.dataset", "imagefolder", "--data.data-dir", data, "--data.loader", "dali",
               "--data.labeled-fraction", "0.5", "--data.val-per-class", "1", "--finetune.steps", "0",
               "--eval-every", str(10 * steps), "--checkpoint-every", "0", "--log-every", str(max(1, steps // 4)),
               "--output-dir", os.path.join(tmp, "run")]
        if dry:
            cmd += ["--device", "cpu", "--no-amp", "--model.name", "digits-cnn", "--data.image-size", "32",
                    "--data.batch-size", "2", "--data.mu", "2", "--threads", "1"]
        else:
            cmd += ["--device", "cuda", "--amp", "--data.batch-size", "32", "--data.mu", "2"]
        proc = _run(cmd, report, "trainer", STAGE_TIMEOUT_S["trainer"])
        if proc is not None and proc.returncode == 0:
            report.add("trainer", "steps", steps, ("CPU, no amp, DALI CPU decode" if dry else
                                                   "CUDA, --amp, DALI GPU decode") + ", generated ImageFolder")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the plan and tiny CPU versions of every stage")
    parser.add_argument("--json", default=None,
                        help="where to write the results (default: benchmarks/results/gpu_acceptance/<date>_<gpu|dry-run>.json)")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built")
    parser.add_argument("--steps", type=int, default=None, help="trainer steps (default 100; 2 with --dry-run)")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.dry_run else 100)
    if steps < 1:
        parser.error(f"--steps must be >= 1, got {steps}")

    report = Report()
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_acceptance: torch sees no CUDA GPU; run on a GPU machine, or pass --dry-run", file=sys.stderr)
            return 2
    start = time.perf_counter()
    if not args.skip_build:
        stage_build(report, args.dry_run)
    stage_tests(report, args.dry_run)
    stage_kernels(report, args.dry_run)
    stage_trainer(report, args.dry_run, steps)
    report.add("total", "seconds", round(time.perf_counter() - start, 1), "dry run (CPU)" if args.dry_run else "")
    report.print()
    import common  # noqa: PLC0415 - benchmarks/common.py, beside this script

    path = args.json or common.default_path("gpu_acceptance", "dry-run" if args.dry_run else "gpu")
    common.write_json(path, dict(header=common.header("gpu_acceptance", "cpu" if args.dry_run else "cuda"),
                                 dry_run=args.dry_run, failed=report.failed, rows=report.rows))
    print(f"results: {path}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
