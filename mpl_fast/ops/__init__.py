"""mpl_fast's public fused ops.

Each op has a C++ (CPU) kernel, a CUDA kernel and a pure-PyTorch reference (the
specification, and the fallback when the extension is not built). ``backend()`` says which
implementation is in use.
"""

from mpl_fast.ops._extension import backend, build_info
from mpl_fast.ops.scaled_add import scaled_add, scaled_add_reference

__all__ = ["backend", "build_info", "scaled_add", "scaled_add_reference"]

from mpl_fast.ops.multi_tensor_dot import multi_tensor_dot, multi_tensor_dot_reference  # noqa: E402

__all__ += ["multi_tensor_dot", "multi_tensor_dot_reference"]

from mpl_fast.ops.fused_sgd import fused_sgd_, fused_sgd_reference_  # noqa: E402

__all__ += ["fused_sgd_", "fused_sgd_reference_"]

from mpl_fast.ops.augment import apply_op, cutout, rand_augment  # noqa: E402

__all__ += ["apply_op", "cutout", "rand_augment"]
