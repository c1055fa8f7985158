"""Every CUDA kernel of csrc/cuda, executed on the CPU under the SIMT emulator (csrc/emu/simt.h)
from its own source, against the CPU kernel and the reference on the inputs the CPU tests use.

Bit for bit where the op promises CPU == CUDA (augment_apply, scaled_add); fused_sgd_ and
multi_tensor_dot to the tolerances their CUDA tests state (a GPU rounds with FMAs the emulator
does not model; the emulated kernels are compared bit for bit against themselves across
scheduler seeds). What the emulator checks is in docs/cuda_testing.md.
"""

import types

import emulated_build
import pytest
import torch
from sample_images import op_magnitudes, photos

from mpl_fast import augment, ops

SEEDS = (1, 2, 3)  # scheduler seeds: thread order, block order, shared-memory garbage
CHUNK, CUDA_CHUNK = 1 << 15, 1 << 16
DOT_SHAPES = [(), (0,), (1,), (7, 3), (CHUNK - 1,), (CUDA_CHUNK,), (CUDA_CHUNK + 1,), (2 * CUDA_CHUNK + 17,),
              (3, 0, 5), (33, 65)]
SGD_SHAPES = [(), (0,), (1,), (7, 3), (CHUNK + 3,), (2 * CUDA_CHUNK + 5,), (4, 3, 3, 3)]
HYPER = [
    dict(momentum=0.0, weight_decay=0.0, nesterov=False, dampening=0.0, maximize=False),
    dict(momentum=0.9, weight_decay=5e-4, nesterov=True, dampening=0.0, maximize=False),
    dict(momentum=0.9, weight_decay=1e-2, nesterov=False, dampening=0.1, maximize=False),
    dict(momentum=0.5, weight_decay=0.0, nesterov=False, dampening=0.0, maximize=True),
]


@pytest.fixture(scope="module")
def emu():
    return emulated_build.load()


def _lists(shapes, x_dtype=torch.float32, y_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(s, generator=g).to(x_dtype) for s in shapes]
    ys = [torch.randn(s, generator=g).to(y_dtype) for s in shapes]
    return xs, ys


def _oracle(xs, ys):
    return float(sum((x.double().reshape(-1) * y.double().reshape(-1)).sum() for x, y in zip(xs, ys)))


def _tolerance(xs, ys):  # the CPU and CUDA tests' bound: fp32 accumulation against sum |x*y|
    magnitude = sum((x.double().abs().reshape(-1) * y.double().abs().reshape(-1)).sum() for x, y in zip(xs, ys))
    return 1e-6 * float(magnitude) + 1e-7


def _same_bits_every_seed(run):
    """run(seed) -> tensor(s); all seeds must give identical bits. Returns the first result."""
    results = [run(seed) for seed in SEEDS]
    first = results[0] if isinstance(results[0], (list, tuple)) else [results[0]]
    for other in results[1:]:
        other = other if isinstance(other, (list, tuple)) else [other]
        for a, b in zip(first, other):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    return results[0]


# ---------------------------------------------------------------------------------------------
# multi_tensor_dot: partial + finish kernels, launch planning
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_dtype,y_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float64, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.float64, torch.float16)])
def test_dot_matches_cpu_kernel_and_oracle(emu, x_dtype, y_dtype):
    xs, ys = _lists(DOT_SHAPES * 3, x_dtype, y_dtype, seed=7)
    out = _same_bits_every_seed(lambda seed: emu.multi_tensor_dot(xs, ys, seed=seed))
    assert out.dtype == torch.float32 and out.shape == ()
    tol = _tolerance(xs, ys)
    assert abs(float(out) - _oracle(xs, ys)) <= tol
    assert abs(float(out) - float(ops.multi_tensor_dot(xs, ys))) <= 2 * tol


