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

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, as the reference's ``.convert('RGB')`` does.

    Grayscale, palette, CMYK and RGBA go through ``convert('RGB')`` unchanged from the reference (alpha is
    dropped, not composited). 16-bit images are first scaled to 8 bits (``v >> 8``): a plain ``convert``
    would clip every value above 255 to white. 32-bit integer and float images (``I``, ``F``: TIFFs) carry
    no nominal range, so their values choose it: floats in [0, 1] are scaled by 255, values in 0..255
    are taken as 8-bit levels and values in 0..65535 as 16-bit ones; anything else is refused, since any
    mapping would be a guess.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img).astype(np.int64)
        img = Image.fromarray(np.clip(values >> 8, 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        img = Image.fromarray(_wide_to_8bit(np.asarray(img, dtype=np.float64), img.mode), mode="L")
    return img.convert("RGB")


def _wide_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 65535:
        raise ValueError(
            f"a 32-bit {'float' if mode == 'F' else 'integer'} image with values {lo:g}..{hi:g}, which map "
            "to no 8-bit range; save it as an 8- or 16-bit image (0..255 or 0..65535) or as floats in 0..1"
        )
    if mode == "F" and hi <= 1:
        values = values * 255
    elif hi > 255:
        values = np.floor(values / 256)
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


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
