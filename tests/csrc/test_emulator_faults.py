"""The emulated tests bite: variants of csrc/cuda with one deliberate fault each (a textual patch
of a copy of the sources, never a switch in production code) must fail the emulated checks that
the unpatched kernels pass. Each check is a small piece of test_cuda_emulated.py's parity tests.
The variants are compiled in parallel, once per source text (build/emulated/ caches them)."""

from concurrent.futures import ThreadPoolExecutor

import emulated_build
import pytest
import torch
from emulated_build import EmulatorError

from mpl_fast import ops

MT = "cuda/multi_tensor_kernels.cuh"
AUG = "cuda/augment_kernels.cuh"
CUDA_CHUNK = 1 << 16


# ------------------------------------------------------------------ checks (pass on the real kernels)

def check_dot(emu):
    """Chunk-straddling tensors, more than one launch holds, against the float64 oracle."""
    g = torch.Generator().manual_seed(0)
    sizes = [3 * CUDA_CHUNK + 5, 17, 0, 2 * CUDA_CHUNK] + [int(n) for n in torch.randint(1, 700, (100,), generator=g)]
    xs = [torch.randn(n, generator=g) for n in sizes]
    ys = [torch.randn(n, generator=g) for n in sizes]
    oracle = float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))
    bound = 1e-6 * float(sum((x.double().abs() * y.double().abs()).sum() for x, y in zip(xs, ys))) + 1e-7
    for seed in (1, 2, 3):
        assert abs(float(emu.multi_tensor_dot(xs, ys, seed=seed)) - oracle) <= bound, f"dot, scheduler seed {seed}"


def check_dot_only_empty(emu):
    """A list of empty tensors only: no chunk launch at all, then the finish kernel's 0."""
    flag = torch.zeros(1)
    assert float(emu.multi_tensor_dot([torch.zeros(0), torch.zeros(2, 0)], [torch.zeros(0), torch.zeros(2, 0)],
                                      found_inf=flag)) == 0.0 and float(flag) == 0.0


def check_sgd(emu):
    """Several chunks and tensors: the emulated step equals the CPU kernel's."""
    g = torch.Generator().manual_seed(1)
    shapes = [(2 * CUDA_CHUNK + 7,), (CUDA_CHUNK,), (5,), (300,)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = [torch.randn(s, generator=g) for s in shapes]
    cpu, emulated = [p.clone() for p in params], [p.clone() for p in params]
    ops.fused_sgd_(cpu, grads, None, lr=0.1)
    emu.fused_sgd_(emulated, grads, None, lr=0.1)
    for a, b in zip(cpu, emulated):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _images(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (4, 3, h, w), generator=g, dtype=torch.uint8)


def check_augment(emu, size=(37, 53), names=("Equalize", "AutoContrast", "Contrast", "Sharpness", "Rotate")):
    """Reductions and a geometric op, against the CPU kernel, for three scheduler seeds."""
    images = _images(*size)
    for name in names:
        plan = ops.AugmentPlan(torch.full((4, 1), ops.OP_INDEX[name]), torch.tensor([[0.5], [-0.3], [0.2], [0.9]],
                             dtype=torch.float64), torch.zeros(4, 1, 4, dtype=torch.float64))
        codes, params = ops.plan_to_kernel_args(plan, *size)
        cpu = torch.ops.mpl_fast.augment_apply.default(images, codes, params, [9, 9, 9])
        for seed in (1, 2, 3):
            assert torch.equal(emu.augment_apply(images, codes, params, [9, 9, 9], seed=seed), cpu), (name, seed)


def check_augment_large(emu):
    check_augment(emu, size=(224, 224), names=("Equalize", "Rotate"))


def check_augment_near_budget(emu):
    """3x88x88: two images' bytes just under the 40 KB shared-memory budget."""
    check_augment(emu, size=(88, 88), names=("Equalize",))


# ------------------------------------------------------------------ the faults

FAULTS = {
    "block_sum without its __syncthreads": (
        {MT: [("  if (lane == 0) warp_sums[warp] = v;\n  __syncthreads();\n",
               "  if (lane == 0) warp_sums[warp] = v;\n")]}, check_dot),
    "Equalize without the barrier after the histogram": (
        {AUG: [("atomicAdd(&sh.hist[i / plane][src[i]], 1);\n      __syncthreads();\n",
                "atomicAdd(&sh.hist[i / plane][src[i]], 1);\n")]}, check_augment),
    "Contrast sum never zeroed": (
        {AUG: [("      if (tid == 0) sh.sum = 0;\n", "")]}, check_augment),
    "off-by-one in the block-to-tensor search": (
        {MT: [("if (first_block[mid] <= b) lo = mid;", "if (first_block[mid] < b) lo = mid;")]}, check_sgd),
    "block-to-tensor search ignores the last tensor": (
        {MT: [("int lo = 0, hi = num_tensors - 1;", "int lo = 0, hi = num_tensors - 2;")]}, check_dot),
    "shared warp_sums one element too small": (
        {MT: [("__shared__ acc_t warp_sums[kThreads / 32];", "__shared__ acc_t warp_sums[kThreads / 32 - 1];")]},
        check_dot),
    "Shared histogram one bin too small": (
        {AUG: [("  int32_t hist[kMaxChannels][kHistBins];", "  int32_t hist[kMaxChannels][kHistBins - 1];")]},
        check_augment),
    "dynamic shared memory one byte short": (
        {AUG: [("in_shared ? static_cast<size_t>(2 * numel) : 0}", "in_shared ? static_cast<size_t>(2 * numel - 1) : 0}")]},
        check_augment),
    "kernel-argument struct over the parameter limit": (
        {MT: [("constexpr int kDotTensors = 96;", "constexpr int kDotTensors = 130;")]}, check_dot),
    "launch with more threads than __launch_bounds__": (
        {AUG: [("__launch_bounds__(kMaxThreads) augment_kernel", "__launch_bounds__(256) augment_kernel")]},
        check_augment_large),
    "shared-memory budget past 48 KB with the static Shared": (
        {AUG: [("kSmemBudget = 40 * 1024;", "kSmemBudget = 46 * 1024;")]}, check_augment_near_budget),
    "zero-block launch for a run of empty tensors": (
        {MT: [("    if (blocks == 0) continue;\n", "")]}, check_dot_only_empty),
    "dot chunk loop reads one element past the chunk": (
        {MT: [("for (; i < n; i += kThreads) a0 +=", "for (; i <= n; i += kThreads) a0 +=")]}, check_dot),
}


@pytest.fixture(scope="module")
def builds():
    """The unpatched build and every fault variant, compiled two at a time."""
    names = list(FAULTS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        real = pool.submit(emulated_build.load)
        variants = dict(zip(names, pool.map(lambda n: emulated_build.load(FAULTS[n][0]), names)))
    return real.result(), variants


@pytest.mark.parametrize("check", [check_dot, check_dot_only_empty, check_sgd, check_augment, check_augment_large,
                                   check_augment_near_budget], ids=lambda f: f.__name__)
def test_checks_pass_on_the_real_kernels(builds, check):
    check(builds[0])


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_variant_fails_the_emulated_check(builds, fault):
    _, check = FAULTS[fault]
    with pytest.raises((AssertionError, EmulatorError)) as caught:
        check(builds[1][fault])
    print(f"{fault}: {type(caught.value).__name__}: {str(caught.value).splitlines()[0][:200]}")
