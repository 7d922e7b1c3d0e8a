"""Reference preprocessing: pixel equality with the reference SR3 prepare_data.py fixtures."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sr3_lightning.data.degradations import prepare_triplet, resize_and_crop, to_rgb
from sr3_lightning.data.shards import decode_png, pixels_to_tensor

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


def _pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.mark.parametrize("lr_size", [16, 32])
def test_prepare_triplet_is_pixel_equal_to_reference(lr_size: int) -> None:
    lr, hr, lr_up = prepare_triplet(Image.open(REFERENCE / "prep_input.png"), lr_size, 128)
    expected = {
        "lr": Image.open(REFERENCE / f"prep_lr_{lr_size}.png"),
        "hr": Image.open(REFERENCE / "prep_hr_128.png"),
        "lr_up": Image.open(REFERENCE / f"prep_sr_{lr_size}_128.png"),
    }
    for name, ours in (("lr", lr), ("hr", hr), ("lr_up", lr_up)):
        assert ours.mode == "RGB" and ours.size == expected[name].size
        assert np.abs(_pixels(ours) - _pixels(expected[name].convert("RGB"))).max() == 0, name


def test_tensors_equal_reference_transform_augment() -> None:
    """PNG -> tensor is the reference's ToTensor then x * 2 - 1, bit for bit (all 256 levels too)."""
    expected = torch.load(REFERENCE / "prep_tensors.pt", weights_only=True)
    lr, hr, lr_up = prepare_triplet(Image.open(REFERENCE / "prep_input.png"), 16, 128)
    for ours, name in ((hr, "val_hr"), (lr_up, "val_sr")):
        buffer = io.BytesIO()
        ours.save(buffer, format="PNG")
        assert torch.equal(pixels_to_tensor(decode_png(buffer.getvalue(), 128)), expected[name]), name
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(3, axis=0)
    assert torch.equal(pixels_to_tensor(levels), torch.from_numpy(levels).float().div(255) * 2 - 1)


@pytest.mark.parametrize(("width", "offset"), [(41, 12), (19, 2), (22, 3)])
def test_centre_crop_rounds_half_to_even(width: int, offset: int) -> None:
    """Height already equals size, so only the crop acts: offset round((W - size) / 2), 12.5 -> 12."""
    columns = np.tile(np.arange(width, dtype=np.uint8)[None, :, None], (16, 1, 3))
    out = resize_and_crop(Image.fromarray(columns), 16)
    assert out.size == (16, 16)
    assert _pixels(out)[0, 0, 0] == offset


@pytest.mark.parametrize("size", [(300, 250), (250, 300), (64, 64), (16, 40), (40, 16)])
def test_resize_and_crop_is_square(size: tuple[int, int]) -> None:
    img = Image.new("RGB", size, (10, 20, 30))
    assert resize_and_crop(img, 16).size == (16, 16)


def test_image_already_at_size_is_unchanged() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert np.array_equal(_pixels(resize_and_crop(img, 32)), _pixels(img))


def test_to_rgb_converts_every_mode() -> None:
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    images = {
        "L": Image.fromarray(gray),
        "P": Image.fromarray(gray).convert("P"),
        "RGBA": Image.fromarray(np.dstack([gray] * 4)),
        "LA": Image.fromarray(np.dstack([gray] * 2)),
        "1": Image.fromarray(gray > 100),
        "CMYK": Image.fromarray(np.dstack([gray] * 3)).convert("CMYK"),
        "I;16": Image.fromarray(gray.astype(np.uint16) * 257),
    }
    for mode, img in images.items():
        assert img.mode == mode
        rgb = to_rgb(img)
        assert rgb.mode == "RGB" and rgb.size == (8, 8), mode
    # 16-bit values are scaled to 8 bits instead of being clipped to white
    assert np.array_equal(_pixels(to_rgb(images["I;16"]))[..., 0], gray)
    # alpha is dropped, as the reference's convert('RGB') does
    assert np.array_equal(_pixels(to_rgb(images["RGBA"]))[..., 0], gray)


def test_to_rgb_maps_32_bit_images_by_the_range_their_values_use() -> None:
    """TIFFs in mode I / F carry no nominal range: 0..1 floats, 8-bit and 16-bit levels all keep their
    picture (not a black one); values that fit none are refused."""
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    for values in (gray / 255, gray.astype(np.float64)):
        assert np.array_equal(_pixels(to_rgb(Image.fromarray(values.astype(np.float32))))[..., 0], gray)
    for values in (gray.astype(np.int32), gray.astype(np.int32) * 256 + 255):
        img = Image.fromarray(values)
        assert img.mode == "I" and np.array_equal(_pixels(to_rgb(img))[..., 0], gray)
    for bad in (np.full((8, 8), -1.0), np.full((8, 8), 7e4), np.full((8, 8), np.nan)):
        with pytest.raises(ValueError, match="32-bit float image with values .* save it as an 8- or 16-bit"):
            to_rgb(Image.fromarray(bad.astype(np.float32)))


def test_prepare_triplet_rejects_lr_not_smaller_than_hr() -> None:
    with pytest.raises(ValueError, match="lr_size 32 >= hr_size 32"):
        prepare_triplet(Image.new("RGB", (40, 40)), 32, 32)
