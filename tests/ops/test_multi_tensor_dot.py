"""multi_tensor_dot: against a float64 oracle, layouts, determinism, found_inf, bad input,
opcheck, torch.compile, and the CUDA kernel against the CPU one (on a GPU only)."""


import pytest
import torch
from op_testing import OpTester

from mpl_fast import ops

CHUNK = 1 << 15  # kCpuChunk in csrc/multi_tensor.h
CUDA_CHUNK = 1 << 16
# Sizes around the chunk boundaries of both kernels, odd sizes, empty and 0-dim tensors.
SHAPES = [(), (0,), (1,), (7, 3), (CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2 * CUDA_CHUNK + 17,), (3, 0, 5), (33, 65)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _lists(shapes, x_dtype=torch.float32, y_dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g).to(device=device, dtype=x_dtype) for s in shapes]
    ys = [torch.randn(s, generator=g).to(device=device, dtype=y_dtype) for s in shapes]
    return xs, ys


def _oracle(xs, ys):
    return sum((x.double().reshape(-1) * y.double().reshape(-1)).sum() for x, y in zip(xs, ys))


def _tolerance(xs, ys):
    # fp32 accumulation: relative error ~ n * 2^-24 worst case; measured against sum |x*y|.
    magnitude = sum((x.double().abs().reshape(-1) * y.double().abs().reshape(-1)).sum() for x, y in zip(xs, ys))
    return 1e-6 * float(magnitude) + 1e-7


@pytest.mark.parametrize("x_dtype", DTYPES)
@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64_oracle_all_dtype_pairs(x_dtype, y_dtype):
    xs, ys = _lists(SHAPES, x_dtype, y_dtype)
    out = ops.multi_tensor_dot(xs, ys)
    assert out.dtype == torch.float32 and out.shape == () and out.device.type == "cpu"
    assert abs(float(out) - float(_oracle(xs, ys))) <= _tolerance(xs, ys)
    # The kernel and the reference (the fallback) agree to fp32 round-off as well.
    ref = ops.multi_tensor_dot_reference(xs, ys)
    assert abs(float(out) - float(ref)) <= _tolerance(xs, ys)


def test_known_value_exact():
    xs = [torch.arange(10.0), torch.ones(3, 4)]
    ys = [torch.full((10,), 2.0), torch.full((3, 4), -0.5)]
    assert float(ops.multi_tensor_dot(xs, ys)) == 2 * 45 - 6


def test_deterministic_and_thread_count_independent():
    xs, ys = _lists([(100_003,), (5 * CHUNK + 3,), (17,)] * 3, seed=3)
    first = ops.multi_tensor_dot(xs, ys)
    for _ in range(3):
        assert torch.equal(ops.multi_tensor_dot(xs, ys), first)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.multi_tensor_dot(xs, ys)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(single, first)


def test_thousand_tensor_list():
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(0, 3000, (1200,), generator=g).tolist()
    xs, ys = _lists([(n,) for n in sizes], seed=2)
    out = ops.multi_tensor_dot(xs, ys)
    assert abs(float(out) - float(_oracle(xs, ys))) <= _tolerance(xs, ys)


def test_non_contiguous_inputs():
    base_x, base_y = torch.randn(64, 80), torch.randn(80, 64)
    cases = [
        (base_x[:, ::2], torch.randn(64, 40)),                 # strided view vs contiguous
        (base_x.t(), base_y),                                  # transposed vs contiguous
        (base_x.t(), base_y.t().contiguous().t()),             # both transposed, same strides
        (torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last),
         torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last)),
        (torch.randn(2, 3, 5, 7).to(memory_format=torch.channels_last), torch.randn(2, 3, 5, 7)),
        (torch.randn(5, 1).expand(5, 6), torch.randn(5, 6)),  # overlapping (stride 0)
    ]
    xs, ys = [c[0] for c in cases], [c[1] for c in cases]
    out = ops.multi_tensor_dot(xs, ys)
    assert abs(float(out) - float(_oracle(xs, ys))) <= _tolerance(xs, ys)


def test_empty_lists_give_zero():
    out = ops.multi_tensor_dot([], [])
    assert out.shape == () and float(out) == 0.0 and out.dtype == torch.float32


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("where", ["xs", "ys"])
def test_found_inf_flags_injected_values(bad, where):
    xs, ys = _lists([(CHUNK + 5,), (40,), (9, 9)], seed=4)
    (xs if where == "xs" else ys)[0][CHUNK + 2] = bad
    flag = torch.zeros(1)
    out = ops.multi_tensor_dot(xs, ys, found_inf=flag)
    assert not torch.isfinite(out)
    assert float(flag) == 1.0


