"""HR -> LR -> bicubic LR_up, pixel-identical to the reference SR3 ``data/prepare_data.py``.

The reference opens an image, ``.convert('RGB')``, then for each size resizes the shorter side with PIL
bicubic (the longer side becomes ``int(size * long / short)``) and centre-crops with the offset
``int(round((W - size) / 2))`` (Python rounds half to even). LR and HR are both made from the original
image; "SR" (our ``lr_up``) is the LR image resized to the HR size by the same function, not a downscale
of HR. Pure functions of PIL images: the dataset tool, Diff-SR and the ``sample`` command share them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, as the reference's ``.convert('RGB')`` does.

    Grayscale, palette, CMYK and RGBA go through ``convert('RGB')`` unchanged from the reference (alpha is
    dropped, not composited). 16-bit and 32-bit integer images are first scaled to 8 bits (``v >> 8``):
    a plain ``convert`` would clip every value above 255 to white.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        img = Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (PIL bicubic) and centre-crop to ``size`` x ``size``.

    Equals torchvision ``resize(img, size)`` + ``center_crop(img, size)`` on PIL images, which is what the
    reference's ``resize_and_convert`` calls. One deliberate difference: the reference skips both steps
    whenever the *width* already equals ``size``, which leaves a non-square image when only the width
    matches; here such an image is still cropped/resized to a square (square inputs are unaffected).
    """
    if size <= 0:
        raise ValueError(f"size {size}: must be a positive number of pixels")
    width, height = img.size
    short, long = sorted(img.size)
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    width, height = img.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    if (left, top, width, height) == (0, 0, size, size):
        return img
    return img.crop((left, top, left + size, top + size))


def prepare_triplet(
    img: Image.Image, lr_size: int, hr_size: int
) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Make ``(lr, hr, lr_up)`` from one source image exactly as the reference's ``resize_multiple``.

    lr: lr_size x lr_size, hr: hr_size x hr_size, lr_up: the LR image resized to hr_size (bicubic), which
    the reference calls "SR" and SR3 receives as its condition. All three are 8-bit RGB.
    """
    if lr_size >= hr_size:
        raise ValueError(
            f"lr_size {lr_size} >= hr_size {hr_size}: LR must be smaller than HR (e.g. 16 and 128)"
        )
    img = to_rgb(img)
    lr = resize_and_crop(img, lr_size)
    hr = resize_and_crop(img, hr_size)
    lr_up = resize_and_crop(lr, hr_size)
    return lr, hr, lr_up