def test_dot_more_tensors_than_one_launch_and_mixed_dtypes(emu):
    g = torch.Generator().manual_seed(8)
    # 260 tensors, most of them empty (they take no block), so the emulation stays short.
    sizes = (torch.randint(0, 3000, (260,), generator=g) * (torch.rand(260, generator=g) < 0.2)).tolist()
    sizes[5], sizes[3], sizes[150], sizes[151] = CUDA_CHUNK + 9, 100, 1000, 77
    xs, ys = _lists([(n,) for n in sizes], seed=9)
    # Dtype changes split the list into runs; 260 tensors need several launches of <= 96 each.
    ys[3], ys[150] = ys[3].half(), ys[150].bfloat16()
    xs[151] = xs[151].double()
    out = _same_bits_every_seed(lambda seed: emu.multi_tensor_dot(xs, ys, seed=seed))
    assert abs(float(out) - _oracle(xs, ys)) <= _tolerance(xs, ys)
    assert abs(float(out) - float(ops.multi_tensor_dot(xs, ys))) <= 2 * _tolerance(xs, ys)


def test_dot_empty_lists_and_only_empty_tensors_give_zero(emu):
    assert float(emu.multi_tensor_dot([], [])) == 0.0
    xs, ys = _lists([(0,), (3, 0)])
    flag = torch.zeros(1)
    assert float(emu.multi_tensor_dot(xs, ys, found_inf=flag)) == 0.0 and float(flag) == 0.0
    assert float(ops.multi_tensor_dot(xs, ys)) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, CUDA_CHUNK + 1])
def test_dot_found_inf_flags_non_finite_values(emu, bad, where):
    xs, ys = _lists([(2 * CUDA_CHUNK + 3,), (40,)], seed=3)
    ys[0][where] = bad
    flag, cpu_flag = torch.zeros(1), torch.zeros(1)
    out = emu.multi_tensor_dot(xs, ys, found_inf=flag)
    cpu = ops.multi_tensor_dot(xs, ys, found_inf=cpu_flag)
    assert not torch.isfinite(out) and float(flag) == 1.0 == float(cpu_flag)
    assert torch.isnan(out) == torch.isnan(cpu)


def test_dot_found_inf_stays_zero_when_finite_and_is_never_cleared(emu):
    xs, ys = _lists([(100,), (3, 3)], seed=5)
    flag = torch.zeros(1)
    emu.multi_tensor_dot(xs, ys, found_inf=flag)
    assert float(flag) == 0.0
    flag.fill_(1.0)
    emu.multi_tensor_dot(xs, ys, found_inf=flag)
    assert float(flag) == 1.0
    flag.zero_()
    out = emu.multi_tensor_dot([torch.tensor([float("inf"), 1.0])], [torch.tensor([0.0, 1.0])], found_inf=flag)
    assert torch.isnan(out) and float(flag) == 1.0


# ---------------------------------------------------------------------------------------------
# fused_sgd_
# ---------------------------------------------------------------------------------------------

def _params(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _sgd_both(emu, params, grads_per_step, hyper, lr, with_update=True, seed=1):
    """Runs the same steps through the CPU kernel and the emulated CUDA kernel."""
    cpu, gpu = [p.clone() for p in params], [p.clone() for p in params]
    momentum = hyper["momentum"]
    bufs_c = [torch.zeros_like(p) for p in params] if momentum else None
    bufs_g = [torch.zeros_like(p) for p in params] if momentum else None
    upd_c = [torch.empty_like(p) for p in params] if with_update else []
    upd_g = [torch.empty_like(p) for p in params] if with_update else []
    for k, grads in enumerate(grads_per_step):
        ops.fused_sgd_(cpu, grads, bufs_c, lr=float(lr) if torch.is_tensor(lr) else lr, first_step=k == 0,
                       update_out=upd_c or None, **hyper)
        emu.fused_sgd_(gpu, grads, bufs_g, lr=lr, first_step=k == 0, update_out=upd_g, seed=seed + k, **hyper)
    return (cpu, bufs_c or [], upd_c), (gpu, bufs_g or [], upd_g)


def _close(a, b, rtol, atol):
    torch.testing.assert_close(b, a, rtol=rtol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}{v}" for k, v in h.items()))
@pytest.mark.parametrize("lr_kind", ["float", "float32-tensor", "float64-tensor"])
def test_sgd_matches_cpu_kernel(emu, hyper, lr_kind):
    params = _params(SGD_SHAPES)
    steps = [_params([p.shape for p in params], seed=s) for s in (1, 2)]
    lr = {"float": 0.1, "float32-tensor": torch.tensor(0.1), "float64-tensor": torch.tensor(0.1, dtype=torch.float64)}
    (cpu, bufs_c, upd_c), (gpu, bufs_g, upd_g) = _sgd_both(emu, params, steps, hyper, lr[lr_kind])
    # The CUDA tests' tolerance (the CPU kernel may contract into FMAs, a GPU too).
    for a, b in zip(cpu + bufs_c + upd_c, gpu + bufs_g + upd_g):
        _close(a, b, rtol=1e-5, atol=1e-6)
    # And the emulated kernel is deterministic: the same bits for other scheduler seeds.
    (_, _, _), (again, bufs_again, upd_again) = _sgd_both(emu, params, steps, hyper, lr[lr_kind], seed=11)
    assert all(torch.equal(a, b) for a, b in zip(gpu + bufs_g + upd_g, again + bufs_again + upd_again))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2), (torch.float64, 1e-12)])
