"""Which flags a --resume may change, and applying them to the run's saved config.

A resumed run continues its own config.json. Flags that only steer what happens from now on
(how long, the learning rates going forward, where the data now lives, how often to log,
evaluate and checkpoint) are applied, each change printed; flags that would make it another
run (preset, method, model, data set, split, batch sizes, ...) are refused unless they equal
the saved value. The data a resumed run reads is never chosen by the checkpoint alone: a
file-based data set needs --data-dir on the command line (the checkpoint could have been
planted next to crafted data files)."""

from __future__ import annotations

import os

from mpl_fast.data.config import FILE_DATASETS
from mpl_fast.train.config import TrainConfig
from mpl_fast.train.errors import UserInputError

RESUMABLE = ("steps", "teacher.lr", "student.lr", "finetune.lr", "finetune.steps", "data.data_dir",
             "log_every", "eval_every", "checkpoint_every", "max_nonfinite", "threads", "data.num_workers")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _get(cfg, name: str):
    for part in name.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg, name: str, value) -> None:
    *path, leaf = name.split(".")
    for part in path:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)


def given_flags(args) -> dict:
    """The config fields set on the command line (dotted name -> value), ``preset`` included."""
    from mpl_fast.train.config import leaves  # noqa: PLC0415

    given = {name: getattr(args, name) for name, _tp, _f in leaves(TrainConfig)
             if name != "preset" and getattr(args, name, None) is not None}
    if getattr(args, "preset", None) is not None:
        given["preset"] = args.preset
    return given


def apply_resume_flags(cfg: TrainConfig, given: dict, resume: str) -> list[str]:
    """Applies ``given`` to the saved ``cfg`` in place; returns the changes as ``--flag old -> new``
    lines. Raises UserInputError for a flag a resume cannot change, and for a file-based data
    set without --data-dir."""
    changes = []
    for name, value in given.items():
        old = _get(cfg, name)
        if name == "output_dir":
            if os.path.abspath(value) != os.path.abspath(cfg.output_dir):
                raise UserInputError(f"--output-dir {value} with --resume {resume}: a resumed run continues in its "
                                     f"own folder {cfg.output_dir}; leave --output-dir out")
            continue
        if name == "data.data_dir":
            value = os.path.abspath(value)
        if value == old:
            continue
        if name not in RESUMABLE:
            raise UserInputError(
                f"{_flag(name)} cannot change on --resume (the run has {old!r}): it would make another run; start "
                f"a new one with --config {cfg.output_dir}/config.json instead (a resume may change "
                f"{', '.join(_flag(n) for n in RESUMABLE)})")
        _set(cfg, name, value)
        changes.append(f"{_flag(name)} {old!r} -> {value!r}")
    if cfg.data.dataset in FILE_DATASETS and "data.data_dir" not in given:
        raise UserInputError(
            f"--resume {resume} reads {cfg.data.dataset} files from {cfg.data.data_dir}: pass --data-dir "
            f"{cfg.data.data_dir} to confirm it (or the folder the data has moved to); a checkpoint alone "
            f"never chooses the data a run reads")
    return changes
