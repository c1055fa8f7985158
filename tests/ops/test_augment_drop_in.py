"""The augment modules as a drop-in for torchvision v2's RandAugment: torch.compile,
DataLoader workers, the input contract, bad magnitudes."""

import pytest
import torch

from mpl_fast import ops
from mpl_fast.augment import Cutout, RandAugment


def _images(n=4, h=16, w=16, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ torch.compile(fullgraph=True)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("make", [lambda: RandAugment(2, 12, policy="mpl", cutout=6), lambda: RandAugment(),
                                  lambda: Cutout(5)], ids=["mpl", "torchvision", "cutout"])
def test_modules_compile_with_fullgraph_from_the_global_generator(make, backend):
    torch._dynamo.reset()
    module, images = make(), _images()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    torch.manual_seed(3)
    out = compiled(images)
    torch.manual_seed(3)
    assert torch.equal(out, module(images))  # the same draws from the same global stream
    assert not torch.equal(out, images)


def test_a_generator_draws_eagerly_under_compile():
    # torch.compile cannot trace a torch.Generator: one graph break, the same images as eager.
    torch._dynamo.reset()
    images = _images()
    compiled = torch.compile(RandAugment(2, 12, policy="mpl", generator=torch.Generator().manual_seed(1)),
                             backend="eager")
    eager = RandAugment(2, 12, policy="mpl", generator=torch.Generator().manual_seed(1))
    assert torch.equal(compiled(images), eager(images))


def test_apply_op_on_the_reference_fallback_compiles_with_fullgraph(python_without_extension):
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "import torch, mpl_fast\n"
            "x = (torch.arange(2 * 3 * 9 * 7) * 37 % 256).to(torch.uint8).view(2, 3, 9, 7)\n"
            "m = torch.tensor([10.0, -25.0], dtype=torch.float64)\n"
            "op = lambda x, m: mpl_fast.ops.apply_op(x, 'Rotate', m, fill=3)\n"
            "f = torch.compile(op, fullgraph=True, backend='eager')\n"
            "print(mpl_fast.ops.backend(), torch.equal(f(x, m), op(x, m)))\n")
    assert python_without_extension(code).split() == ["reference", "True"]


# ------------------------------------------------------------------ DataLoader workers


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform, self.image = transform, _images(1, 12, 12)[0]

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.image)


def _worker_batches(seed):
    torch.manual_seed(seed)  # the DataLoader's base seed comes from here
    dataset = _SameImage(RandAugment(3, 15, policy="mpl", generator=torch.Generator().manual_seed(7)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context="fork")
    return [batch for batch in loader]  # batch 0 from worker 0, batch 1 from worker 1


def test_workers_draw_different_streams_reproducibly():
    first, second = _worker_batches(0)
    assert not torch.equal(first, second)  # each worker its own augmentations
    again = _worker_batches(0)
    assert torch.equal(first, again[0]) and torch.equal(second, again[1])  # same seeds, same images


# ------------------------------------------------------------------ input contract (torchvision v2)


def test_single_image_and_leading_dims():
    images = _images(6)
    batch = RandAugment(2, 9, generator=torch.Generator().manual_seed(2))(images)
    single = RandAugment(2, 9, generator=torch.Generator().manual_seed(2))(images[0])
    assert single.shape == images[0].shape
    nested = RandAugment(2, 9, generator=torch.Generator().manual_seed(2))(images.view(2, 3, 3, 16, 16))
    assert nested.shape == (2, 3, 3, 16, 16) and torch.equal(nested.reshape(6, 3, 16, 16), batch)
    assert torch.equal(Cutout(4, generator=torch.Generator().manual_seed(0))(images[0]),
                       Cutout(4, generator=torch.Generator().manual_seed(0))(images[:1])[0])


def test_tv_tensors_image_keeps_its_type_in_a_v2_compose():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    pipeline = v2.Compose([v2.ToImage(), RandAugment(2, 9, generator=torch.Generator().manual_seed(0)), Cutout(4),
                           v2.ToDtype(torch.float32, scale=True)])
    out = pipeline(_images(1)[0].permute(1, 2, 0).numpy())  # an HWC uint8 array, as from a decoder
    assert isinstance(out, tv_tensors.Image) and out.dtype == torch.float32 and out.shape == (3, 16, 16)
    image = tv_tensors.Image(_images(2))
    assert isinstance(RandAugment()(image), tv_tensors.Image)


def test_float_images_are_refused_with_the_conversion_to_use():
    with pytest.raises(ValueError, match=r"uint8 .*ToDtype\(torch.uint8, scale=True\)"):
        RandAugment()(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match=r"ToDtype\(torch.uint8, scale=True\)"):
        Cutout(3)(torch.rand(2, 3, 8, 8))


# ------------------------------------------------------------------ magnitudes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["Rotate", "ShearX", "Brightness", "Solarize", "TranslateY"])
def test_non_finite_magnitudes_raise(name, bad):
    with pytest.raises(ValueError, match=f"`magnitudes` of {name} must be finite"):
        ops.apply_op(_images(2), name, torch.tensor([1.0, bad]))
    with pytest.raises(ValueError, match="`magnitude` must be a finite"):
        RandAugment(magnitude=bad, policy="mpl")(_images(2))