def test_sgd_low_and_high_precision(emu, dtype, tol):
    params = _params(SGD_SHAPES, dtype)
    steps = [_params([p.shape for p in params], dtype, seed=4)]
    (cpu, bufs_c, upd_c), (gpu, bufs_g, upd_g) = _sgd_both(emu, params, steps, HYPER[1], 0.05)
    for a, b in zip(cpu + bufs_c + upd_c, gpu + bufs_g + upd_g):
        assert b.dtype == dtype
        _close(a, b, rtol=tol, atol=tol)


def test_sgd_many_tensors_mixed_dtypes_found_inf_in_and_out(emu):
    shapes = [(n,) for n in range(0, 3000, 20)]  # 150 tensors: three launches of <= 64
    params = _params(shapes)
    params[70], params[71] = params[70].double(), params[71].half()
    grads = [g.to(p.dtype) for g, p in zip(_params(shapes, seed=12), params)]
    old = [p.clone() for p in params]
    upd = [torch.full_like(p, 7.0) for p in params]
    flag_out = torch.zeros(1)
    emu.fused_sgd_(params, grads, None, lr=0.1, found_inf=torch.ones(1), found_inf_out=flag_out, update_out=upd)
    assert all(torch.equal(p, o) for p, o in zip(params, old)), "a skipped step changed a parameter"
    assert all((u == 0).all() for u in upd) and float(flag_out) == 0.0
    emu.fused_sgd_(params, grads, None, lr=0.1, found_inf_out=flag_out)
    assert float(flag_out) == 0.0
    cpu = [o.clone() for o in old]
    ops.fused_sgd_(cpu, grads, None, lr=0.1)
    for a, b in zip(cpu, params):
        _close(a, b, rtol=1e-5, atol=1e-6)
    grads[100][3] = float("nan")
    emu.fused_sgd_(params, grads, None, lr=0.1, found_inf_out=flag_out)
    assert float(flag_out) == 1.0


def test_sgd_non_finite_params_are_reported(emu):
    params = _params([(CUDA_CHUNK + 3,), (5,)])
    params[0][CUDA_CHUNK + 1] = float("inf")
    flag = torch.zeros(1)
    emu.fused_sgd_(params, _params([p.shape for p in params], seed=1), None, lr=0.1, found_inf_out=flag)
    assert float(flag) == 1.0


def test_sgd_empty_list_and_empty_tensors(emu):
    emu.fused_sgd_([], [], None, lr=0.1)
    params = [torch.zeros(0), torch.zeros(3, 0)]
    emu.fused_sgd_(params, [torch.zeros(0), torch.zeros(3, 0)], None, lr=0.1)


# ---------------------------------------------------------------------------------------------
# augment_apply: every op, both policies, odd sizes, shared-memory and scratch paths
# ---------------------------------------------------------------------------------------------

