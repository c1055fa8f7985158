"""The command line of ``python -m mpl_fast.train``: one flag per leaf of the config tree
(``--teacher.lr``, ``--mpl.uda-weight``, ...), defaults from ``--preset`` (or ``--config
FILE``), choices taken from the fields' Literal types."""

from __future__ import annotations

import argparse
import typing

from mpl_fast.algo.config import literal_choices
from mpl_fast.train.config import PRESETS, TrainConfig, leaves, preset, set_field
from mpl_fast.train.config_file import read_config_file
from mpl_fast.train.errors import EXIT_CODES_HELP
from mpl_fast.train.resume_flags import RESUMABLE

# Flags with a short name besides their dotted one.
ALIASES = {"mpl.feedback": "--feedback", "data.data_dir": "--data-dir", "data.loader": "--loader"}
# Extra help for flags whose meaning depends on how the run is launched.
HELP_NOTES = {
    "data.batch_size": "per rank under torchrun: the global batch is WORLD_SIZE times this (WORLD_SIZE/2 "
                       "with --model-parallel, whose two halves read the same shards)",
    "amp": "autocast the teacher's forward (and the student's forward on the unlabeled batch): "
           "bf16 where supported, else fp16 with loss scaling (each network's loss its own GradScaler)",
    "amp_student": "with --amp: the student's forward on the unlabeled batch (its update, g_u) in bf16/fp16 too "
                   "(fp16: with the student's own loss scaler; an overflow in its gradients skips the whole "
                   "step and halves only the student's scale); the feedback's labeled forward (g_l'), h and "
                   "the optimizers stay fp32 (--no-amp-student: the teacher's forward only)",
    "amp_dtype": "with --amp: bf16 or fp16 (+ GradScaler); None picks bf16 where the device supports it; "
                 "fp16 is refused on the CPU",
    "model_parallel": "teacher and student on different devices (--teacher-device/--student-device), or on "
                      "torchrun ranks: with 2k ranks, ranks 0..k-1 hold the teacher and k..2k-1 the student, "
                      "each half data parallel over its k ranks (k = 1: rank 0 teacher, rank 1 student)",
    "teacher_device": "with --model-parallel in one process, e.g. cuda:0",
    "student_device": "with --model-parallel in one process, e.g. cuda:1 or cpu",
    "fsdp": "under torchrun (2+ ranks): shard teacher, student and EMA over all ranks with FSDP2 "
            "(fully_shard), so each rank holds 1/N of the weights, gradients and momentum; data parallel "
            "otherwise; evaluation gathers one full copy of each network on rank 0. With --model-parallel "
            "(4+ ranks) each network is sharded over its own half of the ranks. Not with --compile",
    "compile": "torch.compile the teacher's and student's forwards (slow first steps)",
    "channels_last": "NHWC memory format for conv models on CPU/CUDA",
    "activation_checkpointing": "teacher and student keep only each residual block's input and recompute "
                                "its activations in the backward: trades about one extra forward per step "
                                "for the activations of every block (not with --compile)",
    "plot": "redraw RUN_DIR/metrics.png (mpl_fast.plot's curves) at each evaluation and at the end, on the rank "
            "that writes metrics.jsonl; without matplotlib the run says so once and goes on",
    "tensorboard": "also write metrics.jsonl's scalars as TensorBoard event files under RUN_DIR/tensorboard "
                   "(pip install mpl_fast[tensorboard])",
}


def _parse_type(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args and typing.get_origin(tp) is not typing.Literal else tp
    if literal_choices(tp) is not None:  # a choice (argparse checks it against the Literal's values)
        base = str
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


class _Parser(argparse.ArgumentParser):
    """A bad flag is one `error:` line naming it (the full usage of ~100 flags would bury it)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see python -m mpl_fast.train --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m mpl_fast.train",
        description="Meta Pseudo Labels and its baselines. Defaults come from --preset (or --config FILE); "
                    "any flag overrides them.",
        epilog=EXIT_CODES_HELP,
    )
    digits = preset("digits")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="named recipe (default: the --config file's, else digits)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="start from a saved config: a run's config.json or your own JSON file with any "
                             "part of that tree (the rest from its preset); flags override it. A run's own "
                             "config.json does not reuse that run's output folder")
    parser.add_argument("--resume", default=None, metavar="PATH",
                        help="continue the run whose checkpoint.pt (or folder) this is; its config is used. Flags "
                             f"that may change on a resume: {', '.join('--' + n.replace('_', '-') for n in RESUMABLE)} "
                             "(printed); other flags must equal the run's. A file-based data set needs --data-dir "
                             "again (the checkpoint alone never chooses the data read)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --output-dir that already holds one (its metrics.jsonl, "
                             "checkpoints and summary are removed); without it such a folder is refused")
    parser.add_argument("--allow-world-size-change", action="store_true",
                        help="with --resume: continue a run under another number of torchrun processes (the "
                             "global batch and the data shards change); refused otherwise")
    parser.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="under torchrun: a collective that waits this long for another rank fails the run "
                             "with a message instead of hanging (default: 600)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build teacher and student on the meta device (no memory, no data), print their "
                             "parameter counts and a per-device memory estimate of one MPL step, and exit")
    for name, tp, _field in leaves(TrainConfig):
        if name == "preset":
            continue
        flag = "--" + name.replace("_", "-")
        flags = [flag] + ([ALIASES[name]] if name in ALIASES else [])
        note = f"; {HELP_NOTES[name]}" if name in HELP_NOTES else ""
        kwargs = {"dest": name, "default": None,
                  "help": f"default: the preset's (digits: {_get(digits, name)!r}){note}"}
        if _parse_type(tp) is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(*flags, type=_parse_type(tp), choices=literal_choices(tp), **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the preset, then the --config file's values, then the flags given.
    A bad --config file raises ValueError with one sentence naming it."""
    saved = read_config_file(args.config) if getattr(args, "config", None) else {}
    cfg = preset(args.preset or saved.get("preset") or "digits")
    for name, _tp, _field in leaves(TrainConfig):
        value = getattr(args, name, None)
        if name == "preset" or (value is None and name not in saved):
            continue
        if value is None:  # the file's value, null included (a flag left out says nothing)
            value = saved[name]
        set_field(cfg, name, value)
    return cfg
