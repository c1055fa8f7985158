"""setup.py's choice of CPU-only vs CUDA build, without building anything."""

import importlib.util
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("mpl_fast_setup", os.path.join(REPO, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the helpers; setup() only runs as __main__
    return module


def test_no_nvcc_builds_cpu_only_and_says_why(setup_module, monkeypatch, tmp_path):
    monkeypatch.delenv("MPL_FAST_CUDA", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    use_cuda, why = setup_module._want_cuda(torch)
    assert not use_cuda
    assert f"no nvcc at {tmp_path}" in why


def test_forced_cuda_without_nvcc_is_a_clear_error(setup_module, monkeypatch, tmp_path):
    monkeypatch.setenv("MPL_FAST_CUDA", "1")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match="nvcc was not found"):
        setup_module._want_cuda(torch)


def test_forced_cpu_only(setup_module, monkeypatch):
    monkeypatch.setenv("MPL_FAST_CUDA", "0")
    assert setup_module._want_cuda(torch) == (False, "MPL_FAST_CUDA=0")


def test_cpu_only_torch_is_detected(setup_module, monkeypatch, tmp_path):
    monkeypatch.delenv("MPL_FAST_CUDA", raising=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.version, "cuda", None)
    use_cuda, why = setup_module._want_cuda(torch)
    assert not use_cuda and "CPU-only build" in why
