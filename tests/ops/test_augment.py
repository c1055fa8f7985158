"""Batched RandAugment / Cutout ops against torchvision, on real photos (scikit-image)."""


import pytest
import torch
from op_testing import OpTester
from sample_images import op_magnitudes, photos
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import RandAugment as TorchvisionRandAugment
from torchvision.transforms.autoaugment import _apply_op

from mpl_fast import ops
from mpl_fast.augment import Cutout, RandAugment, cutout, get_policy, rand_augment, sample_plan, torchvision_table
from mpl_fast.ops import OP_INDEX, OP_NAMES, AugmentPlan, KernelCode, apply_plan_reference, plan_to_kernel_args

SIZES = [(1, 1), (2, 3), (3, 3), (32, 32), (37, 53), (224, 224)]


def _reference(images: torch.Tensor, name: str, magnitudes, fill) -> torch.Tensor:
    fill_list = [float(f) for f in (fill if isinstance(fill, (list, tuple)) else [fill] * images.shape[1])]
    return torch.stack([_apply_op(img, name, float(m), interpolation=InterpolationMode.NEAREST, fill=fill_list)
                        for img, m in zip(images, magnitudes)])


def assert_matches_contract(out: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """The issue's contract: at least 99% of the pixels within +-1 of torchvision."""
    assert out.shape == expected.shape and out.dtype == torch.uint8, what
    diff = (out.int() - expected.int()).abs()
    within = (diff <= 1).float().mean().item()
    assert within >= 0.99, f"{what}: only {within:.4f} of pixels within +-1 (max diff {diff.max().item()})"


# ---------------------------------------------------------------------------------------------
# Each op against torchvision's _apply_op
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
@pytest.mark.parametrize("name", OP_NAMES)
def test_apply_op_matches_torchvision(name, size, gray):
    height, width = size
    mags = op_magnitudes(name, height, width)
    images = photos(height, width, gray, len(mags))
    fill = 7 if gray else [10, 200, 30]
    magnitudes = torch.tensor(mags, dtype=torch.float64)
    out = ops.apply_op(images, name, magnitudes, fill=fill)
    expected = _reference(images, name, mags, fill)
    assert_matches_contract(out, expected, f"{name} {size} gray={gray}")
    # Stronger than the contract: the kernels reproduce torchvision's float32 arithmetic.
    assert (out != expected).float().mean().item() <= 0.001, f"{name} {size}: not bit-exact"


def test_apply_op_really_changes_images():
    # Guards against a kernel that returns its input: every non-identity op changes a photo.
    images = photos(32, 32, False, 2)
    for name, m in [("ShearX", 0.3), ("ShearY", -0.3), ("TranslateX", 9.0), ("TranslateY", -9.0), ("Rotate", 30.0),
                    ("Brightness", 0.5), ("Color", -0.9), ("Contrast", 0.9), ("Sharpness", 0.9), ("Posterize", 2.0),
                    ("Solarize", 100.0), ("AutoContrast", 0.0), ("Equalize", 0.0), ("Invert", 0.0)]:
        assert not torch.equal(ops.apply_op(images, name, torch.full((2,), m)), images), name


def test_apply_op_per_image_magnitudes_and_float32_magnitudes():
    images = photos(37, 53, False, 4)
    mags = torch.tensor([-20.0, -3.5, 7.25, 30.0], dtype=torch.float32)
    out = ops.apply_op(images, "Rotate", mags)
    assert_matches_contract(out, _reference(images, "Rotate", mags.tolist(), 0), "rotate")
    assert torch.equal(out[2], ops.apply_op(images[2:3], "Rotate", mags[2:3])[0])


def test_apply_op_accepts_non_contiguous_images_and_scalar_magnitude():
    images = photos(32, 32, False, 3).permute(0, 1, 3, 2)  # non-contiguous view
    out = ops.apply_op(images, "ShearX", 0.2)
    assert_matches_contract(out, _reference(images, "ShearX", [0.2] * 3, 0), "non-contiguous")


def test_empty_batch():
    images = torch.zeros(0, 3, 8, 8, dtype=torch.uint8)
    assert ops.apply_op(images, "Rotate", torch.zeros(0)).shape == (0, 3, 8, 8)
    assert rand_augment(images).shape == (0, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# Cutout
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 5, 16, 100])
def test_cutout_box(size):
    images = photos(37, 53, False, 8)
    g = torch.Generator().manual_seed(3)
    out = cutout(images, size, fill=(1, 2, 3), generator=g)
    g.manual_seed(3)
    expected = images.clone()
    cy = torch.randint(37, (8, 1), generator=g)
    cx = torch.randint(53, (8, 1), generator=g)
    for i in range(8):
        y0, x0 = int(cy[i]) - size // 2, int(cx[i]) - size // 2
        rows = slice(max(y0, 0), max(min(y0 + size, 37), 0))
        cols = slice(max(x0, 0), max(min(x0 + size, 53), 0))
        expected[i, :, rows, cols] = torch.tensor([1, 2, 3], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(out, expected)
    if size == 100:
        assert (out == torch.tensor([1, 2, 3], dtype=torch.uint8).view(1, 3, 1, 1)).all()


def test_cutout_default_fill_is_mpl_grey():
    out = cutout(torch.zeros(4, 1, 9, 9, dtype=torch.uint8), 4, generator=torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0, 128}


# ---------------------------------------------------------------------------------------------
# rand_augment: distribution, reproducibility, kernel vs reference on whole plans
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_bins,magnitude", [(31, 9), (31, 0), (31, 30), (10, 7), (2, 1)])
@pytest.mark.parametrize("size", [(32, 32), (37, 53)])
def test_torchvision_table_equals_torchvision(num_bins, magnitude, size):
    space = TorchvisionRandAugment._augmentation_space(None, num_bins, size)
    ours = torchvision_table(magnitude, num_bins, *size)
    assert [name for name, _, _ in ours] == list(space)
    for name, value, signed in ours:
        values, tv_signed = space[name]
        tv_value = float(values[magnitude].item()) if values.ndim > 0 else 0.0
        assert (value, signed) == (tv_value, tv_signed), name


def test_rand_augment_distribution_matches_torchvision():
    from scipy.stats import chisquare

    n, k = 7000, 2
    drawn = sample_plan((n, 3, 32, 32), k, 9, 31, "torchvision", torch.Generator().manual_seed(0))
    space = TorchvisionRandAugment._augmentation_space(None, 31, (32, 32))
    names = list(space)
    op_ids = drawn.plan.op_ids.flatten()
    counts = torch.bincount(op_ids, minlength=len(OP_NAMES)).tolist()
    observed = [counts[OP_INDEX[name]] for name in names]
    assert sum(observed) == n * k  # only torchvision's 14 ops (no Invert, no Cutout)
    assert chisquare(observed).pvalue > 1e-3, observed
    mags = drawn.plan.magnitudes.flatten()
    for name in names:
        values, signed = space[name]
        expected = float(values[9].item()) if values.ndim > 0 else 0.0
        mine = mags[op_ids == OP_INDEX[name]]
        assert set(mine.abs().tolist()) <= {abs(expected)}, name
        if signed and expected != 0:
            negative = int((mine < 0).sum())
            assert chisquare([negative, len(mine) - negative]).pvalue > 1e-3, name
        else:
            assert (mine == expected).all(), name


def test_mpl_policy_numbers():
    # Level 16 on CIFAR (32x32): MPL's formulas (see mpl_fast/augment/policies.py for sources).
    table = {name: (value, signed) for name, value, signed in get_policy("mpl").table(16, 31, 32, 32)}
    assert len(table) == 15 and "Identity" not in table
    assert table["Rotate"] == (pytest.approx(48.0), True)
    assert table["Posterize"] == (6.0, False)
    assert table["Solarize"] == (153.0, False)  # int 409, cast to uint8 by MPL's solarize: wraps to 153
    wrapped = {level: dict((n, v) for n, v, _ in get_policy("mpl").table(level, 31, 32, 32))["Solarize"]
               for level in (9, 10, 17)}
    assert wrapped == {9: 230.0, 10: 0.0, 17: 179.0}
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert table[name] == (pytest.approx(1.98), False)
    assert table["ShearX"] == (pytest.approx(0.48), True)
    assert table["TranslateX"] == (pytest.approx(6.4), True)
    assert table["Cutout"] == (12.0, False)
    imagenet = {name: v for name, v, _ in get_policy("mpl-imagenet").table(10, 31, 224, 224)}
    assert imagenet["TranslateY"] == pytest.approx(100.0) and imagenet["Cutout"] == 80.0


def test_mpl_apply_probability_skips_steps():
    drawn = sample_plan((4000, 3, 32, 32), 2, 10, 31, "mpl", torch.Generator().manual_seed(1))
    skipped = (drawn.plan.op_ids == OP_INDEX["Identity"]).float().mean().item()
    assert abs(skipped - 0.5) < 0.03  # p ~ U(0.2, 0.8): a step is skipped half the time on average


@pytest.mark.parametrize("policy,magnitude", [("torchvision", 9), ("torchvision", 30), ("mpl", 16), ("mpl", 7),
                                              ("mpl-imagenet", 10)])
@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
def test_rand_augment_kernel_equals_reference(policy, magnitude, gray):
    images = photos(37, 53, gray, 24)
    g = torch.Generator().manual_seed(11)
    out = rand_augment(images, num_ops=3, magnitude=magnitude, policy=policy, generator=g, cutout=10)
    g.manual_seed(11)
    drawn = sample_plan(images.shape, 3, magnitude, 31, policy, g, final_cutout=10)
    expected = apply_plan_reference(images, drawn.plan, drawn.fill)
    assert_matches_contract(out, expected, policy)
    assert torch.equal(out, expected)


def test_rand_augment_seed_reproduces_and_differs():
    images = photos(32, 32, False, 16)
    a = rand_augment(images, generator=torch.Generator().manual_seed(5), policy="mpl", magnitude=16, cutout=16)
    b = rand_augment(images, generator=torch.Generator().manual_seed(5), policy="mpl", magnitude=16, cutout=16)
    c = rand_augment(images, generator=torch.Generator().manual_seed(6), policy="mpl", magnitude=16, cutout=16)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    d = rand_augment(images)
    torch.manual_seed(0)
    assert torch.equal(d, rand_augment(images))  # no generator: torch's global CPU generator


def test_modules_match_functional():
    images = photos(32, 32, False, 8)
    module = RandAugment(num_ops=2, magnitude=12, policy="mpl", cutout=16, generator=torch.Generator().manual_seed(2))
    expected = rand_augment(images, 2, 12, policy="mpl", generator=torch.Generator().manual_seed(2), cutout=16)
    assert torch.equal(module(images), expected)
    cut = Cutout(8, fill=0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(cut(images), cutout(images, 8, fill=0, generator=torch.Generator().manual_seed(4)))
    assert "policy='mpl'" in repr(module)


# ---------------------------------------------------------------------------------------------
# The op path: opcheck, compile, fallback
# ---------------------------------------------------------------------------------------------

def _kernel_args(n=3, h=9, w=7):
    images = photos(h, w, False, n)
    drawn = sample_plan(images.shape, 3, 9, 31, "torchvision", torch.Generator().manual_seed(0), final_cutout=4)
    return images, drawn.codes, drawn.params, [5, 6, 7]


class TestApplyOp(OpTester):
    rtol, atol = 0, 1  # the contract: torchvision's pixels to +-1 (in practice bit-exact)

    def sample_inputs(self, device):
        images = photos(9, 7, False, 3).to(device)
        return [((images, name, torch.tensor([-m, 0.5 * m, m], dtype=torch.float64), 5), {})
                for name, m in [("Rotate", 25.0), ("ShearY", 0.3), ("TranslateX", 3.0), ("Contrast", 0.8),
                                ("Sharpness", 0.9), ("Equalize", 0.0), ("Invert", 0.0)]]

    def function(self, images, name, magnitudes, fill):
        return ops.apply_op(images, name, magnitudes, fill)

    def reference(self, images, name, magnitudes, fill):
        return _reference(images, name, magnitudes.tolist(), fill)

    def opcheck_inputs(self, device):
        images, codes, params, fill = _kernel_args()
        drawn = sample_plan(images.shape, 3, 9, 31, "torchvision", torch.Generator().manual_seed(0), final_cutout=4)
        return [(torch.ops.mpl_fast.augment_apply.default, (images.to(device), codes.to(device), params.to(device),
                                                              fill), {}),
                (torch.ops.mpl_fast_reference.augment_plan.default,
                 (images.to(device), *drawn.plan, fill), {})]


def test_raw_op_under_compile():
    raw = torch.compile(lambda *a: torch.ops.mpl_fast.augment_apply.default(*a), fullgraph=True, backend="eager")
    args = _kernel_args()
    assert torch.equal(raw(*args), torch.ops.mpl_fast.augment_apply.default(*args))


def test_fallback_without_extension_matches_kernel(python_without_extension):
    code = ("import torch, mpl_fast, mpl_fast.augment\n"
            "x = (torch.arange(2 * 3 * 11 * 13) * 37 % 256).to(torch.uint8).view(2, 3, 11, 13)\n"
            "y = mpl_fast.augment.rand_augment(x, 3, 20, generator=torch.Generator().manual_seed(9), cutout=4)\n"
            "print(mpl_fast.ops.backend(), y.sum().item(), y.flatten()[::7].tolist())\n")
    stdout = python_without_extension(code)
    backend, rest = stdout.strip().split(" ", 1)
    assert backend == "reference"
    x = (torch.arange(2 * 3 * 11 * 13) * 37 % 256).to(torch.uint8).view(2, 3, 11, 13)
    y = rand_augment(x, 3, 20, generator=torch.Generator().manual_seed(9), cutout=4)
    assert rest == f"{y.sum().item()} {y.flatten()[::7].tolist()}"


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4), "Invert", torch.zeros(2)), "`images` must be a uint8"),
    (lambda: ops.apply_op(torch.zeros(3, 4, 4, dtype=torch.uint8), "Invert", torch.zeros(3)), "`images` must have shape"),
    (lambda: ops.apply_op(torch.zeros(2, 2, 4, 4, dtype=torch.uint8), "Invert", torch.zeros(2)), "1 or 3 channels"),
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "Blur", torch.zeros(2)), "`name` must be one of"),
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "Rotate", torch.zeros(3)), "`magnitudes` must have shape"),
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "Rotate", torch.zeros(2, device="meta")),
     "`magnitudes` must be on the CPU or on the device of `images`"),
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "Brightness", torch.full((2,), -1.5)),
     "`magnitudes` of Brightness"),
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "Posterize", torch.full((2,), 9.0)),
     "`magnitudes` of Posterize"),
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "Rotate", torch.zeros(2), fill=[1, 2]), "`fill` must have"),
    (lambda: ops.apply_op(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "Rotate", torch.zeros(2), fill=300), r"`fill\[0\]`"),
    (lambda: cutout(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), -1), "`size` must be a non-negative int"),
    (lambda: cutout(torch.zeros(2, 3, 4, 4, dtype=torch.float32), 2), "`images` must be a uint8"),
    (lambda: rand_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), num_ops=-1), "`num_ops`"),
    (lambda: rand_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), magnitude=31), "`magnitude` must be a bin"),
    (lambda: rand_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), magnitude=-2, policy="mpl"), "`magnitude`"),
    (lambda: rand_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), num_magnitude_bins=1), "`num_magnitude_bins`"),
    (lambda: rand_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), policy="fixmatch"), "`policy` must be one of"),
    (lambda: rand_augment(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), cutout=-3), "`cutout`"),
])
def test_bad_input_raises_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("mutate,match", [
    (lambda a: (a[0].float(), *a[1:]), "`images` must be a uint8"),
    (lambda a: (a[0][0], *a[1:]), "`images` must have shape"),
    (lambda a: (a[0], a[1].long(), *a[2:]), "`codes` must be an int32"),
    (lambda a: (a[0], a[1][:2], *a[2:]), "`codes` must have shape"),
    (lambda a: (a[0], a[1], a[2][:, :, :5], a[3]), "`params` must have shape"),
    (lambda a: (a[0], a[1], a[2].double(), a[3]), "`params` must be a float32"),
    (lambda a: (a[0], a[1], a[2], [1, 2]), "`fill` must have 1 or C"),
    (lambda a: (a[0], a[1], a[2], [256]), r"`fill\[0\]` must be in \[0, 255\]"),
    (lambda a: (a[0], torch.full_like(a[1], 99), a[2], a[3]), r"`codes\[0\]\[0\]` must be an op code"),
])
def test_raw_op_bad_input(mutate, match):
    with pytest.raises(ValueError, match=match):
        torch.ops.mpl_fast.augment_apply.default(*mutate(_kernel_args()))


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): same images as the CPU kernel
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("size", [(1, 1), (2, 3), (32, 32), (37, 53), (224, 224)])
@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
def test_cuda_apply_op_equals_cpu(size, gray):
    for name in OP_NAMES:
        mags = torch.tensor(op_magnitudes(name, *size), dtype=torch.float64)
        images = photos(*size, gray, len(mags))
        cpu = ops.apply_op(images, name, mags, fill=9)
        assert torch.equal(ops.apply_op(images.cuda(), name, mags, fill=9).cpu(), cpu), name
        assert torch.equal(ops.apply_op(images.cuda(), name, mags.cuda(), fill=9).cpu(), cpu), name


