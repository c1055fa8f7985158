"""The emulated CUDA ops: csrc/cuda's kernels and launch planning compiled by the host compiler on
top of the SIMT emulator (csrc/emu/simt.h) into a small shared library, loaded with ctypes.

`load()` builds from the checkout; `load(patches=...)` builds a copy of the sources with textual
replacements (the fault variants of test_emulator_faults.py). Builds are cached under
build/emulated/ by a hash of the sources, patches and flags. The wrappers take CPU tensors and
play the part of the ATen glue (contiguous inputs, output and scratch allocation); "device"
pointers are host memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
CACHE = REPO / "build" / "emulated"
ENTRY = "emu/emulated_ops.cpp"  # one translation unit: each build is one g++ call
# -O1: the build is on CI's critical path and the emulated kernels are small. bounds-strict:
# every array subscript, shared arrays and struct members included, is checked (simt.h).
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-fvisibility=hidden", "-fsanitize=bounds-strict",
         "-U_FORTIFY_SOURCE", "-w"]
# FloatKind of csrc/cuda/multi_tensor_kernels.cuh.
KINDS = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_LAUNCH_BOUNDS = re.compile(r"__launch_bounds__\(([^()]*)\)\s*(\w+)\s*\(")
_loaded: dict[str, "EmulatedOps"] = {}
build_seconds: dict[str, float] = {}


class EmulatorError(RuntimeError):
    """A kernel launch the emulator refused or a fault it caught (the message says which)."""


def _sources(root: Path) -> dict[str, str]:
    files = sorted([*root.glob("*.h"), *root.glob("cuda/*.cuh"), *root.glob("emu/*")])
    return {str(p.relative_to(root)): p.read_text() for p in files}


def _launch_bounds(sources: dict[str, str]) -> str:
    """{"kernel", bound} pairs from the __launch_bounds__ of the kernel headers."""
    pairs = []
    for name, text in sources.items():
        if name.endswith(".cuh"):
            pairs += [f'{{"{kernel}", static_cast<int>({expr})}}' for expr, kernel in _LAUNCH_BOUNDS.findall(text)]
    return ", ".join(pairs)


def _compile(root: Path, out: Path) -> None:
    bounds = _launch_bounds(_sources(root))
    cmd = ["g++", *FLAGS, f"-I{root}", f"-I{Path(torch.__file__).parent / 'include'}",
           f"-DMPL_EMU_LAUNCH_BOUNDS={bounds}", str(root / ENTRY), "-o", str(out)]
    if shutil.which("g++") is None:
        raise EmulatorError("the emulated CUDA tests need g++ on the PATH (the same compiler that builds the "
                            "extension); install it, e.g. apt-get install g++")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulatorError(f"the emulated build failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")


def load(patches: dict[str, list[tuple[str, str]]] | None = None) -> "EmulatedOps":
    """The emulated ops built from csrc/ (plus `patches`: file -> [(old, new)], each `old`
    occurring exactly once), compiled once per distinct source text."""
    sources = _sources(CSRC)
    for name, edits in (patches or {}).items():
        text = sources[name]
        for old, new in edits:
            assert text.count(old) == 1, f"patch target occurs {text.count(old)} times in {name}: {old!r}"
            text = text.replace(old, new)
        sources[name] = text
    digest = hashlib.sha256(repr((sorted(sources.items()), FLAGS, torch.__version__)).encode()).hexdigest()[:16]
    if digest in _loaded:
        return _loaded[digest]
    CACHE.mkdir(parents=True, exist_ok=True)
    target = CACHE / f"emulated_{digest}.so"
    if not target.exists():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "csrc"
            for name, text in sources.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_text(text)
            built = Path(tmp) / "out.so"
            _compile(root, built)
            shutil.move(str(built), target)  # atomic within the cache directory
        build_seconds[digest] = time.perf_counter() - start
    _loaded[digest] = EmulatedOps(target)
    return _loaded[digest]


def _ptrs(tensors, kind=ctypes.c_void_p):
    return (kind * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])


class EmulatedOps:
    def __init__(self, path: Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.mpl_emu_last_error.restype = ctypes.c_char_p
        self.lib.mpl_emu_set_seed.argtypes = [ctypes.c_uint64]
        self.lib.mpl_emu_dot_partials_count.restype = ctypes.c_int64
        self.lib.mpl_emu_augment_needs_scratch.argtypes = [ctypes.c_int64] * 3
        self.lib.mpl_emu_scaled_add.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_double, ctypes.c_int64]
        self.seed = 1

    def _check(self, status: int) -> None:
        if status != 0:
            raise EmulatorError(self.lib.mpl_emu_last_error().decode())

    def _seed(self, seed):
        self.lib.mpl_emu_set_seed(self.seed if seed is None else seed)

    # ---------------------------------------------------------------- multi_tensor_dot
    def multi_tensor_dot(self, xs, ys, found_inf=None, seed=None) -> torch.Tensor:
        """Every pair, empty ones included (the glue drops those; the planning must not care)."""
        xs = [x.contiguous() for x in xs]
        ys = [y.contiguous() for y in ys]
        n = torch.tensor([x.numel() for x in xs] or [0], dtype=torch.int64)
        count = self.lib.mpl_emu_dot_partials_count(ctypes.c_int64(len(xs)), ctypes.c_void_p(n.data_ptr()))
        partials = torch.empty(max(1, count), dtype=torch.float64)
        out = torch.empty((), dtype=torch.float32)
        xk = torch.tensor([KINDS[x.dtype] for x in xs] or [0], dtype=torch.int32)
        yk = torch.tensor([KINDS[y.dtype] for y in ys] or [0], dtype=torch.int32)
        self._seed(seed)
        self._check(self.lib.mpl_emu_multi_tensor_dot(
            ctypes.c_int64(len(xs)), _ptrs(xs), _ptrs(ys), ctypes.c_void_p(n.data_ptr()),
            ctypes.c_void_p(xk.data_ptr()), ctypes.c_void_p(yk.data_ptr()), ctypes.c_void_p(partials.data_ptr()),
            ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(found_inf.data_ptr() if found_inf is not None else None)))
        return out

    # ---------------------------------------------------------------- fused_sgd_
    def fused_sgd_(self, params, grads, momentum_buffers=None, *, lr=0.1, momentum=0.0, dampening=0.0,
                   weight_decay=0.0, nesterov=False, maximize=False, first_step=False, update_out=None,
                   found_inf=None, found_inf_out=None, seed=None) -> None:
        """In place on contiguous CPU tensors; `lr` a float or a one-element float32/float64
        tensor (read by the kernel, as a device lr is)."""
        assert all(p.is_contiguous() for p in params)
        grads = [g.contiguous() for g in grads]
        n = torch.tensor([p.numel() for p in params] or [0], dtype=torch.int64)
        kinds = torch.tensor([KINDS[p.dtype] for p in params] or [0], dtype=torch.int32)
        lr_value, lr_ptr, lr_double = (float(lr), None, 0) if not torch.is_tensor(lr) else \
            (0.0, lr.data_ptr(), int(lr.dtype == torch.float64))
        bufs = _ptrs(momentum_buffers) if momentum else None
        upd = _ptrs(update_out) if update_out else None
        self._seed(seed)
        self._check(self.lib.mpl_emu_fused_sgd(
            ctypes.c_int64(len(params)), _ptrs(params), _ptrs(grads), bufs, upd, ctypes.c_void_p(n.data_ptr()),
            ctypes.c_void_p(kinds.data_ptr()), ctypes.c_double(lr_value), ctypes.c_void_p(lr_ptr),
            ctypes.c_int(lr_double), ctypes.c_double(momentum), ctypes.c_double(dampening),
            ctypes.c_double(weight_decay), ctypes.c_int(nesterov), ctypes.c_int(maximize), ctypes.c_int(first_step),
            ctypes.c_void_p(found_inf.data_ptr() if found_inf is not None else None),
            ctypes.c_void_p(found_inf_out.data_ptr() if found_inf_out is not None else None)))

    # ---------------------------------------------------------------- augment_apply
    def augment_apply(self, images, codes, params, fill, seed=None) -> torch.Tensor:
        images = images.contiguous()
        codes = codes.to(torch.int32).contiguous()
        params = params.to(torch.float32).contiguous()
        out = torch.empty_like(images)
        n, C, H, W = images.shape
        if n == 0 or C * H * W == 0:
            return out
        scratch = torch.empty_like(images) if self.lib.mpl_emu_augment_needs_scratch(C, H, W) else None
        fills = torch.tensor([fill[min(c, len(fill) - 1)] for c in range(3)], dtype=torch.uint8)
        self._seed(seed)
        self._check(self.lib.mpl_emu_augment(
            ctypes.c_void_p(images.data_ptr()), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_void_p(scratch.data_ptr() if scratch is not None else None), ctypes.c_void_p(codes.data_ptr()),
            ctypes.c_void_p(params.data_ptr()), ctypes.c_int64(n), ctypes.c_int64(codes.shape[1]), ctypes.c_int64(C),
            ctypes.c_int64(H), ctypes.c_int64(W), ctypes.c_void_p(fills.data_ptr())))
        return out

    # ---------------------------------------------------------------- scaled_add
    def scaled_add(self, x, y, alpha, seed=None) -> torch.Tensor:
        x, y = x.contiguous(), y.contiguous()
        out = torch.empty_like(x)
        if x.numel() == 0:
            return out
        self._seed(seed)
        self._check(self.lib.mpl_emu_scaled_add(KINDS[x.dtype], x.data_ptr(), y.data_ptr(), out.data_ptr(),
                                                float(alpha), x.numel()))
        return out


if __name__ == "__main__":  # python tests/emulated_build.py: build (or find) and report the time
    start = time.perf_counter()
    ops = load()
    print(f"emulated ops at {ops.path} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