class _Emulated:
    """Routes the augment kernel call (torch.ops.mpl_fast.augment_apply) through the emulated CUDA
    kernel, so apply_op and rand_augment plan on the host exactly as they do for a CUDA batch."""

    def __init__(self, emu, monkeypatch, seed=1):
        kernel = types.SimpleNamespace(default=lambda images, codes, params, fills:
                                       emu.augment_apply(images, codes, params, fills, seed=seed))
        monkeypatch.setattr(torch.ops.mpl_fast, "augment_apply", kernel)


# 7x13 and 37x53 fit the shared-memory path; 224x224 (and 90x90 RGB) use the scratch path.
AUG_SIZES = [(1, 1), (2, 3), (7, 13), (37, 53), (90, 90), (224, 224)]


@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
@pytest.mark.parametrize("size", AUG_SIZES, ids=[f"{h}x{w}" for h, w in AUG_SIZES])
def test_every_op_emulated_equals_cpu_kernel(emu, monkeypatch, size, gray):
    assert emu.lib.mpl_emu_augment_needs_scratch(1 if gray else 3, *size) == (size[0] * size[1] * (1 if gray else 3)
                                                                             * 2 > 40 * 1024)
    cases = []
    for name in ops.OP_NAMES:
        mags = torch.tensor(op_magnitudes(name, *size), dtype=torch.float64)
        images = photos(*size, gray, len(mags))
        cases.append((name, images, mags, ops.apply_op(images, name, mags, fill=9)))
    _Emulated(emu, monkeypatch)
    for name, images, mags, cpu in cases:
        assert torch.equal(ops.apply_op(images, name, mags, fill=9), cpu), name


@pytest.mark.parametrize("policy,magnitude", [("torchvision", 9), ("mpl", 16), ("mpl-imagenet", 10)])
@pytest.mark.parametrize("size", [(7, 13), (32, 32), (224, 224)])
def test_rand_augment_emulated_equals_cpu_kernel(emu, monkeypatch, policy, magnitude, size):
    images = photos(*size, False, 8)
    def run():
        return augment.rand_augment(images, 3, magnitude, policy=policy, generator=torch.Generator().manual_seed(1),
                                cutout=min(size) // 2)
    cpu = run()
    for seed in SEEDS[:2]:
        with monkeypatch.context() as m:
            _Emulated(emu, m, seed)
            assert torch.equal(run(), cpu), seed


def _level_images(kind: str, size=(16, 16), channels=3):
    h, w = size
    if kind == "one-grey-level":
        return torch.full((4, channels, h, w), 117, dtype=torch.uint8)
    levels = torch.arange(256, dtype=torch.uint8).repeat((h * w + 255) // 256)[: h * w].view(h, w)
    base = torch.stack([levels.roll(17 * c) for c in range(channels)])
    return torch.stack([base, base.flip(-1), base.transpose(-1, -2).contiguous() if h == w else base, 255 - base])


@pytest.mark.parametrize("kind", ["one-grey-level", "all-256-levels"])
@pytest.mark.parametrize("channels", [1, 3])
def test_reductions_on_flat_and_full_range_images(emu, monkeypatch, kind, channels):
    images = _level_images(kind, channels=channels)
    cases = [(name, m, ops.apply_op(images, name, m)) for name, m in
             [("Equalize", 0.0), ("AutoContrast", 0.0), ("Contrast", 0.5), ("Contrast", -0.9)]]
    _Emulated(emu, monkeypatch)
    for name, m, cpu in cases:
        assert torch.equal(ops.apply_op(images, name, m), cpu), name


def test_augment_empty_batch_and_cutout(emu, monkeypatch):
    images = photos(37, 53, False, 5)
    cpu = augment.cutout(images, 9, generator=torch.Generator().manual_seed(0))
    _Emulated(emu, monkeypatch)
    assert torch.equal(augment.cutout(images, 9, generator=torch.Generator().manual_seed(0)), cpu)
    assert ops.apply_op(images[:0], "Equalize", 0.0).shape == (0, 3, 37, 53)


# ---------------------------------------------------------------------------------------------
# scaled_add
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 257, 300_001])
def test_scaled_add_emulated_equals_cpu_kernel(emu, dtype, n):
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
    assert torch.equal(emu.scaled_add(x, y, -0.37), ops.scaled_add(x, y, -0.37))
