"""The trainer with --loader dali on a tiny ImageFolder: an interrupted and resumed run ends
with the same weights as an uninterrupted one (the DALI streams save their position)."""

import pytest
import torch
from mpl_testing import tiny_dali_config

from mpl_fast import checkpoint as ckpt
from mpl_fast.data.dali_pipeline import dali_unavailable_reason
from mpl_fast.data.tiny import write_tiny_imagefolder
from mpl_fast.train import run

pytestmark = [
    pytest.mark.skipif(dali_unavailable_reason() is not None,
                       reason="NVIDIA DALI not installed (optional extra `dali`)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),  # the tiny folder's corrupt files
]


def _dali_run(out_dir, data_dir, **kw):
    return tiny_dali_config(out_dir, data_dir, mu=2, **kw)


def test_dali_run_interrupted_and_resumed_ends_with_the_same_weights(tmp_path):
    data = write_tiny_imagefolder(str(tmp_path / "data"), num_classes=3, train_per_class=5,
                                  val_per_class=2, size=48)
    run(_dali_run(tmp_path / "full", data), progress=False, quiet=True)
    part = run(_dali_run(tmp_path / "part", data), progress=False, quiet=True, stop_after=3)
    assert part["interrupted"] and part["step"] == 3
    saved = ckpt.load(str(tmp_path / "part" / "checkpoint.pt"))
    assert saved["streams"]["unlabeled"]["consumed"] == 3  # the stream position was saved
    run(None, resume=str(tmp_path / "part"), progress=False, quiet=True)
    a = ckpt.load(str(tmp_path / "full" / "checkpoint.pt"))
    b = ckpt.load(str(tmp_path / "part" / "checkpoint.pt"))
    assert a["step"] == b["step"] == 6
    for model in ("student", "teacher"):
        for k, v in a["mpl"][model].items():
            assert torch.equal(v, b["mpl"][model][k]), (model, k)
    assert a["streams"]["unlabeled"]["consumed"] == b["streams"]["unlabeled"]["consumed"] == 6