@pytest.mark.cuda
@pytest.mark.parametrize("policy,magnitude", [("torchvision", 9), ("mpl", 16), ("mpl-imagenet", 10)])
@pytest.mark.parametrize("size", [(32, 32), (37, 53), (224, 224)])
def test_cuda_rand_augment_same_images_as_cpu(policy, magnitude, size):
    images = photos(*size, False, 16)
    cpu = rand_augment(images, 3, magnitude, policy=policy, generator=torch.Generator().manual_seed(1), cutout=16)
    gpu = rand_augment(images.cuda(), 3, magnitude, policy=policy, generator=torch.Generator().manual_seed(1),
                           cutout=16)
    assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu)


@pytest.mark.cuda
def test_cuda_opcheck_and_cutout():
    images, codes, params, fill = _kernel_args()
    torch.library.opcheck(torch.ops.mpl_fast.augment_apply.default, (images.cuda(), codes.cuda(), params.cuda(), fill))
    cpu = cutout(images, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cutout(images.cuda(), 5, generator=torch.Generator().manual_seed(0)).cpu(), cpu)


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (37, 53), (224, 224)])
def test_translate_fast_path_equals_affine_grid(size):
    # The kernel shifts whole pixels for TranslateX/Y; the general affine path must agree.
    height, width = size
    shifts = [-2.0 * width, -width, -0.6 * width, -1.0, 0.0, 1.0, 0.3 * width, width + 1.0]
    images = photos(height, width, False, len(shifts))
    for name in ("TranslateX", "TranslateY"):
        mags = torch.tensor(shifts if name == "TranslateX" else [s * height / width for s in shifts],
                            dtype=torch.float64).view(-1, 1)
        op_ids = torch.full_like(mags, OP_INDEX[name], dtype=torch.int64)
        fast_codes, fast_params = plan_to_kernel_args(AugmentPlan(op_ids, mags, torch.zeros(len(shifts), 1, 4)),
                                                        height, width)
        assert (fast_codes == KernelCode.TRANSLATE).all()
        grid_params = ops.augment_args.affine_params(op_ids.view(-1), mags.view(-1), height, width).view(-1, 1, 6)
        grid_codes = torch.full_like(fast_codes, KernelCode.AFFINE)
        fast = torch.ops.mpl_fast.augment_apply.default(images, fast_codes, fast_params, [3])
        grid = torch.ops.mpl_fast.augment_apply.default(images, grid_codes, grid_params, [3])
        assert torch.equal(fast, grid), name


