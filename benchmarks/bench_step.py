"""Benchmark of the whole MPL step: mpl_fast's fast path against a plain port-style step.

One step = teacher forward/backward over labeled + weak + strong unlabeled views (B + 2*mu*B
images), the student's step on the pseudo labels, the feedback (labeled batch re-run through
the updated student, h), the teacher's step and the student EMA. Every case starts from the same
seeded models, sees the same batches and the same dropout seeds, and cases are timed in
alternation (one step of each in turn), so a load spike on a shared machine hits all of them.

Cases (WRN-28-2 at 32x32; ResNet-50 at 224 unless --quick):
  plain            benchmarks/plain_mpl.py: per-tensor torch.dot loop, torch.optim.SGD(foreach=False),
                   .item() host reads, per-tensor EMA (the popular ports' way)
  fast             mpl_fast.algo.MPL with torch.optim.SGD
  fast+fusedsgd    mpl_fast.algo.MPL with mpl_fast.optim.FusedSGD for teacher and student
  ...+bf16         the same step under torch.autocast(bfloat16) (not numerically the same: speed only;
                   h_step1 in the JSON shows how far its feedback moves)
  ...+bf16teacher  only the teacher's forward under bf16 autocast (student and feedback in fp32)
  ...+bf16student  also the student's forward on the unlabeled batch (g_u) in bf16, the feedback's
                   labeled forward in fp32: with +bf16teacher, what ``mpl_fast.train --amp`` runs
  ...+cl           models in channels_last (mpl_fast.models.speed; fast+fusedsgd+cl is what
                   mpl_fast.train runs by default; the inputs stay NCHW, the first conv converts them)
  ...+compile      teacher and student compiled in place (mpl_fast.models.speed.compile_modules, as
                   ``mpl_fast.train --compile``; eager RNG, so the dropout masks match plain's)
  fast+fusedsgd+cl+compile  the combined fast path (= mpl_fast.train --compile); with --compile

"ratio" = plain s/step / case s/step (> 1: faster than plain). "|dθ| st1" = the largest
difference of any teacher/student parameter from the plain path's after the first step (fp32
cases agree to round-off; bf16 does not); "|dθ| end" = the same after all steps: round-off
differences of ~1e-7 in the teacher grow by ~100-1000x per step at these learning rates (a
random-init WRN in train-mode BatchNorm is that sensitive), so only the first is a correctness
check (tests/algo/test_step_equivalence.py is the real one). The per-phase breakdown profiles plain and the fused
fast path, NCHW and channels_last (PHASE_CASES), with torch.profiler ranges (teacher fwd/bwd,
student fwd/bwd, feedback fwd/bwd/dot, optimizers, EMA, the fast path's non-finite guard;
"other" = losses, concat, schedules) and the convolution ops' share of the step; compiled cases
get none (the hooks would break their graphs).

    python benchmarks/bench_step.py [--quick] [--batch 16] [--mu 7] [--steps 5] [--compile]
        [--json PATH] [--profile DIR] [--device cpu|cuda] [--nvtx]

On a GPU, under Nsight Systems (phase and op ranges as NVTX):
    nsys profile -t cuda,nvtx,osrt -o step python benchmarks/bench_step.py --device cuda --quick --nvtx
On a GPU the wall-clock phase table synchronises at every phase boundary (it measures phases,
not the overlapped step); the s/step table does not.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import RECIPE, STEP_KW, add_common_flags, apply_threads, make_batches, step_schedules, sync, write_results  # noqa: E402 - benchmarks/ is on the path when run as a script
from plain_mpl import PlainMPL, plain_sgd  # noqa: E402

from mpl_fast.algo import MPL, MPLConfig, StepPrecision  # noqa: E402
from mpl_fast.algo import feedback as fb  # noqa: E402
from mpl_fast.models import create_model  # noqa: E402
from mpl_fast.models.speed import compile_modules, to_channels_last  # noqa: E402
from mpl_fast.optim import FusedSGD  # noqa: E402

# ------------------------------------------------------------------ building the cases


def make_models(name: str, num_classes: int, dropout: float, seed: int):
    torch.manual_seed(seed)
    teacher = create_model(name, num_classes, dropout=dropout)
    student = create_model(name, num_classes, dropout=dropout)
    return teacher, student


class Case:
    """One way of running the step: a step object, and how to call it."""

    def __init__(self, name: str, stepper, *, autocast: torch.dtype | None = None, exact: bool = True):
        self.name, self.stepper, self.autocast = name, stepper, autocast
        self.exact = exact
        self.times: list[float] = []

    def step(self, labeled, unlabeled, clock: int, device: torch.device):
        ctx = torch.autocast(device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            return self.stepper.step(labeled, unlabeled, clock)


class AutocastForward(torch.nn.Module):
    """``module`` whose forward runs under bf16 autocast (the rest of the step stays fp32)."""

    def __init__(self, module: torch.nn.Module, device_type: str):
        super().__init__()
        self.module, self.device_type = module, device_type

    def forward(self, x):
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            return self.module(x).float()


def build_cases(model: str, num_classes: int, dropout: float, device: torch.device, variants: list[str]) -> list[Case]:
    teacher0, student0 = make_models(model, num_classes, dropout, seed=0)
    cases = []
    for variant in variants:
        teacher, student = copy.deepcopy(teacher0).to(device), copy.deepcopy(student0).to(device)
        parts = variant.split("+")
        if "cl" in parts:  # before the optimizers, guard and EMA take their references
            teacher, student = to_channels_last(teacher), to_channels_last(student)
        if "bf16teacher" in parts:
            teacher = AutocastForward(teacher, device.type)
        if parts[0] == "plain":
            stepper = PlainMPL(teacher, student, plain_sgd(teacher, **RECIPE), plain_sgd(student, **RECIPE),
                               step_schedules(), **STEP_KW)
        else:
            opt = FusedSGD if "fusedsgd" in parts else torch.optim.SGD
            student_autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "bf16student" in parts
                                else contextlib.nullcontext)
            stepper = MPL(teacher, student, opt(teacher.parameters(), **RECIPE), opt(student.parameters(), **RECIPE),
                          step_schedules(), MPLConfig(feedback="grad-dot", baseline="off", **STEP_KW), method="mpl",
                          precision=StepPrecision(student_autocast=student_autocast))
        if "compile" in parts:  # in place, after the EMA copy was taken: the step object keeps its modules
            compile_modules(teacher, student)
        cases.append(Case(variant, stepper, autocast=torch.bfloat16 if "bf16" in parts else None,
                          exact=not any(p.startswith("bf16") for p in parts)))
    return cases


def run_step(case: Case, batch, i: int, device: torch.device) -> float:
    """Seconds for one step of ``case`` on ``batch`` (its h is kept in ``case.last_h``)."""
    torch.manual_seed(1000 + i)  # the same dropout masks in every case
    sync(device)
    t0 = time.perf_counter()
    values = case.step(*batch, clock=i, device=device)
    sync(device)
    dt = time.perf_counter() - t0
    case.last_h = float(values["h"])  # after the timing: a host read is fine here
    return dt


def models_of(case: Case):
    return case.stepper.teacher, case.stepper.student


def max_param_diff(a: Case, b: Case) -> float:
    diff = 0.0
    for ma, mb in zip(models_of(a), models_of(b)):
        for pa, pb in zip(ma.parameters(), mb.parameters()):
            diff = max(diff, (pa.detach().float() - pb.detach().float()).abs().max().item())
    return diff


# ------------------------------------------------------------------ per-phase ranges


class PhaseRanges:
    """Puts torch.profiler ranges around the step's phases from the outside (hooks and method
    wrappers on the instances; nothing in mpl_fast is edited). Backward passes are named by the
    forward that preceded them: a backward right after the student's train-mode forward is the
    student's, one right after the feedback's forward (the fast step takes g_l' by backward) and
    ``autograd.grad`` (the plain step's) are the feedback's, any other is the teacher's."""

    def __init__(self, stepper, sync=None):
        self.stepper = stepper
        self.sync = sync or (lambda: None)  # on a GPU, wall times need a sync at each boundary
        self.last_forward = None
        self.open: list = []
        self.undo: list = []
        self.wall_s: dict[str, float] = {}  # wall time per phase (sync'd by the ops themselves on CPU)

    @contextlib.contextmanager
    def _range(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        with torch.profiler.record_function(name):
            yield
            self.sync()
        self.wall_s[name] = self.wall_s.get(name, 0.0) + time.perf_counter() - t0

    def _wrap_method(self, obj, attr: str, name: str):
        original, had_own = getattr(obj, attr), attr in vars(obj)

        def wrapped(*args, **kwargs):
            with self._range(name):
                return original(*args, **kwargs)

        setattr(obj, attr, wrapped)
        self.undo.append(lambda: setattr(obj, attr, original) if had_own else delattr(obj, attr))

    def _hook_forward(self, module, name_fn):
        def pre(mod, args):
            name = name_fn(mod)
            self.last_forward = name
            rng = self._range(name)
            rng.__enter__()
            self.open.append(rng)

        def post(mod, args, out):
            self.open.pop().__exit__(None, None, None)

        self.undo.append(module.register_forward_pre_hook(pre).remove)
        self.undo.append(module.register_forward_hook(post).remove)

    def __enter__(self):
        s = self.stepper
        self._hook_forward(s.teacher, lambda m: "teacher fwd")
        self._hook_forward(s.student, lambda m: "student fwd" if m.training else "feedback fwd")
        self._wrap_method(s.teacher_opt, "step", "teacher optimizer")
        self._wrap_method(s.student_opt, "step", "student optimizer")
        if isinstance(s, MPL):
            if s.ema is not None:
                self._wrap_method(s.ema, "update", "ema")
            for guard in (s.student_guard, s.teacher_guard):
                self._wrap_method(guard, "save", "guard (non-finite undo)")
                self._wrap_method(guard, "restore_unless", "guard (non-finite undo)")
            original_dot = fb.grad_dot

            def dot(*args, **kwargs):
                with self._range("feedback dot"):
                    return original_dot(*args, **kwargs)

            fb.grad_dot = dot
            self.undo.append(lambda: setattr(fb, "grad_dot", original_dot))
        else:
            self._wrap_method(s, "_update_ema", "ema")
            self._wrap_method(s, "_feedback_dot", "feedback dot")
        original_backward, original_grad = torch.Tensor.backward, torch.autograd.grad
        phases = self

        def backward(tensor, *args, **kwargs):
            name = {"student fwd": "student bwd", "feedback fwd": "feedback bwd"}.get(phases.last_forward,
                                                                                 "teacher bwd")
            phases.last_forward = None  # the next backward without a forward in between is the teacher's
            with phases._range(name):
                return original_backward(tensor, *args, **kwargs)

        def grad(*args, **kwargs):
            phases.last_forward = None
            with phases._range("feedback bwd"):
                return original_grad(*args, **kwargs)

        torch.Tensor.backward = backward
        torch.autograd.grad = grad
        self.undo.append(lambda: setattr(torch.Tensor, "backward", original_backward))
        self.undo.append(lambda: setattr(torch.autograd, "grad", original_grad))
        return self

    def __exit__(self, *exc):
        for undo in reversed(self.undo):
            undo()


# Cases with a per-phase breakdown. Not the compiled ones: the phase hooks would run inside the
# compiled forward and break its graph (their share is in the s/step table only).
PHASE_CASES = ("plain", "fast+fusedsgd", "fast+fusedsgd+cl")
PHASES = ("teacher fwd", "teacher bwd", "student fwd", "student bwd", "feedback fwd", "feedback bwd", "feedback dot",
          "teacher optimizer", "student optimizer", "ema", "guard (non-finite undo)")


COMBINED = "fast+fusedsgd+cl+compile"  # what mpl_fast.train --compile runs


def phase_table(per_phase: dict, step_total: float, steps: int) -> dict:
    phases = {p: round(1e3 * per_phase.get(p, 0.0) / steps, 1) for p in PHASES}
    phases["other"] = round(1e3 * step_total / steps - sum(phases.values()), 1)
    phases["step"] = round(1e3 * step_total / steps, 1)
    return phases


def time_phases(case: Case, batches, first: int, steps: int, device: torch.device) -> dict:
    """ms per step in each phase (and 'other'), wall clock, no profiler running."""
    total = 0.0
    with PhaseRanges(case.stepper, sync=lambda: sync(device)) as ranges:
        for i in range(first, first + steps):
            total += run_step(case, batches[i % len(batches)], i, device)
    return phase_table(ranges.wall_s, total, steps)


def profile_phases(case: Case, batches, first: int, steps: int, device: torch.device, trace_path: str | None) -> dict:
    """ms per step in each phase from torch.profiler's key_averages (profiler overhead included);
    writes the Chrome trace to ``trace_path`` when given."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with PhaseRanges(case.stepper), torch.profiler.profile(activities=activities) as prof:
        for i in range(first, first + steps):
            with torch.profiler.record_function("mpl step"):
                run_step(case, batches[i % len(batches)], i, device)
    if trace_path:
        prof.export_chrome_trace(trace_path)
    events = prof.key_averages()
    totals = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES + ("mpl step",)}
    step_total = totals.pop("mpl step", 0.0)
    table = phase_table(totals, step_total, steps)
    # Self time of every convolution op (forward, backward, oneDNN or native): how much of the
    # step no change outside the convolution kernels can touch.
    conv_s = sum(e.self_cpu_time_total for e in events if "conv" in e.key.lower()) / 1e6
    table["conv (self time, all phases)"] = round(1e3 * conv_s / steps, 1)
    table["conv share %"] = round(100 * conv_s / max(step_total, 1e-9), 1)
    return table


# ------------------------------------------------------------------ the benchmark


def bench_model(model: str, size: int, batch: int, mu: int, steps: int, warmup: int, variants: list[str],
                device: torch.device, dropout: float, profile_dir: str | None, num_classes: int = 10,
                phases: bool = True) -> dict:
    print(f"\n== {model} at {size}x{size}: B={batch} labeled + 2 x {mu * batch} unlabeled "
          f"({batch * (1 + 2 * mu)} images/step), {warmup} warm-up + {steps} timed steps per case", flush=True)
    cases = build_cases(model, num_classes, dropout, device, variants)
    batches = make_batches(min(warmup + steps, 4), batch, mu, size, num_classes, device)
    for case in cases:
        case.warmup_s = 0.0
    for i in range(warmup):  # warm-up (and, for compiled cases, compilation), in alternation too
        for case in cases:
            case.warmup_s += run_step(case, batches[i % len(batches)], i, device)
        if i == 0:  # one step from the same state: the paths must agree to round-off here
            plain_case = next(c for c in cases if c.name == "plain")
            for case in cases:
                case.first_step_diff = max_param_diff(case, plain_case)
                case.first_step_h = case.last_h
    for case in cases:
        print(f"  warm-up {case.name}: {case.warmup_s:.1f} s, max|dθ| vs plain after step 1: "
              f"{case.first_step_diff:.1e}, h of step 1: {case.first_step_h:+.5f}", flush=True)
    for i in range(warmup, warmup + steps):  # alternate: one step of each case in turn
        for case in cases:
            case.times.append(run_step(case, batches[i % len(batches)], i, device))
        print(f"  round {i - warmup + 1}/{steps}: " + ", ".join(f"{c.name} {c.times[-1]:.2f}s" for c in cases), flush=True)
    images = batch * (1 + 2 * mu)
    plain = next(c for c in cases if c.name == "plain")
    plain_s = statistics.median(plain.times)
    rows = []
    for case in cases:
        s = statistics.median(case.times)
        rows.append({"case": case.name, "s_per_step": round(s, 4), "min_s": round(min(case.times), 4),
                     "images_per_s": round(images / s, 1), "ratio_vs_plain": round(plain_s / s, 3),
                     "max_param_diff_vs_plain_step1": case.first_step_diff, "h_step1": case.first_step_h,
                     "max_param_diff_vs_plain_end": max_param_diff(case, plain), "exact": case.exact,
                     "warmup_s": round(case.warmup_s, 2)})
    combined = next((r for r in rows if r["case"] == COMBINED), None)
    if combined is not None:
        print(f"combined fast path ({COMBINED}) vs plain: {combined['ratio_vs_plain']:.2f}x (medians), "
              f"{min(plain.times) / combined['min_s']:.2f}x (minima)")
    print(f"{'case':<26} {'s/step':>8} {'min':>8} {'img/s':>8} {'ratio':>7} {'|dθ| st1':>9} {'|dθ| end':>9} {'warm-up s':>9}")
    for r in rows:
        print(f"{r['case']:<26} {r['s_per_step']:>8.3f} {r['min_s']:>8.3f} {r['images_per_s']:>8.1f} "
              f"{r['ratio_vs_plain']:>7.2f} {r['max_param_diff_vs_plain_step1']:>9.1e} "
              f"{r['max_param_diff_vs_plain_end']:>9.1e} {r['warmup_s']:>9.1f}")
    # Per-phase breakdown of plain and of the fused fast path: wall clock (2 steps, no profiler),
    # then torch.profiler (1 step; its key_averages, and the Chrome trace with --profile).
    breakdown, profiled = {}, {}
    first = warmup + steps
    for case in cases:
        if not phases or case.name not in PHASE_CASES:
            continue
        breakdown[case.name] = time_phases(case, batches, first, 2, device)
        trace = None
        if profile_dir:
            os.makedirs(profile_dir, exist_ok=True)
            trace = os.path.join(profile_dir, f"step_{model}_{case.name.replace('+', '_')}.json")
        profiled[case.name] = profile_phases(case, batches, first + 2, 1, device, trace)
    if breakdown:
        names = list(breakdown)
        print("\nper-phase ms/step: wall clock (2 steps) | torch.profiler key_averages (1 step, overhead included)")
        print(f"{'phase':<26}" + "".join(f"{n:>15}" for n in names) + "".join(f"{'%':>7}" for n in names)
              + " |" + "".join(f"{n:>15}" for n in names))
        for phase in PHASES + ("other", "step"):
            line = f"{phase:<26}" + "".join(f"{breakdown[n][phase]:>15.1f}" for n in names)
            line += "".join(f"{100 * breakdown[n][phase] / max(breakdown[n]['step'], 1e-9):>6.1f}%" for n in names)
            line += " |" + "".join(f"{profiled[n][phase]:>15.1f}" for n in names)
            print(line)
        for key in ("conv (self time, all phases)", "conv share %"):
            print(f"{key:<26}" + " " * (22 * len(names)) + " |" + "".join(f"{profiled[n][key]:>15.1f}" for n in names))
    return {"model": model, "image_size": size, "batch": batch, "mu": mu, "images_per_step": images,
            "warmup_steps": warmup, "timed_steps": steps, "rows": rows, "phases_ms_wall": breakdown,
            "phases_ms_profiler": profiled}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_flags(parser, quick="WRN-28-2 only, fewer cases", threads=0,
                     threads_help="torch threads (0: torch's default)",
                     profile="write Chrome traces of the profiled steps here")
    parser.add_argument("--batch", type=int, default=16, help="labeled batch for WRN-28-2")
    parser.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * batch (each view)")
    parser.add_argument("--resnet-batch", type=int, default=2)
    parser.add_argument("--resnet-mu", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help=f"also time the combined fast path {COMBINED} (torch.compile: slow to compile)")
    parser.add_argument("--cases", default=None, help="comma-separated WRN cases (default: all)")
    parser.add_argument("--models", default="wrn28-2,resnet50", help="which models (--quick: wrn28-2 only)")
    parser.add_argument("--no-phases", action="store_true", help="skip the per-phase breakdown")
    parser.add_argument("--nvtx", action="store_true",
                        help="emit NVTX ranges for every op and phase (for Nsight Systems: nsys profile -t cuda,nvtx,osrt)")
    args = parser.parse_args(argv)
    apply_threads(args.threads)
    device = torch.device(args.device)
    wrn_cases = ["plain", "fast", "fast+fusedsgd", "fast+fusedsgd+bf16", "fast+fusedsgd+cl"]
    if args.quick:
        wrn_cases = ["plain", "fast+fusedsgd", "fast+fusedsgd+cl"]
    if args.cases:
        wrn_cases = args.cases.split(",")
    if args.compile:
        wrn_cases.append(COMBINED)
    results = {"models": []}
    models = ["wrn28-2"] if args.quick else args.models.split(",")
    nvtx = torch.autograd.profiler.emit_nvtx() if args.nvtx else contextlib.nullcontext()
    nvtx.__enter__()
    if "wrn28-2" in models:
        results["models"].append(bench_model("wrn28-2", 32, args.batch, args.mu, args.steps, args.warmup, wrn_cases,
                                             device, dropout=0.2, profile_dir=args.profile,
                                             phases=not args.no_phases))
    if "resnet50" in models:
        results["models"].append(bench_model("resnet50", 224, args.resnet_batch, args.resnet_mu, max(2, args.steps // 2),
                                             1, ["plain", "fast+fusedsgd", "fast+fusedsgd+cl", "fast+fusedsgd+bf16"], device,
                                             dropout=0.0, profile_dir=args.profile, phases=not args.no_phases))
    nvtx.__exit__(None, None, None)
    print()
    write_results(args, "step", results, tag="_".join(models))
    return 0


if __name__ == "__main__":
    sys.exit(main())
