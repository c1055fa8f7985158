"""The trainer: ``python -m mpl_fast.train [--preset digits] [--method mpl] [...]``.

With no arguments it trains MPL on scikit-learn's bundled 8x8 digits on the CPU (about a
minute) and prints the test accuracies of the student, its EMA, the teacher and the
finetuned student. Every number of a preset can be overridden by a flag named after its
place in the configuration tree (``--teacher.lr 0.1``, ``--mpl.uda-weight 2``,
``--data.labels-per-class 4``; see ``--help``).

The run writes to ``--output-dir`` (default runs/<preset>-<method>-<timestamp>):
config.json, split.json, metrics.jsonl (one line per log interval and per evaluation),
checkpoint.pt (atomic; every ``--checkpoint-every`` steps, at the end and on SIGINT/SIGTERM)
and summary.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
import typing

import torch

from mpl_fast import checkpoint as ckpt
from mpl_fast.algo import MPL, Schedules, finetune, larger_batches
from mpl_fast.config import FEEDBACK_MODES, METHODS, PRESETS, PSEUDO_LABEL_KINDS, TrainConfig, from_dict, preset, to_dict, validate
from mpl_fast.data.config import EMBEDDED_DATASETS, FILE_DATASETS
from mpl_fast.models import create_model
from mpl_fast.models.speed import compile_modules, to_channels_last, use_channels_last
from mpl_fast.optim import FusedSGD
from mpl_fast.parallel.precision import PrecisionPolicy, resolve_precision

CHOICES = {
    "method": METHODS, "mpl.feedback": FEEDBACK_MODES, "mpl.pseudo_labels": PSEUDO_LABEL_KINDS,
    "teacher.schedule": ("cosine", "constant"), "student.schedule": ("cosine", "constant"),
    "data.dataset": EMBEDDED_DATASETS + FILE_DATASETS, "data.loader": ("auto", "torch", "dali"),
    "data.randaug_policy": ("mpl", "torchvision"), "mpl.baseline": ("auto", "on", "off"),
}
# Flags with a short name besides their dotted one.
ALIASES = {"mpl.feedback": "--feedback", "data.data_dir": "--data-dir", "data.loader": "--loader"}
NOT_YET = {
    "model_parallel": "--model-parallel is not implemented yet (see issue 8)",
}


class TrainingStopped(RuntimeError):
    """Raised when too many consecutive steps were not finite."""


# ----------------------------------------------------------------------------- CLI

def _leaves(cls, prefix: str = ""):
    """(dotted name, type, default) of every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], name + ".")
        else:
            yield name, hints[f.name], f


def _parse_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    if base is bool:
        return bool
    nullable = type(None) in typing.get_args(tp)

    def parse(text: str):
        if nullable and text.lower() in ("none", "null"):
            return None
        return base(text)

    parse.__name__ = base.__name__
    return parse


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mpl_fast.train",
        description="Meta Pseudo Labels and its baselines. Defaults come from --preset; any flag overrides them.",
    )
    digits = preset("digits")
    parser.add_argument("--preset", default="digits", choices=sorted(PRESETS), help="named recipe (default: digits)")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue the run whose checkpoint.pt (or folder) this is; its config is used")
    parser.add_argument("--dry-run", action="store_true",
                        help="build teacher and student on the meta device (no memory, no data), print their "
                             "parameter counts and a per-device memory estimate of one MPL step, and exit")
    for name, tp, _field in _leaves(TrainConfig):
        if name == "preset":
            continue
        flag = "--" + name.replace("_", "-")
        flags = [flag] + ([ALIASES[name]] if name in ALIASES else [])
        kwargs = {"dest": name, "default": None, "help": f"default: the preset's (digits: {_get(digits, name)!r})"}
        if _parse_type(tp) is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*flags, type=_parse_type(tp), choices=CHOICES.get(name), **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    cfg = preset(args.preset)
    for name, _tp, _field in _leaves(TrainConfig):
        value = getattr(args, name, None) if name != "preset" else None
        if value is None:
            continue
        obj = cfg
        *path, leaf = name.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    return cfg


# ----------------------------------------------------------------------------- pieces