def test_found_inf_is_never_cleared_and_stays_zero_when_finite():
    xs, ys = _lists([(100,), (3, 3)], seed=5)
    flag = torch.zeros(1)
    ops.multi_tensor_dot(xs, ys, found_inf=flag)
    assert float(flag) == 0.0
    flag.fill_(1.0)
    ops.multi_tensor_dot(xs, ys, found_inf=flag)
    assert float(flag) == 1.0


def test_inf_times_zero_is_reported():
    flag = torch.zeros(1)
    out = ops.multi_tensor_dot([torch.tensor([float("inf"), 1.0])], [torch.tensor([0.0, 1.0])], found_inf=flag)
    assert torch.isnan(out) and float(flag) == 1.0


@pytest.mark.parametrize("xs,ys,match", [
    ([torch.ones(3)], [torch.ones(3), torch.ones(3)], r"`xs` has 1 tensors but `ys` has 2"),
    ([torch.ones(3), torch.ones(2, 2)], [torch.ones(3), torch.ones(4)], r"`ys\[1\]` must have the shape of `xs\[1\]`"),
    ([torch.ones(3), torch.ones(3, dtype=torch.int64)], [torch.ones(3), torch.ones(3)], r"`xs\[1\]` must be float32"),
    ([torch.ones(3)], [torch.ones(3, dtype=torch.int32)], r"`ys\[0\]` must be float32"),
    ([torch.ones(3)], [torch.ones(3, dtype=torch.complex64)], r"`ys\[0\]` must be float32"),
])
def test_bad_input_names_argument_and_index(xs, ys, match):
    with pytest.raises(ValueError, match=match):
        ops.multi_tensor_dot(xs, ys)
    if len(xs) == len(ys):  # the C++ kernel itself refuses too, with the same names
        with pytest.raises(ValueError, match=match):
            torch.ops.mpl_fast.multi_tensor_dot.default(xs, ys)


def test_none_in_a_list_names_the_index():
    with pytest.raises(TypeError, match=r"`xs\[1\]` must be a tensor, got NoneType"):
        ops.multi_tensor_dot([torch.ones(2), None], [torch.ones(2), torch.ones(2)])


@pytest.mark.parametrize("flag,match", [
    (torch.zeros(2), "`found_inf` must be a float32 tensor with one element"),
    (torch.zeros(1, dtype=torch.float64), "`found_inf` must be a float32 tensor with one element"),
    (torch.zeros(1, device="meta"), "`found_inf` is on meta"),
])
def test_bad_found_inf(flag, match):
    with pytest.raises(ValueError, match=match):
        ops.multi_tensor_dot([torch.ones(2)], [torch.ones(2)], found_inf=flag)


def test_mixed_devices_refused_by_kernel():
    with pytest.raises(ValueError, match=r"`ys\[1\]` is on meta"):
        torch.ops.mpl_fast.multi_tensor_dot.default([torch.ones(2), torch.ones(2)],
                                                    [torch.ones(2), torch.ones(2, device="meta")])


class TestMultiTensorDot(OpTester):
    rtol, atol = 1e-4, 1e-3  # fp32 sums of ~33k products, in another order

    def sample_inputs(self, device):
        return [(_lists([(5,), (3, 4), (CHUNK + 1,)], x_dtype, torch.float32, seed=13, device=device), {})
                for x_dtype in (torch.float32, torch.bfloat16, torch.float64)]

    def function(self, xs, ys):
        return ops.multi_tensor_dot(xs, ys)

    def reference(self, xs, ys):
        return ops.multi_tensor_dot_reference(xs, ys)

    def opcheck_inputs(self, device):
        xs, ys = _lists([(5,), (3, 4), (CHUNK + 1,)], torch.float32, torch.bfloat16, device=device)
        return [(torch.ops.mpl_fast.multi_tensor_dot.default, (xs, ys), {}),
                (torch.ops.mpl_fast.multi_tensor_dot.found_inf, (xs, ys, torch.zeros(1, device=device)), {})]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_under_compile_fullgraph(backend):
    torch._dynamo.reset()

    def plain(xs, ys):
        return 0.05 * ops.multi_tensor_dot(xs, ys)

    xs, ys = _lists([(5,), (3, 4)], seed=6)
    torch.testing.assert_close(torch.compile(plain, fullgraph=True, backend=backend)(xs, ys), plain(xs, ys))

    def feedback(xs, ys, flag):
        return 0.05 * ops.multi_tensor_dot(xs, ys, found_inf=flag)

    compiled = torch.compile(feedback, fullgraph=True, backend=backend)
    flag = torch.zeros(1)
    torch.testing.assert_close(compiled(xs, ys, flag), feedback(xs, ys, torch.zeros(1)))
    ys[1][0, 0] = float("nan")
    compiled(xs, ys, flag)
    assert float(flag) == 1.0  # the in-place flag update survives functionalisation


