"""Data for MPL: the three streams a step needs (labeled, unlabeled weak+strong, evaluation),
from embedded data sets or files on disk, through DALI or a torch DataLoader."""

from mpl_fast.data.streams import DataStreams

__all__ = ["DataStreams"]
