"""The torch DataLoader pipeline leaves the global RNG alone: a DataLoader iterator without a
generator of its own draws its workers' base seed from the global RNG, so a resumed run (whose
iterators start at its first step) would see other dropout masks than the uninterrupted run."""

import torch

from mpl_fast.data import build_streams
from mpl_fast.data.config import DataConfig
from mpl_fast.data.tiny import write_tiny_cifar


def test_drawing_batches_and_evaluating_leave_the_global_rng_where_it_was(tmp_path):
    write_tiny_cifar(str(tmp_path), train_per_class=4, test_per_class=1)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), labels_per_class=2, val_per_class=1, batch_size=2,
                     mu=2, loader="torch", num_workers=0)
    streams = build_streams(cfg, seed=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    next(streams.labeled)
    next(streams.unlabeled)
    list(streams.val)
    assert torch.equal(torch.random.get_rng_state(), before)
