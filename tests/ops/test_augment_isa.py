"""The CPU augment kernel's instruction-set copies (baseline x86-64, AVX2, AVX-512, picked at run
time; MPL_FAST_AUGMENT_ISA caps the choice) give the same bits on every op."""

import pytest
import torch
from sample_images import op_magnitudes, photos

from mpl_fast import augment, ops
from mpl_fast.ops import extension

ISAS = ("scalar", "avx2", "avx512")  # a cap above what the CPU has falls back to the widest it has
SIZES = [(1, 1), (2, 3), (3, 3), (5, 70), (37, 53), (224, 224)]

pytestmark = pytest.mark.skipif(not extension.use_kernel(torch.device("cpu")), reason="needs the C++ extension")


def _under_each_isa(monkeypatch, fn):
    outs = []
    for isa in ISAS:
        monkeypatch.setenv("MPL_FAST_AUGMENT_ISA", isa)
        outs.append(fn())
    return outs


@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_every_op_same_bits_on_every_isa(monkeypatch, size, gray):
    height, width = size
    fill = 7 if gray else [10, 200, 30]
    for name in ops.OP_NAMES:
        mags = torch.tensor(op_magnitudes(name, height, width), dtype=torch.float64)
        images = photos(height, width, gray, len(mags))
        scalar, *wider = _under_each_isa(monkeypatch, lambda: ops.apply_op(images, name, mags, fill=fill))
        for isa, out in zip(ISAS[1:], wider):
            assert torch.equal(out, scalar), f"{name} {size} gray={gray}: {isa} differs from scalar"


def test_random_raw_params_same_bits_on_every_isa(monkeypatch):
    # Arbitrary affine matrices (huge shears included), odd sizes and chained ops.
    g = torch.Generator().manual_seed(0)
    for height, width, channels in [(4, 4, 3), (33, 47, 3), (29, 61, 1), (224, 224, 3)]:
        images = torch.randint(0, 256, (6, channels, height, width), generator=g, dtype=torch.uint8)
        codes = torch.randint(0, 13, (6, 4), generator=g, dtype=torch.int32)
        params = torch.randn(6, 4, 6, generator=g) * 2
        params[..., 0] = torch.where((codes >= 2) & (codes <= 5), torch.rand(6, 4, generator=g) * 3, params[..., 0])
        params[..., 1] = torch.where((codes >= 2) & (codes <= 5), 1 - params[..., 0], params[..., 1])
        fill = [5] if channels == 1 else [1, 2, 3]
        run = lambda: torch.ops.mpl_fast.augment_apply.default(images, codes, params, fill)  # noqa: E731
        scalar, *wider = _under_each_isa(monkeypatch, run)
        for isa, out in zip(ISAS[1:], wider):
            assert torch.equal(out, scalar), f"{height}x{width}x{channels}: {isa} differs from scalar"


@pytest.mark.parametrize("policy", ["torchvision", "mpl"])
def test_rand_augment_same_bits_on_every_isa(monkeypatch, policy):
    images = photos(224, 224, False, 8)
    run = lambda: augment.rand_augment(images, 2, 9, policy=policy, generator=torch.Generator().manual_seed(1), cutout=16)  # noqa: E731
    scalar, *wider = _under_each_isa(monkeypatch, run)
    for isa, out in zip(ISAS[1:], wider):
        assert torch.equal(out, scalar), f"{policy}: {isa} differs from scalar"
