"""Reads a trained network out of a trainer run: the one place that knows the layout of a run
folder written by ``python -m mpl_fast.train``.

A run folder holds config.json (the run's whole configuration as a dict) and checkpoint.pt
(torch.save of plain containers: "config", "mpl" with the "teacher", "student" and "ema"
state dicts, "best" with the best-validation weights of the selection model). Only those keys
are read, and only as data: torch.load(weights_only=True), JSON for the config. The trainer's
config classes are not imported (their module is moving); the data part is rebuilt as
mpl_fast.data.config.DataConfig, the model from the "model" entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from mpl_fast.algo.selection import selected_network
from mpl_fast.data.config import DataConfig

NETWORKS = ("auto", "best", "teacher", "student", "ema")


class RunFolderError(ValueError):
    """The run folder or checkpoint cannot give the asked-for network; one sentence."""


@dataclass
class TrainedRun:
    """What a run says about its networks and data; the weights are read by ``state_dict``."""

    checkpoint_path: str
    config: dict
    checkpoint: dict

    @property
    def data(self) -> DataConfig:
        return data_config(self.config.get("data", {}), self.checkpoint_path)

    @property
    def model_name(self) -> str:
        return self.config.get("model", {}).get("name", "")

    @property
    def dropout(self) -> float:
        return float(self.config.get("model", {}).get("dropout", 0.0))

    def selection_model(self) -> str:
        """The network the trainer selects on validation, by the trainer's rule
        (mpl_fast.algo.selection): whether the run kept an EMA comes from its --mpl.ema-decay,
        or, in a configuration without it, from the checkpoint (the trainer saves an EMA exactly
        when the decay is > 0)."""
        decay = (self.config.get("mpl") or {}).get("ema_decay")
        has_ema = float(decay) > 0 if decay is not None else bool((self.checkpoint.get("mpl") or {}).get("ema"))
        return selected_network(self.config.get("method"), has_ema)

    def state_dict(self, network: str = "auto") -> tuple[dict, str]:
        """(state dict, what it is) of ``network``: "best" = the best-validation weights of the
        selection model; "auto" = "best" when the run kept them, else the selection model."""
        if network not in NETWORKS:
            raise RunFolderError(f"--network must be one of {NETWORKS}, got {network!r}")
        mpl = self.checkpoint.get("mpl") or {}
        best = self.checkpoint.get("best") or {}
        if network == "auto":
            network = "best" if best.get("state") else self.selection_model()
        if network == "best":
            if not best.get("state"):
                raise RunFolderError(f"{self.checkpoint_path} holds no best-validation weights (the run had "
                                     "no validation set or never evaluated): pass --network teacher, student or ema")
            return best["state"], f"best-validation {self.selection_model()} (step {best.get('step')})"
        state = mpl.get(network)
        if network == "ema" and state:
            state = state.get("module")
        if not state:
            raise RunFolderError(f"{self.checkpoint_path} holds no {network} weights (method "
                                 f"{self.config.get('method')!r}): pass another --network")
        return state, f"final {network}"


def data_config(d: dict, where: str) -> DataConfig:
    """The run's data configuration as a DataConfig; refuses fields this version does not know."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise RunFolderError(f"the configuration in {where} has data fields this mpl_fast does not know "
                             f"({', '.join(unknown)}): it was written by another version of mpl_fast")
    return DataConfig(**d)


def find_checkpoint(path: str) -> str:
    """RUN_DIR/checkpoint.pt for a run folder, or the file itself."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise RunFolderError(f"--teacher {path}: no such checkpoint (give a trainer run folder with "
                             "checkpoint.pt, or the checkpoint file)")
    return path


def read_run(path: str) -> TrainedRun:
    """The trainer run at ``path`` (a run folder or its checkpoint.pt)."""
    ckpt_path = find_checkpoint(path)
    try:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not a torch file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RunFolderError(f"--teacher {ckpt_path} cannot be read as a trainer checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise RunFolderError(f"--teacher {ckpt_path} is not a trainer checkpoint (a {type(state).__name__}, "
                             "not a dict)")
    config = state.get("config")
    if not config:
        config_path = os.path.join(os.path.dirname(ckpt_path), "config.json")
        if not os.path.isfile(config_path):
            raise RunFolderError(f"--teacher {ckpt_path} carries no configuration and there is no config.json "
                                 "next to it: give the trainer's run folder")
        with open(config_path) as f:
            config = json.load(f)
    return TrainedRun(ckpt_path, config, state)


def load_network(run: TrainedRun, model: nn.Module, network: str = "auto") -> str:
    """Loads ``network``'s weights of ``run`` into ``model``; returns what was loaded."""
    state, what = run.state_dict(network)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        detail = next((ln.strip().rstrip(".") for ln in str(exc).splitlines() if "size mismatch" in ln), "")
        raise RunFolderError(f"the {what} weights in {run.checkpoint_path} do not fit a {run.model_name} for this "
                             f"data set ({detail or str(exc).splitlines()[0][:200]}): the teacher was trained with "
                             "another class count or model") from None
    return what


def sha256_of_file(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