def test_reference_fallback_without_extension(python_without_extension):
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "import torch, mpl_fast\n"
            "f = torch.zeros(1)\n"
            "out = mpl_fast.ops.multi_tensor_dot([torch.ones(3), torch.full((2,), float('inf'))],"
            " [torch.ones(3), torch.ones(2)], found_inf=f)\n"
            "print(mpl_fast.ops.backend(), out.item(), f.item())\n")
    stdout = python_without_extension(code)
    assert stdout.split() == ["reference", "inf", "1.0"]


@pytest.mark.cuda
@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float64, torch.float32)])
def test_cuda_matches_oracle(x_dtype, y_dtype):
    xs, ys = _lists(SHAPES * 3, x_dtype, y_dtype, seed=7)
    out = ops.multi_tensor_dot([x.cuda() for x in xs], [y.cuda() for y in ys])
    assert out.device.type == "cuda" and out.dtype == torch.float32 and out.shape == ()
    assert abs(float(out) - float(_oracle(xs, ys))) <= _tolerance(xs, ys)


@pytest.mark.cuda
def test_cuda_thousand_tensors_split_launches_and_deterministic():
    g = torch.Generator().manual_seed(8)
    sizes = torch.randint(0, 50_000, (1500,), generator=g).tolist()  # ~37M values
    xs, ys = _lists([(n,) for n in sizes], seed=9, device="cuda")
    # Mixed dtype pairs in one list go to separate launches of the same partials buffer.
    ys[3] = ys[3].half()
    ys[700] = ys[700].bfloat16()
    out = ops.multi_tensor_dot(xs, ys)
    assert abs(float(out) - float(_oracle([x.cpu() for x in xs], [y.cpu() for y in ys]))) <= _tolerance(xs, ys)
    assert all(torch.equal(ops.multi_tensor_dot(xs, ys), out) for _ in range(3))


@pytest.mark.cuda
def test_cuda_found_inf_non_contiguous_and_opcheck():
    xs, ys = _lists([(CUDA_CHUNK + 3,), (64, 80)], seed=10, device="cuda")
    xs[1] = xs[1].t()
    flag = torch.zeros(1, device="cuda")
    out = ops.multi_tensor_dot(xs, ys, found_inf=flag)
    assert abs(float(out) - float(_oracle(xs, ys))) <= _tolerance(xs, ys) and float(flag) == 0.0
    ys[0][CUDA_CHUNK + 1] = float("nan")
    ops.multi_tensor_dot(xs, ys, found_inf=flag)
    assert float(flag) == 1.0
    torch.library.opcheck(torch.ops.mpl_fast.multi_tensor_dot.default, (xs, ys))
    with pytest.raises(ValueError, match=r"`ys\[1\]` is on cpu"):
        ops.multi_tensor_dot(xs, [ys[0], ys[1].cpu()])


def _grads_of(fn, xs, ys):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    ys = [y.detach().clone().requires_grad_() for y in ys]
    (3.0 * fn(xs, ys)).backward()
    return [x.grad for x in xs], [y.grad for y in ys]


def test_gradient_is_g_times_the_other_list_on_both_backends():
    xs, ys = _lists([(5,), (3, 4)], torch.float32, torch.float64, seed=11)
    flagged = lambda a, b: ops.multi_tensor_dot(a, b, found_inf=torch.zeros(1))  # noqa: E731
    for fn in (ops.multi_tensor_dot, ops.multi_tensor_dot_reference, flagged):
        gx, gy = _grads_of(fn, xs, ys)
        for x, y, a, b in zip(xs, ys, gx, gy):
            assert a.dtype == x.dtype and b.dtype == y.dtype
            torch.testing.assert_close(a, (3.0 * y).to(x.dtype))
            torch.testing.assert_close(b, (3.0 * x).to(y.dtype))


def test_opcheck_with_autograd_and_no_warnings():
    import warnings

    xs, ys = _lists([(5,), (3, 4)], seed=12)
    xs = [x.requires_grad_() for x in xs]
    ys = [y.requires_grad_() for y in ys]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.library.opcheck(torch.ops.mpl_fast.multi_tensor_dot.default, (xs, ys))
    # Only the op's own warnings count: torch's fake-tensor conversion warns about reading the
    # .grad of the non-leaf copies opcheck makes.
    ours = [str(w.message) for w in seen if "autograd kernel was not registered" in str(w.message)
            or "multi_tensor_dot" in str(w.message)]
    assert not ours, ours
