"""RandAugment and Cutout for uint8 images: policy tables, random plans, functions and
nn.Module transforms. The randomness lives here; the deterministic ops run in mpl_fast.ops."""

from mpl_fast.augment.functional import cutout, rand_augment
from mpl_fast.augment.policies import POLICIES, get_policy, torchvision_table
from mpl_fast.augment.sampling import SampledAugment, cutout_boxes, sample_plan
from mpl_fast.augment.transforms import Cutout, RandAugment

__all__ = ["POLICIES", "Cutout", "RandAugment", "SampledAugment", "cutout", "cutout_boxes", "get_policy",
           "rand_augment", "sample_plan", "torchvision_table"]
