"""A trainer run folder with a digits-cnn teacher, shared by the reduced-MPL tests (the labeller's
and the reduced step's)."""

import dataclasses
import os

import torch

from mpl_fast.data.config import DataConfig
from mpl_fast.models import create_model


def make_run(folder, *, seed=0, num_classes=10, method="uda", best=False, data=None, in_channels=1):
    """A run folder in the trainer's checkpoint format, with a digits-cnn teacher of random
    weights (sharpened so that its distributions are peaked like a trained one's)."""
    torch.manual_seed(seed)
    teacher = create_model("digits-cnn", num_classes, dropout=0.2, in_channels=in_channels)
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(3.0)
    data = data or DataConfig(dataset="digits")
    config = {"method": method, "seed": seed, "data": dataclasses.asdict(data),
              "model": {"name": "digits-cnn", "dropout": 0.2}}
    state = {"config": config, "step": 1,
             "mpl": {"teacher": teacher.state_dict(), "student": create_model("digits-cnn", num_classes).state_dict(),
                     "ema": None},
             "best": {"val": 50.0 if best else -1.0, "step": 1 if best else -1,
                      "state": teacher.state_dict() if best else None}}
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, "checkpoint.pt"))
    return str(folder), teacher.eval()


def assert_resumed_run_matches(full_dir, part_dir) -> None:
    """A run stopped and resumed (``part_dir``) logged the same h at every line as the same run
    left alone (``full_dir``), with some feedback, and ended with equal teacher and student."""
    import json

    lines = {d: [json.loads(ln) for ln in open(os.path.join(d, "metrics.jsonl")) if '"h"' in ln]
             for d in (str(full_dir), str(part_dir))}
    full, part = lines[str(full_dir)], lines[str(part_dir)]
    assert [ln["h"] for ln in full] == [ln["h"] for ln in part]
    assert any(ln["h"] != 0.0 and ln["loss_mpl"] > 0 for ln in full)
    a = torch.load(os.path.join(full_dir, "checkpoint.pt"), weights_only=False)["mpl"]
    b = torch.load(os.path.join(part_dir, "checkpoint.pt"), weights_only=False)["mpl"]
    for net in ("teacher", "student"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
