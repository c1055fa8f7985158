"""Data for MPL: the three streams a step needs (labeled, unlabeled weak+strong, evaluation),
from embedded data sets or files on disk, through DALI or a torch DataLoader."""

from __future__ import annotations

from mpl_fast.data.config import EMBEDDED_DATASETS, FILE_DATASETS, DataConfig
from mpl_fast.data.streams import DataStreams


def build_streams(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1,
                  device: str = "cpu", with_indices: bool = False) -> DataStreams:
    """The DataStreams for ``cfg``: embedded data sets in memory, file-based ones from disk.

    ``rank``/``world_size`` shard the training streams for data-parallel runs; ``device`` is
    where batches should land (GPU pipelines decode and augment there). ``with_indices``: the
    unlabeled stream also yields each image's index (weak, strong, index), the row of a
    teacher-label store, for reduced MPL (every reader and both pipelines): the index in
    ``cfg.unlabeled_dir``'s order when given (the stream then draws that folder alone), else
    the training-set index (mpl_fast.data.files).
    """
    if cfg.dataset in EMBEDDED_DATASETS:
        from mpl_fast.data.embedded import build_embedded_streams
        return build_embedded_streams(cfg, seed=seed, rank=rank, world_size=world_size, device=device,
                                      with_indices=with_indices)
    if cfg.dataset in FILE_DATASETS:
        from mpl_fast.data.files import build_file_streams
        return build_file_streams(cfg, seed=seed, rank=rank, world_size=world_size, device=device,
                                  with_indices=with_indices)
    raise ValueError(f"unknown dataset {cfg.dataset!r}; choose one of {EMBEDDED_DATASETS + FILE_DATASETS}")


__all__ = ["DataConfig", "DataStreams", "build_streams", "EMBEDDED_DATASETS", "FILE_DATASETS"]