def test_rand_augment_under_compile_draws_eagerly():
    # The draws graph-break (torch.compiler.disable); results equal eager for the same seed.
    images = photos(16, 16, False, 4)
    fn = lambda x, g: rand_augment(x, 2, 12, policy="mpl", generator=g, cutout=6)  # noqa: E731
    compiled = torch.compile(fn, backend="eager")
    expected = fn(images, torch.Generator().manual_seed(3))
    assert torch.equal(compiled(images, torch.Generator().manual_seed(3)), expected)


def test_rand_augment_draws_match_torchvision_randaugment(monkeypatch):
    # Record what torchvision.transforms.RandAugment itself applies (op, signed magnitude) over
    # many calls, and compare with our draws: same support, and a chi-square two-sample test.
    from scipy.stats import chi2_contingency
    from torchvision.transforms import autoaugment

    seen = []
    monkeypatch.setattr(autoaugment, "_apply_op", lambda img, name, m, **kw: seen.append((name, m)) or img)
    torch.manual_seed(0)
    transform = autoaugment.RandAugment(num_ops=2, magnitude=13)
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    for _ in range(3000):
        transform(image)
    drawn = sample_plan((3000, 3, 20, 30), 2, 13, 31, "torchvision", torch.Generator().manual_seed(0))
    ours = [(OP_NAMES[int(i)], float(m)) for i, m in zip(drawn.plan.op_ids.flatten(), drawn.plan.magnitudes.flatten())]
    categories = sorted(set(seen) | set(ours))
    assert set(ours) == set(seen), set(ours) ^ set(seen)  # identical (op, magnitude) support
    table = [[seen.count(c) for c in categories], [ours.count(c) for c in categories]]
    assert chi2_contingency(table).pvalue > 1e-3


def test_raw_op_refuses_images_beyond_int32_indexing():
    huge = torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(1, 3, 2 ** 15, 2 ** 15)  # a view: no memory
    codes, params = torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, 1, 6)
    with pytest.raises(ValueError, match="fewer than 2\\^31 values per image"):
        torch.ops.mpl_fast.augment_apply.default(huge, codes, params, [0])
