"""Real photos (scikit-image's bundled images, nothing downloaded) and per-op magnitudes shared by
the CPU augment tests and the emulated CUDA augment tests."""

import functools

import torch
from torchvision.transforms import functional as F


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> torch.Tensor:
    from skimage import data

    array = getattr(data, name)()
    tensor = torch.from_numpy(array)
    return tensor.permute(2, 0, 1).contiguous() if tensor.dim() == 3 else tensor.unsqueeze(0)


@functools.lru_cache(maxsize=None)
def photos(height: int, width: int, gray: bool, n: int) -> torch.Tensor:
    """n different real images of (height, width): crops of photos at several scales, resized."""
    names = ["camera", "moon", "coins", "page"] if gray else ["astronaut", "coffee", "chelsea", "rocket"]
    out = []
    for i in range(n):
        img = _photo(names[i % len(names)])
        h, w = img.shape[-2:]
        scale = 1.0 / (1 + i // len(names))  # later images: tighter crops, more detail
        ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
        top, left = (h - ch) // 2, (w - cw) // 2
        out.append(F.resize(img[:, top:top + ch, left:left + cw], [height, width], antialias=True))
    return torch.stack(out)


def op_magnitudes(name: str, height: int, width: int) -> list[float]:
    """Magnitudes across torchvision's range for `name`, extremes and zero included."""
    signed = {"ShearX": 0.3, "ShearY": 0.3, "Rotate": 30.0, "TranslateX": 150 / 331 * width,
              "TranslateY": 150 / 331 * height, "Brightness": 0.9, "Color": 0.9, "Contrast": 0.9,
              "Sharpness": 0.9}
    if name in signed:
        top = signed[name]
        return [-top, -0.61 * top, -0.27 * top, 0.0, 0.13 * top, 0.5 * top, 0.77 * top, top]
    if name == "Posterize":
        return [0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    if name == "Solarize":
        return [0.0, 1.0, 64.5, 127.0, 128.0, 200.0, 254.0, 255.0]
    return [0.0] * 4
