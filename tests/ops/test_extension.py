"""The op path end to end: extension loading, backend choice, fallback, and the smoke op."""

import os
import sys

import pytest
import torch
from op_testing import OpTester

import mpl_fast
from mpl_fast import ops
from mpl_fast.ops import extension

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_extension_is_loaded_here():
    # The test command builds the extension first: a silent fallback here would hide a broken build.
    info = ops.build_info()
    assert info["loaded"], info
    assert ops.backend() in ("cpu", "cuda")
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]


def test_fallback_without_extension_warns_once_and_still_works(python_without_extension):
    code = ("import warnings, torch\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import mpl_fast\n"
            "    x = torch.ones(3); out = mpl_fast.ops.scaled_add(x, x, 2.0)\n"
            "print(mpl_fast.ops.backend(), out.tolist(), len([m for m in w if 'mpl_fast' in str(m.message)]))\n"
            "print(w[0].message)\n")
    stdout = python_without_extension(code)
    first, message = stdout.splitlines()[:2]
    assert first == "reference [3.0, 3.0, 3.0] 1"
    assert "MPL_FAST_NO_EXTENSION=1" in message and "pip install" in message


def test_stale_extension_is_detected(monkeypatch):
    class StaleModule:
        @staticmethod
        def build_info():
            return {"torch_version": "1.0.0", "with_cuda": False}

    monkeypatch.setitem(sys.modules, "mpl_fast._C", StaleModule)
    monkeypatch.setattr(mpl_fast, "_C", StaleModule, raising=False)
    module, error = extension.load()
    assert module is None
    assert "built for torch 1.0.0" in error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7, 3), (1000, 33)])
def test_scaled_add_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    y = torch.randn(shape, generator=g).to(dtype)
    out = ops.scaled_add(x, y, -1.5)
    assert out.dtype == dtype and out.shape == x.shape
    expected = (x.double() - 1.5 * y.double())
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(out, ops.scaled_add_reference(x, y, -1.5), rtol=0, atol=0)


def test_scaled_add_non_contiguous():
    x = torch.randn(6, 8)[:, ::2]
    y = torch.randn(4, 6).t()
    torch.testing.assert_close(ops.scaled_add(x, y, 3.0), x + 3.0 * y)


class TestScaledAdd(OpTester):
    rtol = atol = 0  # the kernel computes exactly what the reference does

    def sample_inputs(self, device):
        g = torch.Generator().manual_seed(1)
        return [((torch.randn(shape, generator=g).to(device, dtype), torch.randn(shape, generator=g).to(device, dtype),
                  -1.5), {})
                for dtype in (torch.float32, torch.float64, torch.bfloat16) for shape in [(), (0,), (7, 3), (1000, 33)]]

    def function(self, x, y, alpha):
        return ops.scaled_add(x, y, alpha)

    def reference(self, x, y, alpha):
        return ops.scaled_add_reference(x, y, alpha)

    def opcheck_inputs(self, device):
        return [(torch.ops.mpl_fast.scaled_add.default, (torch.randn(4, 5, device=device),
                                                         torch.randn(4, 5, device=device), 0.5), {})]


@pytest.mark.parametrize("x,y,match", [
    (torch.ones(3), torch.ones(4), "`y` must have the shape of `x`"),
    (torch.ones(3, dtype=torch.int64), torch.ones(3, dtype=torch.int64), "`x` must be a floating-point"),
    (torch.ones(3), torch.ones(3, dtype=torch.float64), "`y` must have the dtype of `x`"),
])
def test_scaled_add_bad_input(x, y, match):
    with pytest.raises(ValueError, match=match):
        ops.scaled_add(x, y, 1.0)


@pytest.mark.cuda
def test_scaled_add_cuda_matches_cpu():
    x, y = torch.randn(1001), torch.randn(1001)
    out = ops.scaled_add(x.cuda(), y.cuda(), 0.25)
    torch.testing.assert_close(out.cpu(), ops.scaled_add(x, y, 0.25))


def test_missing_extension_is_named_not_a_circular_import(monkeypatch):
    def not_built(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(extension.importlib, "import_module", not_built)
    module, error = extension.load()
    assert module is None
    assert error.startswith("mpl_fast._C was not built")


def test_ops_list_matches_the_schemas():
    import re

    with open(os.path.join(REPO, "csrc", "ops.cpp")) as f:
        declared = set(re.findall(r'm\.def\(\s*"(\w+)[(.]', f.read()))
    assert declared == set(extension.OPS)


def test_extension_older_than_the_source_is_detected(monkeypatch):
    monkeypatch.setattr(extension, "OPS", extension.OPS + ("op_from_the_future",))
    module, error = extension.load()
    assert module is None
    assert "older than this source" in error and "mpl_fast::op_from_the_future" in error


def test_kernel_codes_match_the_cpp_enum():
    # csrc/augment.h's `enum OpCode` is the source of truth; ops.KernelCode mirrors it.
    import re

    with open(os.path.join(REPO, "csrc", "augment.h")) as f:
        header = f.read()
    body = re.search(r"enum\s+OpCode\b[^{]*\{(.*?)\};", header, re.S).group(1)
    entries = dict((name, int(value)) for name, value in re.findall(r"\bk(\w+)\s*=\s*(\d+)", body))
    count = entries.pop("NumOpCodes")
    snake = {re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper(): value for name, value in entries.items()}
    assert snake == {code.name: int(code) for code in ops.KernelCode}
    assert count == len(ops.KernelCode)
    params = re.search(r"constexpr\s+int\s+kParamsPerOp\s*=\s*(\d+)", header).group(1)
    assert int(params) == ops.PARAMS_PER_OP
