"""CMakeLists.txt builds the op library for C++ users (CPU kernels) and it loads into torch."""

import os
import shutil
import subprocess
import sys

import torch.utils

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cmake() -> str | None:
    """The cmake beside this interpreter (pip's, >= 3.28) before any older one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "cmake")
    return beside if os.path.exists(beside) else shutil.which("cmake")


def test_cmake_configures_builds_and_loads(tmp_path):
    assert _cmake() is not None, "cmake not found: the test extra installs it (pip install 'cmake>=3.28')"
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    configure = subprocess.run(
        [_cmake(), "-S", REPO, "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True, text=True, timeout=300)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compile_ = subprocess.run([_cmake(), "--build", str(build), "-j", "2"], capture_output=True, text=True, timeout=900)
    assert compile_.returncode == 0, compile_.stdout[-5000:] + compile_.stderr[-3000:]
    library = build / "libmpl_fast_ops.so"
    assert library.exists()
    # A fresh interpreter without mpl_fast._C: the CMake library alone registers the ops.
    code = ("import torch\n"
            f"torch.ops.load_library({str(library)!r})\n"
            "print(torch.ops.mpl_fast.scaled_add(torch.ones(3), torch.arange(3.0), 2.0).tolist())\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[1.0, 3.0, 5.0]"
