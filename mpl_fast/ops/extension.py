"""Loading of the compiled extension ``mpl_fast._C`` and the choice of backend.

``import mpl_fast`` never fails because of the extension: when it is missing, was built
against another torch, or cannot load, the ops fall back to their pure-PyTorch references
and one warning names the cause. ``MPL_FAST_NO_EXTENSION=1`` forces that fallback (tests use
it to exercise the reference path).
"""

from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable

import torch

# Every op that csrc/ops.cpp declares (a test keeps the two in step).
OPS = ("scaled_add", "multi_tensor_dot", "fused_sgd_", "augment_apply")
_REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -e .` (see README)"


def _public_version(version: str) -> str:
    return version.split("+")[0]


def load():
    """Tries to import the extension: (module, None), or (None, why it cannot be used)."""
    if os.environ.get("MPL_FAST_NO_EXTENSION") == "1":
        return None, "MPL_FAST_NO_EXTENSION=1"
    try:
        # import_module, not `from mpl_fast import _C`: during `import mpl_fast` the latter
        # reports a missing .so as a "circular import", hiding that nothing was built.
        _C = importlib.import_module("mpl_fast._C")
    except ModuleNotFoundError:
        return None, "mpl_fast._C was not built (no compiled extension next to the package)"
    except ImportError as exc:  # e.g. built for another torch (undefined symbols)
        return None, f"{type(exc).__name__}: {exc}"
    built_for = _C.build_info()["torch_version"]
    if _public_version(built_for) != _public_version(torch.__version__):
        return None, f"it was built for torch {built_for} but torch {torch.__version__} is installed"
    missing = [name for name in OPS if not hasattr(torch.ops.mpl_fast, name)]
    if missing:  # built from an older checkout: registering fakes for its missing ops would fail
        return None, f"it is older than this source (it has no {', '.join('mpl_fast::' + m for m in missing)})"
    return _C, None


_C, LOAD_ERROR = load()
if LOAD_ERROR is not None:
    warnings.warn(
        f"mpl_fast: the C++/CUDA extension is not in use ({LOAD_ERROR}); every op falls back to "
        f"its pure-PyTorch reference, which is correct but slow. To get the kernels, {_REBUILD_HINT}.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _C is not None


def build_info() -> dict:
    """How the extension was built, or why it is not loaded."""
    if _C is None:
        return {"loaded": False, "error": LOAD_ERROR}
    return {"loaded": True, **_C.build_info()}


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.build_info()["with_cuda"])


def backend() -> str:
    """Which implementation the ops use: "cuda", "cpu", or "reference" (no extension)."""
    if _C is None:
        return "reference"
    if has_cuda_kernels() and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def use_kernel(device: torch.device) -> bool:
    """True when the extension has a kernel for tensors on ``device``; else use the reference."""
    if _C is None:
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and has_cuda_kernels()


def register_autograd(op_name: str, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` for ``mpl_fast::op_name``, a no-op without the extension."""
    if _C is not None:
        torch.library.register_autograd(f"mpl_fast::{op_name}", backward, setup_context=setup_context)


def register_fake(op_name: str) -> Callable:
    """``torch.library.register_fake`` for ``mpl_fast::op_name``, a no-op without the extension."""
    def decorate(fn: Callable) -> Callable:
        if _C is not None:
            torch.library.register_fake(f"mpl_fast::{op_name}")(fn)
        return fn
    return decorate
