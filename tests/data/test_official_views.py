"""The official CIFAR views: pad-and-crop padded with gray 128 (or reflect), and the strong
view's second flip + pad-and-crop after Cutout."""

import torch

from mpl_fast.data.views import pad_crop_flip, strong_view


def _images(b=64, size=8):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (b, 3, size, size), dtype=torch.uint8, generator=g)  # no pixel is 128


def test_constant_fill_pads_with_128_and_keeps_the_crop_of_the_image():
    images = _images()
    out = pad_crop_flip(images, pad=3, flip=False, generator=torch.Generator().manual_seed(1), fill=128)
    reflect = pad_crop_flip(images, pad=3, flip=False, generator=torch.Generator().manual_seed(1))
    assert (out == 128).any() and not (reflect == 128).any()
    same = out != 128
    assert torch.equal(out[same], reflect[same])  # same offsets; where the image shows, the same pixels
    zero_pad = pad_crop_flip(images, pad=0, flip=False, generator=torch.Generator().manual_seed(1), fill=128)
    assert torch.equal(zero_pad, images)


def test_strong_view_recrops_after_cutout():
    images = _images()
    kw = dict(num_ops=0, magnitude=0, policy="mpl", cutout=0, fill=128)
    plain = strong_view(images, generator=torch.Generator().manual_seed(2), **kw)
    recropped = strong_view(images, generator=torch.Generator().manual_seed(2), recrop_pad=2, **kw)
    assert torch.equal(plain, images)
    assert not torch.equal(recropped, images) and (recropped == 128).any()


def test_the_cifar_preset_uses_the_official_views_and_imagenet_does_not_recrop():
    from mpl_fast.train.config import preset

    assert preset("cifar10-4k").data.crop_fill == "gray" and preset("cifar10-4k").data.strong_recrop
    assert not preset("imagenet-10pct").data.strong_recrop