def _build_streams(cfg: TrainConfig):
    from mpl_fast.data import build_streams  # noqa: PLC0415

    try:
        return build_streams(cfg.data, seed=cfg.seed, device=cfg.device)
    except ModuleNotFoundError as exc:
        if "mpl_fast.data.files" in str(exc):
            raise SystemExit(f"error: preset {cfg.preset!r} reads {cfg.data.dataset} files from disk, and the "
                             f"file-based data sets (mpl_fast.data.files) are not in this build of mpl_fast yet; "
                             f"the embedded presets (digits, two-moons) work without them.") from None
        raise
    except (FileNotFoundError, NotADirectoryError) as exc:  # missing or malformed data directory
        raise SystemExit(f"error: {exc}") from None


def _make_model(cfg: TrainConfig, streams) -> torch.nn.Module:
    shape = streams.input_shape
    in_channels = shape[0] if len(shape) == 3 else 1
    model = create_model(cfg.model.name, streams.num_classes, dropout=cfg.model.dropout,
                         in_channels=in_channels).to(cfg.device)
    # The layout is set before the optimizers, the step guard and the EMA see the tensors.
    return to_channels_last(model) if use_channels_last(model, cfg.device, cfg.channels_last) else model


def _sgd(model: torch.nn.Module, opt) -> torch.optim.Optimizer:
    # torch.optim.SGD's math in one fused pass per step; it leaves p.grad untouched, so the
    # grad-dot feedback can still read g_u from .grad after the student's step.
    return FusedSGD(model.parameters(), lr=opt.lr, momentum=opt.momentum,
                    nesterov=opt.nesterov and opt.momentum > 0, weight_decay=opt.weight_decay)


def build_mpl(cfg: TrainConfig, streams) -> MPL:
    """Teacher, student (distinct random inits), optimizers and the MPL step object for ``cfg``."""
    student = _make_model(cfg, streams)
    teacher = _make_model(cfg, streams) if cfg.method != "supervised" else None
    m = cfg.mpl
    schedules = Schedules(
        total_steps=cfg.steps, teacher_lr=cfg.teacher.lr, student_lr=cfg.student.lr,
        teacher_warmup=cfg.teacher.warmup_steps, student_warmup=cfg.student.warmup_steps,
        teacher_schedule=cfg.teacher.schedule, student_schedule=cfg.student.schedule,
        min_lr_ratio=cfg.student.min_lr_ratio,
        student_wait=0 if cfg.method == "supervised" else m.student_wait_steps,
        uda_weight=m.uda_weight if cfg.method in ("mpl", "uda") else 0.0, uda_ramp=m.uda_ramp_steps)
    mpl = MPL(teacher, student, _sgd(teacher, cfg.teacher) if teacher is not None else None,
                _sgd(student, cfg.student), schedules, method=cfg.method, feedback=m.feedback,
                pseudo_label_kind=m.pseudo_labels, soft_temperature=m.soft_temperature,
                baseline=m.baseline, baseline_decay=m.baseline_decay, mpl_weight=m.mpl_weight, sup_weight=m.sup_weight, uda_temperature=m.uda_temperature,
                uda_threshold=m.uda_threshold, label_smoothing=m.label_smoothing, ema_decay=m.ema_decay,
                grad_clip_teacher=cfg.teacher.grad_clip, grad_clip_student=cfg.student.grad_clip,
                autocast=_precision(cfg).autocast)
    if cfg.compile:  # after MPL took the EMA copy: only the teacher's and student's forwards compile
        compile_modules(mpl.teacher, mpl.student)
    return mpl


def _precision(cfg: TrainConfig) -> PrecisionPolicy:
    """--amp: bf16 autocast of the teacher's forward (CPU and GPU); fp16 would need loss scaling."""
    policy = resolve_precision(cfg.amp, None, cfg.device)
    if policy.needs_loss_scaling:
        raise SystemExit("error: --amp on this GPU would need fp16 with loss scaling, which the trainer does "
                         "not implement yet (bf16 needs none: use a GPU with bf16 support, or drop --amp)")
    return policy


@torch.no_grad()
def accuracy(model: torch.nn.Module, batches) -> float | None:
    """Top-1 accuracy in percent over a finite iterable of batches (None when it is empty)."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64)
    total = 0
    for x, y in batches:
        correct = correct.to(y.device) + (model(x).argmax(1) == y).sum()
        total += len(y)
    model.train(was_training)
    return None if total == 0 else 100.0 * int(correct) / total


def _headline_model(cfg: TrainConfig) -> str:
    """What a method delivers: UDA's teacher; otherwise the (EMA, then finetuned) student."""
    if cfg.method == "uda":
        return "teacher"
    if cfg.finetune.steps > 0:
        return "finetuned"
    return "ema" if cfg.mpl.ema_decay > 0 else "student"


