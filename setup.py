"""Build of the mpl_fast._C extension.

CUDA sources (csrc/cuda/*.cu) are compiled when nvcc is found (CUDA_HOME, default
/usr/local/cuda) and torch was built with CUDA; otherwise a CPU-only extension is built.
MPL_FAST_CUDA=0/1 forces the choice. Always build with ``--no-build-isolation`` so the
extension links against the torch already installed (a build-isolated torch would be a
second 5 GB download, and possibly a different version).
"""

import glob
import os
import sys
import time

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"
# Ampere and Hopper, plus PTX so newer cards JIT from it. Without a default, cpp_extension
# queries the (absent) GPU and crashes on machines like CI.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _log(msg: str) -> None:
    print(f"[mpl_fast setup] {msg}", file=sys.stderr, flush=True)


def _want_cuda(torch) -> tuple[bool, str]:
    forced = os.environ.get("MPL_FAST_CUDA")
    cuda_home = os.environ.get("CUDA_HOME") or DEFAULT_CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    have_nvcc = os.path.exists(nvcc)
    torch_has_cuda = torch.version.cuda is not None
    if forced == "0":
        return False, "MPL_FAST_CUDA=0"
    if forced == "1":
        if not have_nvcc:
            raise SystemExit(f"MPL_FAST_CUDA=1 but nvcc was not found at {nvcc}; set CUDA_HOME.")
        if not torch_has_cuda:
            raise SystemExit("MPL_FAST_CUDA=1 but the installed torch is a CPU-only build "
                             f"(torch {torch.__version__}); install torch==2.14.1 (CUDA 13).")
        return True, "MPL_FAST_CUDA=1"
    if not have_nvcc:
        return False, f"no nvcc at {nvcc} (set CUDA_HOME or MPL_FAST_CUDA=1)"
    if not torch_has_cuda:
        return False, f"torch {torch.__version__} is a CPU-only build"
    return True, f"nvcc found at {nvcc}"


def _extensions():
    import torch
    from torch.utils import cpp_extension

    use_cuda, why = _want_cuda(torch)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    sources.append(os.path.join("csrc", "python", "module.cpp"))
    define_macros = []
    extra = {"cxx": ["-O3", "-std=c++20", "-fopenmp"]}
    include_dirs = [os.path.join(ROOT, "csrc")]
    if use_cuda:
        os.environ.setdefault("CUDA_HOME", DEFAULT_CUDA_HOME)
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("MPL_FAST_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr"]
        # ATen/cuda/CUDAContext.h needs the CUDA headers that ship inside torch's CUDA wheel.
        wheel_include = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(wheel_include):
            include_dirs.append(wheel_include)
        ext_cls = cpp_extension.CUDAExtension
        _log(f"building with CUDA ({why}); TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext_cls = cpp_extension.CppExtension
        _log(f"building CPU-only ({why})")
    return [ext_cls(
        name="mpl_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )]


class _TimedBuildExt:
    """Wraps cpp_extension.BuildExtension to print how long the build took."""

    @staticmethod
    def make():
        from torch.utils.cpp_extension import BuildExtension

        class TimedBuildExt(BuildExtension):
            def run(self):
                start = time.perf_counter()
                super().run()
                seconds = time.perf_counter() - start
                _log(f"extension build took {seconds:.1f} s")
                # CI prints this (pip hides a build's output unless -v).
                os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
                with open(os.path.join(ROOT, "build", "mpl_fast_build_seconds.txt"), "w") as f:
                    f.write(f"{seconds:.1f}\n")

        return TimedBuildExt.with_options(use_ninja=True)


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import it
    setup(
        packages=find_packages(include=["mpl_fast", "mpl_fast.*"]),
        ext_modules=_extensions(),
        cmdclass={"build_ext": _TimedBuildExt.make()},
    )
