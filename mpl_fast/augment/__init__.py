"""Batched RandAugment for uint8 image batches: policy tables, sampling, nn.Module transforms."""

from mpl_fast.augment.policies import POLICIES, get_policy
from mpl_fast.augment.transforms import Cutout, RandAugment

__all__ = ["POLICIES", "Cutout", "RandAugment", "get_policy"]