def _selection_model(cfg: TrainConfig) -> str:
    """The model whose best-validation weights are kept (and finetuned)."""
    if cfg.method == "uda":
        return "teacher"
    return "ema" if cfg.mpl.ema_decay > 0 else "student"


def _default_output_dir(cfg: TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.preset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")


class _Signals:
    """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the run

def run(cfg: TrainConfig, *, resume: str | None = None, progress: bool = True, quiet: bool = False,
        stop_after: int | None = None) -> dict:
    """Trains per ``cfg`` and returns the summary (also written to summary.json).

    ``stop_after`` (tests) behaves like a SIGTERM after that many steps: checkpoint and return.
    """
    state = None
    if resume is not None:
        path = os.path.join(resume, "checkpoint.pt") if os.path.isdir(resume) else resume
        if not os.path.isfile(path):
            raise SystemExit(f"error: --resume {resume}: no checkpoint.pt there")
        state = ckpt.load(path)
        cfg = from_dict(state["config"])
        cfg.output_dir = os.path.dirname(os.path.abspath(path))
    validate(cfg)
    for key, msg in NOT_YET.items():
        if getattr(cfg, key):
            raise SystemExit(f"error: {msg}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {cfg.device}: no CUDA GPU is visible to torch on this machine "
                         f"(use --device cpu)")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = cfg.output_dir or _default_output_dir(cfg)
    cfg.output_dir = out_dir
    os.makedirs(out_dir, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    torch.manual_seed(cfg.seed)
    streams = _build_streams(cfg)
    mpl = build_mpl(cfg, streams)
    start_step, clock_offset, best, elapsed_before = 0, 0, {"val": -1.0, "step": -1, "state": None}, 0.0
    if state is not None:
        mpl.load_state_dict(state["mpl"])
        if state["streams"] is not None:
            for name in ("labeled", "unlabeled"):
                getattr(streams, name).load_state_dict(state["streams"][name])
        else:
            say("warning: this data pipeline cannot save its position (DALI): the resumed run starts "
                "its data streams from the first batch again")
        torch.set_rng_state(state["rng"]["torch"])
        if torch.cuda.is_available() and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        start_step, clock_offset = int(state["step"]), int(state["clock_offset"])
        best = state["best"]
        elapsed_before = float(state["elapsed"])
        _truncate_metrics(os.path.join(out_dir, "metrics.jsonl"), start_step)
        say(f"resumed {out_dir} at step {start_step}")
    else:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(to_dict(cfg), f, indent=2)
        with open(os.path.join(out_dir, "split.json"), "w") as f:
            json.dump(streams.split, f)
        open(os.path.join(out_dir, "metrics.jsonl"), "w").close()
    resumable = all(hasattr(getattr(streams, n), "state_dict") for n in ("labeled", "unlabeled"))

    def checkpoint(step: int, elapsed: float) -> None:
        sd = mpl.state_dict()
        if not ckpt.all_finite([sd["student"], sd["teacher"] or {}, sd["ema"] or {}]):
            say(f"warning: not checkpointing step {step}: the weights are not finite")
            return
        ckpt.save_atomic({
            "config": to_dict(cfg), "step": step, "clock_offset": clock_offset, "mpl": sd,
            "streams": {n: getattr(streams, n).state_dict() for n in ("labeled", "unlabeled")} if resumable else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "best": best, "elapsed": elapsed,
        }, os.path.join(out_dir, "checkpoint.pt"))

    metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a")
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415
        bar = tqdm(total=cfg.steps, initial=start_step, desc=f"{cfg.method} {cfg.preset}", dynamic_ncols=True,
                   disable=None)
    t0 = time.perf_counter()
    t_log, step_log = t0, start_step
    labeled, unlabeled = streams.labeled, streams.unlabeled
    interrupted = None
    step = start_step
    with _Signals() as signals:
        while step < cfg.steps:
            mpl.step(next(labeled), next(unlabeled), clock=step - clock_offset)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                # The one host read per interval: sums of losses and h, and the skip counters.
                totals, n = mpl.take_totals()
                keys = list(totals)
                values = torch.stack([totals[k] for k in keys] + [mpl.skipped_total.float(),
                                                                  mpl.max_consecutive_skips.float()]).tolist()
                now = time.perf_counter()
                line = {"step": step, **{k: v / max(n, 1) for k, v in zip(keys, values)},
                        "skipped_total": int(values[-2]), "lr_teacher": mpl.schedules.teacher(step - 1 - clock_offset),
                        "lr_student": mpl.schedules.student(step - 1 - clock_offset),
                        "steps_per_s": (step - step_log) / max(now - t_log, 1e-9),
                        "seconds": elapsed_before + now - t0}
                t_log, step_log = now, step
                clock_offset = int(values[-2])  # the schedule clock counts applied steps only
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
                if bar is not None:
                    bar.set_postfix(sps=f"{line['steps_per_s']:.1f}", lt=f"{line['loss_teacher']:.3f}",
                                    ls=f"{line['loss_student']:.3f}", h=f"{line['h']:+.2e}", refresh=False)
                if values[-1] >= cfg.max_nonfinite:
                    metrics.close()
                    if bar is not None:
                        bar.close()
                    raise TrainingStopped(
                        f"stopped at step {step}: {cfg.max_nonfinite} steps in a row had a non-finite loss or h "
                        f"(all of them skipped; {int(values[-2])} skipped in total). Lower the learning rates "
                        f"or check the data; the last checkpoint holds the last finite state.")
            if bar is not None:
                bar.update(1)
            if step % cfg.eval_every == 0 and step < cfg.steps:
                _evaluate(mpl, streams, cfg, step, best, metrics, elapsed_before + time.perf_counter() - t0)
            if signals.received is not None or (stop_after is not None and step - start_step >= stop_after):
                interrupted = signals.received or signal.SIGTERM
                break
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                checkpoint(step, elapsed_before + time.perf_counter() - t0)
    if bar is not None:
        bar.close()
    seconds = elapsed_before + time.perf_counter() - t0
    if interrupted is not None:
        checkpoint(step, seconds)
        metrics.close()
        say(f"stopped by signal {interrupted} at step {step}; checkpoint saved. "
            f"Continue with: python -m mpl_fast.train --resume {out_dir}")
        return {"interrupted": True, "step": step, "output_dir": out_dir}

    _evaluate(mpl, streams, cfg, step, best, metrics, seconds)
    checkpoint(step, seconds)
    summary = _finish(cfg, mpl, streams, best, step, seconds, metrics)
    metrics.close()
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    say(_format_summary(summary))
    return summary


def _evaluate(mpl: MPL, streams, cfg: TrainConfig, step: int, best: dict, metrics, seconds: float) -> dict:
    """Validation (selection) and test (report only) accuracy of every model; keeps the best-val weights."""
    line = {"step": step, "eval": True, "seconds": seconds}
    for name, model in mpl.models().items():
        line[f"val_{name}"] = accuracy(model, streams.val)
        line[f"test_{name}"] = accuracy(model, streams.test)
    sel = _selection_model(cfg)
    val = line.get(f"val_{sel}")
    if val is not None and val > best["val"]:
        best.update(val=val, step=step,
                    state={k: v.detach().cpu().clone() for k, v in mpl.models()[sel].state_dict().items()})
    metrics.write(json.dumps(line) + "\n")
    metrics.flush()
    return line


def _finish(cfg: TrainConfig, mpl: MPL, streams, best: dict, step: int, seconds: float, metrics) -> dict:
    """Final accuracies, the finetuned student, and the summary dict."""
    val, test = {}, {}
    for name, model in mpl.models().items():
        val[name], test[name] = accuracy(model, streams.val), accuracy(model, streams.test)
    sel = _selection_model(cfg)
    selected = copy.deepcopy(mpl.models()[sel])
    if best["state"] is not None:  # best on validation (never on test)
        selected.load_state_dict(best["state"])
    val["selected"], test["selected"] = accuracy(selected, streams.val), accuracy(selected, streams.test)
    if cfg.finetune.steps > 0 and cfg.method != "uda":
        from tqdm import tqdm  # noqa: PLC0415

        batches = larger_batches(streams.labeled, cfg.finetune.batch_size)
        with tqdm(total=cfg.finetune.steps, desc="finetune student", dynamic_ncols=True, disable=None) as bar:
            finetune(selected, batches, cfg.finetune.steps, cfg.finetune.lr, cfg.finetune.momentum,
                     cfg.finetune.weight_decay, on_step=bar.update)
        val["finetuned"], test["finetuned"] = accuracy(selected, streams.val), accuracy(selected, streams.test)
    headline = _headline_model(cfg)
    if headline == "ema" or headline == "student":
        headline = "selected" if best["state"] is not None else headline
    metrics.write(json.dumps({"step": step, "final": True, **{f"val_{k}": v for k, v in val.items()},
                              **{f"test_{k}": v for k, v in test.items()}}) + "\n")
    return {
        "method": cfg.method, "preset": cfg.preset, "seed": cfg.seed, "steps": step, "seconds": round(seconds, 2),
        "feedback": cfg.mpl.feedback if cfg.method == "mpl" else None,
        "test_top1": test, "val_top1": val, "selected": {"model": sel, "step": best["step"], "val": best["val"]},
        "headline": {"model": headline, "test_top1": test.get(headline)},
        "skipped_steps": int(mpl.skipped_total), "output_dir": cfg.output_dir,
    }


def _format_summary(s: dict) -> str:
    names = [k for k in ("student", "ema", "teacher", "selected", "finetuned") if k in s["test_top1"]]
    fmt = lambda v: "  -  " if v is None else f"{v:5.1f}"  # noqa: E731
    rows = [f"{'model':<10} {'val':>6} {'test':>6}"]
    rows += [f"{n:<10} {fmt(s['val_top1'][n]):>6} {fmt(s['test_top1'][n]):>6}" for n in names]
    return (f"\n{s['method']} on {s['preset']} (seed {s['seed']}, {s['steps']} steps, {s['seconds']:.1f} s, "
            f"{s['skipped_steps']} skipped)\n" + "\n".join(rows) +
            f"\n=> {s['method']}: test top-1 {s['headline']['test_top1']:.2f}% ({s['headline']['model']})\n"
            f"   written to {s['output_dir']}")


def _truncate_metrics(path: str, step: int) -> None:
    """Drops metric lines written after the checkpoint a run resumes from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as f:
        f.writelines(keep)


# Classes and input shape per data set, for --dry-run (which reads no data); image folders are
# taken to be ImageNet.
_DRY_RUN_SHAPES = {"digits": (10, (1, 8, 8)), "two-moons": (2, (2,)), "cifar10": (10, (3, 32, 32)),
                   "cifar100": (100, (3, 32, 32)), "svhn": (10, (3, 32, 32)), "imagefolder": (1000, (3, 224, 224))}


def dry_run_report(cfg: TrainConfig, fsdp_devices: int = 8) -> str:
    """Parameter counts and per-device memory of one MPL step for ``cfg``, from meta-device models."""
    from mpl_fast.parallel.plan import measure_footprint, plan_mpl_memory  # noqa: PLC0415

    num_classes, shape = _DRY_RUN_SHAPES[cfg.data.dataset]
    if cfg.data.image_size and len(shape) == 3:
        shape = (shape[0], cfg.data.image_size, cfg.data.image_size)
    with torch.device("meta"):
        model = create_model(cfg.model.name, num_classes, dropout=cfg.model.dropout,
                             in_channels=shape[0] if len(shape) == 3 else 1)
    footprint = measure_footprint(model, shape)  # teacher and student share the architecture
    lines = [f"{cfg.preset}: {cfg.model.name}, {footprint.parameters:,} parameters per network "
             f"(teacher and student), input {shape}, labeled batch {cfg.data.batch_size}, "
             f"unlabeled {cfg.data.mu}x that (weak + strong)",
             "estimated peak memory of one MPL step per device (weights, gradients, momentum, g_u, activations):"]
    for precision in ("fp32", "bf16"):
        for layout, devices in (("single", 1), ("model-parallel", 2), ("fsdp", fsdp_devices)):
            plan = plan_mpl_memory(footprint, footprint, batch_size=cfg.data.batch_size, mu=cfg.data.mu,
                                   precision=precision, layout=layout, devices=devices)
            per_device = ", ".join(f"{b / 2**30:.1f}" for b in sorted(set(plan.per_device_bytes), reverse=True))
            lines.append(f"  {precision:4s} activations, {layout:14s} on {devices} device(s): {per_device} GiB")
    lines.append("an estimate (leaf-module outputs, no allocator slack or workspaces); see mpl_fast/parallel/plan.py")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = config_from_args(args)
    try:
        validate(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        print(dry_run_report(cfg))
        return 0
    try:
        run(cfg, resume=args.resume)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
