"""Reading a finished (or interrupted) run folder: its configuration, its checkpoint, the
networks in it and the preprocessing their inputs need.

Everything that knows how the trainer lays out a run folder lives here, so the tools that
work on runs (mpl_fast.plot, mpl_fast.evaluate, mpl_fast.export and ``mpl_fast.load``) share
one reader. A run folder holds (see mpl_fast.train): config.json (the TrainConfig as a dict),
checkpoint.pt (``{"config", "step", "mpl": {"student", "teacher", "ema": {"module", ...},
...}, "best": {"val", "step", "state"}, ...}``), finetuned.pt (``{"state_dict", "base"}``),
metrics.jsonl and summary.json.

The checkpoint is read with ``torch.load(weights_only=True)``: tensors, numbers, strings and
containers only, so nothing in a run folder can execute code.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

# The networks a run can hand out. "finetuned" is not in the checkpoint: the trainer finetunes a
# copy of the selected model after its last checkpoint and writes it to finetuned.pt.
MODEL_CHOICES = ("selected", "student", "ema", "teacher", "finetuned")
DEFAULT_MODEL = "selected"

# Classes of the data sets whose class count the configuration does not name (imagefolder: read
# from the weights).
_NUM_CLASSES = {"digits": 10, "two-moons": 2, "cifar10": 10, "cifar100": 100, "svhn": 10}
# Native image sizes of the array data sets (no resize in the trainer's evaluation view).
_ARRAY_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "svhn": 32}


class RunError(ValueError):
    """A run folder, or a request about it, that cannot be served; the message is one sentence."""


def config_module():
    """The module with TrainConfig's from_dict (the trainer's config)."""
    from mpl_fast.train import config as module  # noqa: PLC0415 - keeps `import mpl_fast` light
    return module


# ----------------------------------------------------------------------------- files of a run

def run_path(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, name)


def check_run_dir(run_dir: str) -> str:
    """``run_dir`` if it is a folder, else a RunError naming it."""
    if not os.path.isdir(run_dir):
        raise RunError(f"run folder {run_dir} does not exist (give the --output-dir of a training run)")
    return run_dir


def read_checkpoint(run_dir: str) -> dict:
    """The run's checkpoint.pt, read with torch.load(weights_only=True) onto the CPU."""
    path = run_path(check_run_dir(run_dir), "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} has no checkpoint.pt: the run wrote none yet (it checkpoints every "
                       f"--checkpoint-every steps and at its end)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        # a truncated file, or one holding objects weights_only refuses
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RunError(f"{path} cannot be read as a weights-only checkpoint (only tensors, numbers, "
                       f"strings and containers are loaded; nothing is executed): {first}") from None
    if not isinstance(state, dict) or "mpl" not in state:
        raise RunError(f"{path} is not a checkpoint written by mpl_fast.train (no 'mpl' entry)")
    return state


def read_config(run_dir: str, checkpoint: dict | None = None):
    """The run's TrainConfig: config.json, else the checkpoint's copy."""
    module = config_module()
    path = run_path(check_run_dir(run_dir), "config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise RunError(f"{path} is not readable JSON ({exc})") from None
    else:
        raw = (checkpoint or read_checkpoint(run_dir))["config"]
    try:
        return module.from_dict(raw)
    except (TypeError, KeyError, AttributeError) as exc:
        raise RunError(f"{path} does not describe a TrainConfig this mpl_fast knows ({exc})") from None


def read_summary(run_dir: str) -> dict | None:
    """summary.json (None while the run has not finished)."""
    path = run_path(run_dir, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def selection_model(cfg, summary: dict | None = None) -> str:
    """Which network's best-validation weights the run keeps as "selected": what its summary.json
    says, else the trainer's rule (mpl_fast.train.evaluate.selection_model)."""
    if summary and isinstance(summary.get("selected"), dict) and summary["selected"].get("model"):
        return summary["selected"]["model"]
    from mpl_fast.train.evaluate import selection_model as trainer_rule  # noqa: PLC0415

    return trainer_rule(cfg)


def model_state(run_dir: str, model: str, checkpoint: dict | None = None) -> dict:
    """The state dict of network ``model`` (one of MODEL_CHOICES) from the run's checkpoint."""
    if model not in MODEL_CHOICES:
        raise RunError(f"model must be one of {', '.join(MODEL_CHOICES)}, got {model!r}")
    if model == "finetuned":
        return read_finetuned(run_dir)
    state = checkpoint if checkpoint is not None else read_checkpoint(run_dir)
    nets = state["mpl"]
    if model == "selected":
        best = state.get("best") or {}
        if best.get("state") is not None:
            return _plain(best["state"])
        # No validation set (or no evaluation yet): the trainer selects the live network.
        model = selection_model(read_config(run_dir, state), read_summary(run_dir))
    if model == "ema":
        sd = (nets.get("ema") or {}).get("module")
        if sd is None:
            raise RunError(f"{run_dir} has no EMA of the student (the run had --mpl.ema-decay 0)")
        return _plain(sd)
    sd = nets.get(model)
    if sd is None:
        raise RunError(f"{run_dir} has no {model} network (method {state['config'].get('method')!r})")
    return _plain(sd)


def read_finetuned(run_dir: str) -> dict:
    """The finetuned student's state dict from the run's finetuned.pt (CRC-checked, weights only)."""
    from mpl_fast import checkpoint as ckpt  # noqa: PLC0415
    from mpl_fast.train.checkpointing import FINETUNED_FILE  # noqa: PLC0415

    path = run_path(check_run_dir(run_dir), FINETUNED_FILE)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir} has no {FINETUNED_FILE}: the run has not finished, or it does not finetune "
                       f"(--method uda, --finetune.steps 0, or a run from before mpl_fast saved it); "
                       f"use model='selected', the weights the finetuning starts from")
    try:
        state = ckpt.load(path, fallback=False)
    except ckpt.CheckpointError as exc:
        raise RunError(str(exc)) from None
    if not isinstance(state.get("state_dict"), dict):
        raise RunError(f"{path} is not a finetuned student written by mpl_fast.train (no 'state_dict' entry)")
    return _plain(state["state_dict"])


def _plain(state_dict: dict) -> dict:
    """The state dict with torch.compile's wrapper prefix removed, tensors contiguous."""
    return {k.replace("_orig_mod.", ""): v.contiguous() for k, v in state_dict.items()}


# ----------------------------------------------------------------------------- networks

@dataclass
class NetworkSpec:
    """What it takes to rebuild a run's network without its data: passed to the trainer's create_network, and
    written into exports as metadata."""

    model_name: str
    num_classes: int
    dropout: float
    input_shape: tuple          # one example, without the batch dimension

    @property
    def in_channels(self) -> int:
        from mpl_fast.train.build import input_channels  # noqa: PLC0415

        return input_channels(self.input_shape)

    def as_dict(self) -> dict:
        return {"model_name": self.model_name, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "dropout": self.dropout, "input_shape": list(self.input_shape)}


def network_spec(cfg, state_dict: dict) -> NetworkSpec:
    """The architecture of ``cfg``'s networks (class count from the weights for imagefolder)."""
    dataset = cfg.data.dataset
    num_classes = _NUM_CLASSES.get(dataset) or _classes_from_weights(state_dict)
    if dataset == "two-moons":
        return NetworkSpec(cfg.model.name, num_classes, cfg.model.dropout, (2,))
    if dataset == "digits":
        return NetworkSpec(cfg.model.name, num_classes, cfg.model.dropout, (1, 8, 8))
    size = image_size(cfg)
    return NetworkSpec(cfg.model.name, num_classes, cfg.model.dropout, (3, size, size))


def _classes_from_weights(state_dict: dict) -> int:
    """Rows of the last 2-D weight (the classifier); the network's load checks the guess."""
    matrices = [v for k, v in state_dict.items() if k.endswith("weight") and v.dim() == 2]
    if not matrices:
        raise RunError("cannot tell the number of classes from the checkpoint (no linear classifier found)")
    return int(matrices[-1].shape[0])


def build_network(spec: NetworkSpec, state_dict: dict, device: str = "cpu") -> nn.Module:
    """A fresh network of ``spec`` holding ``state_dict``, in eval mode, built as the trainer builds it."""
    from mpl_fast.train.build import create_network  # noqa: PLC0415
    from mpl_fast.train.config import ModelConfig  # noqa: PLC0415

    net = create_network(ModelConfig(name=spec.model_name, dropout=spec.dropout), spec.num_classes, spec.input_shape)
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise RunError(f"the checkpoint's weights do not fit a {spec.model_name} with {spec.num_classes} classes: "
                       f"{str(exc).strip().splitlines()[0][:200]}") from None
    return net.to(device).eval()


# ----------------------------------------------------------------------------- preprocessing

def image_size(cfg) -> int:
    """The side of the square images the run's networks see."""
    dataset = cfg.data.dataset
    if dataset == "digits":
        return 8
    if dataset in _ARRAY_IMAGE_SIZE:
        return _ARRAY_IMAGE_SIZE[dataset]
    return cfg.data.image_size or 224  # imagefolder's default crop (mpl_fast.data.imagefolder)


def normalisation(dataset: str) -> tuple[tuple, tuple] | None:
    """(mean, std) per channel in [0, 1] that the trainer normalises with; None: none (digits)."""
    if dataset in ("cifar10", "cifar100"):
        from mpl_fast.data import cifar  # noqa: PLC0415
        return (cifar.CIFAR10_MEAN, cifar.CIFAR10_STD) if dataset == "cifar10" else \
            (cifar.CIFAR100_MEAN, cifar.CIFAR100_STD)
    if dataset == "svhn":
        from mpl_fast.data.svhn import SVHN_MEAN, SVHN_STD  # noqa: PLC0415
        return SVHN_MEAN, SVHN_STD
    if dataset == "imagefolder":
        from mpl_fast.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415
        return IMAGENET_MEAN, IMAGENET_STD
    return None


class Preprocess:
    """The trainer's evaluation view as a callable: image(s) in, a float batch for the network out.

    Takes a file path (JPEG/PNG), a PIL image, or a uint8 tensor (C, H, W) or (B, C, H, W);
    returns float32 (B, C, H, W). Photos (imagefolder) get the shorter side resized to
    size / 0.875 and a centre crop of size x size; other images of the wrong size are resized
    to it (shorter side, centre crop); then x / 255 and the data set's normalisation. Digits
    are turned grey (white digit on black, as sklearn's). Two-moons points (float (N, 2))
    pass unchanged.
    """

    def __init__(self, dataset: str, size: int | None, channels: int, mean=None, std=None):
        self.dataset, self.size, self.channels = dataset, size, channels
        self.mean, self.std = mean, std
        self.crop_fraction = 0.875 if dataset == "imagefolder" else 1.0

    def as_dict(self) -> dict:
        if self.size is None:
            return {"dataset": self.dataset, "input": "float32 points (N, 2), used as they are"}
        return {"dataset": self.dataset, "image_size": self.size, "channels": self.channels,
                "mean": list(self.mean) if self.mean else None, "std": list(self.std) if self.std else None,
                "resize": ("shorter side to image_size / 0.875, centre crop" if self.crop_fraction < 1
                           else "shorter side to image_size, centre crop (when not already that size)"),
                "scale": "uint8 / 255, then (x - mean) / std per channel when mean is given"}

    def __repr__(self) -> str:
        return f"Preprocess({self.as_dict()})"

    def __call__(self, images) -> torch.Tensor:
        if self.size is None:  # points, not images
            x = torch.as_tensor(images, dtype=torch.float32)
            return x.unsqueeze(0) if x.dim() == 1 else x
        batch = self._as_uint8_batch(images)
        return self.from_uint8(batch)

    def from_uint8(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) of any size and 1 or 3 channels -> the network's input."""
        from mpl_fast.data.views import resize_center_crop  # noqa: PLC0415

        if batch.dtype != torch.uint8 or batch.dim() != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {batch.dtype} of shape {tuple(batch.shape)}")
        batch = self._channels(batch)
        if tuple(batch.shape[-2:]) != (self.size, self.size):
            batch = torch.stack([resize_center_crop(im, self.size, self.crop_fraction) for im in batch])
        x = batch.to(torch.float32) / 255.0
        if self.mean is not None:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    def _channels(self, batch: torch.Tensor) -> torch.Tensor:
        c = batch.shape[1]
        if c == self.channels:
            return batch
        if self.channels == 1 and c == 3:  # ITU-R 601 luma, as PIL's "L"
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            return (batch.to(torch.float32) * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        if self.channels == 3 and c == 1:
            return batch.expand(-1, 3, -1, -1)
        raise ValueError(f"images with {c} channels cannot feed a network of {self.channels}")

    def _as_uint8_batch(self, images) -> torch.Tensor:
        if isinstance(images, (str, os.PathLike)):
            return load_image(str(images)).unsqueeze(0)
        if not isinstance(images, torch.Tensor):  # a PIL image (or anything numpy can read)
            import numpy as np  # noqa: PLC0415
            array = np.asarray(images.convert("RGB") if hasattr(images, "convert") else images)
            images = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return images.unsqueeze(0) if images.dim() == 3 else images


def load_image(path: str) -> torch.Tensor:
    """uint8 RGB (3, H, W) of a JPEG/PNG file, decoded as the trainer decodes its files."""
    from mpl_fast.data.torch_pipeline import decode_file  # noqa: PLC0415

    return decode_file(path)


def preprocessing(cfg) -> Preprocess:
    """The preprocessing of the run configured by ``cfg``."""
    dataset = cfg.data.dataset
    if dataset == "two-moons":
        return Preprocess(dataset, None, 0)
    norm = normalisation(dataset)
    channels = 1 if dataset == "digits" else 3
    return Preprocess(dataset, image_size(cfg), channels, *(norm or (None, None)))


# ----------------------------------------------------------------------------- one call

class Loaded(NamedTuple):
    """What ``mpl_fast.load`` returns: ``model, preprocess = mpl_fast.load(run_dir)``."""

    model: nn.Module
    preprocess: Preprocess


@dataclass
class RunNetwork:
    """A network of a run with everything known about it (for the tools)."""

    run_dir: str
    name: str               # the requested model
    config: object          # TrainConfig
    spec: NetworkSpec
    network: nn.Module
    preprocess: Preprocess
    checkpoint_step: int


def open_network(run_dir: str, model: str = DEFAULT_MODEL, device: str = "cpu") -> RunNetwork:
    """Reads ``run_dir`` and rebuilds its network ``model`` on ``device`` (eval mode)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise RunError(f"device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device {device!r}: no CUDA GPU is visible to torch on this machine (use cpu)")
    checkpoint = read_checkpoint(run_dir)
    cfg = read_config(run_dir, checkpoint)
    state_dict = model_state(run_dir, model, checkpoint)
    spec = network_spec(cfg, state_dict)
    net = build_network(spec, state_dict, device)
    return RunNetwork(run_dir, model, cfg, spec, net, preprocessing(cfg), int(checkpoint.get("step", -1)))


def load(run_dir: str, model: str = DEFAULT_MODEL, device: str = "cpu") -> Loaded:
    """The network ``model`` of a training run in eval mode, and the preprocessing its inputs need.

    ``model``: "selected" (best validation weights of the selection model: the student's EMA,
    the student, or UDA's teacher), "student", "ema", "teacher", "finetuned" (the selected
    network after the run's finetuning on the labeled data: finetuned.pt). ``model, preprocess = mpl_fast.load("runs/x")``;
    ``model(preprocess("cat.jpg")).argmax(1)``.
    """
    opened = open_network(run_dir, model, device)
    return Loaded(opened.network, opened.preprocess)
