"""mpl_fast's public fused ops.

Each op has a C++ (CPU) kernel, a CUDA kernel and a pure-PyTorch reference (the
specification, and the fallback when the extension is not built). ``backend()`` says which
implementation is in use. This package is the bottom layer: it imports nothing else of
mpl_fast, and nothing in it is random (``mpl_fast.augment`` draws RandAugment's plans).
"""

# The extension first: it loads mpl_fast._C (or warns once) before any op registers its fake kernel.
from mpl_fast.ops.extension import backend, build_info  # noqa: I001
from mpl_fast.ops.augment import apply_op, apply_plan, check_images
from mpl_fast.ops.augment_args import (CUTOUT, OP_INDEX, OP_NAMES, PARAMS_PER_OP, AugmentPlan, KernelCode, box_params,
                                       normalize_fill, plan_to_kernel_args)
from mpl_fast.ops.augment_reference import apply_plan_reference
from mpl_fast.ops.fused_sgd import fused_sgd_, fused_sgd_reference_
from mpl_fast.ops.multi_tensor_dot import multi_tensor_dot, multi_tensor_dot_reference
from mpl_fast.ops.scaled_add import scaled_add, scaled_add_reference

__all__ = [
    "backend", "build_info",
    "scaled_add", "scaled_add_reference",
    "multi_tensor_dot", "multi_tensor_dot_reference",
    "fused_sgd_", "fused_sgd_reference_",
    "apply_op", "apply_plan", "apply_plan_reference", "check_images",
    "AugmentPlan", "KernelCode", "CUTOUT", "OP_INDEX", "OP_NAMES", "PARAMS_PER_OP",
    "box_params", "normalize_fill", "plan_to_kernel_args",
]
