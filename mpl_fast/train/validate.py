"""Range checks of every config field, run before anything is built or written: each failure
is one sentence naming the flag, the value and what it must be."""

from __future__ import annotations

import math

import torch

from mpl_fast.data.config import FILE_DATASETS, check_unlabeled_dir


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_ranges(cfg) -> None:
    """Raises ValueError naming the first flag whose value is out of range."""
    def get(name: str):
        obj = cfg
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def need(name: str, ok, what: str) -> None:
        value = get(name)
        if value is None:
            return
        good = False
        try:
            good = bool(ok(value))
        except (TypeError, ValueError, RuntimeError):  # e.g. torch.device("foo")
            pass
        if not good:
            raise ValueError(f"{_flag(name)} {value!r}: must be {what}")

    at_least = lambda lo: (lambda v: v >= lo)  # noqa: E731
    finite_nonneg = lambda v: math.isfinite(v) and v >= 0  # noqa: E731
    for name in ("data.batch_size", "data.mu", "data.eval_batch_size", "finetune.batch_size",
                 "data.labels_per_class", "data.image_size"):
        need(name, at_least(1), "an integer >= 1")
    for name in ("seed", "steps", "data.num_workers", "data.val_per_class", "data.cutout", "data.randaug_num_ops",
                 "data.randaug_magnitude", "threads", "finetune.steps", "teacher.warmup_steps",
                 "student.warmup_steps", "mpl.uda_ramp_steps", "mpl.student_wait_steps"):
        need(name, at_least(0), "an integer >= 0")
    need("checkpoint_every", at_least(0), "an integer >= 0 (0 = checkpoint only at the end and on a stop signal)")
    need("log_every", at_least(1), "an integer >= 1")
    need("eval_every", at_least(1), "an integer >= 1")
    need("max_nonfinite", at_least(1), "an integer >= 1")
    need("model.dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)")
    need("data.labeled_fraction", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
    for net in ("teacher", "student"):
        for leaf in ("lr", "weight_decay", "grad_clip"):
            need(f"{net}.{leaf}", finite_nonneg, "a finite number >= 0")
        need(f"{net}.momentum", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        need(f"{net}.min_lr_ratio", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    for leaf in ("lr", "weight_decay"):
        need(f"finetune.{leaf}", finite_nonneg, "a finite number >= 0")
    need("finetune.momentum", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    for leaf in ("mpl_weight", "sup_weight", "uda_weight", "label_smoothing", "uda_temperature"):
        need(f"mpl.{leaf}", finite_nonneg, "a finite number >= 0")
    need("mpl.label_smoothing", lambda v: v < 1.0, "in [0, 1)")
    need("mpl.uda_threshold", lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
    need("data.jitter_std", finite_nonneg, "a finite number >= 0")
    if cfg.data.full_unlabeled_batch and cfg.data.dataset in FILE_DATASETS:
        raise ValueError(f"--data.full-unlabeled-batch is for the embedded data sets (digits, two-moons), not "
                         f"{cfg.data.dataset}: set the unlabeled batch of file data sets with --data.mu")
    # (--teacher-device/--student-device are checked with the layout: mpl_fast.train.topology)
    need("device", _usable_device, "a device torch knows and can hold data, e.g. cpu, cuda or cuda:1")
    need("model.name", _known_model, "one of mpl_fast.models.MODEL_NAMES, wrnD-W (D = 6n+4, e.g. wrn10-2) or a timm model name")
    if cfg.data.in_memory and cfg.data.dataset != "imagefolder":
        raise ValueError(f"--data.in-memory decodes an ImageFolder's files once; --data.dataset {cfg.data.dataset} "
                         "is not one: drop the flag")
    check_unlabeled_dir(cfg.data)  # (the embedded readers would ignore it silently)
    if cfg.output_dir is not None and not str(cfg.output_dir).strip():
        raise ValueError("--output-dir is empty: name a folder")


def check_data_dir(cfg) -> None:
    """A run (not a --dry-run, which reads no data) of a file-based data set needs --data-dir."""
    if cfg.data.dataset in FILE_DATASETS and not cfg.data.data_dir:
        raise ValueError(f"--data.dataset {cfg.data.dataset} (preset {cfg.preset}) reads files from disk and nothing "
                         f"is downloaded: pass --data-dir FOLDER holding the data set's files")


def _usable_device(name: str) -> bool:
    return torch.device(name).type != "meta"  # ValueError/RuntimeError for names torch cannot parse


def _known_model(name: str) -> bool:
    from mpl_fast.models import is_model_name  # noqa: PLC0415

    if is_model_name(name):
        return True
    try:
        import timm  # noqa: PLC0415 - only for names that are not ours
    except ImportError:
        return False
    return timm.is_model(name)
