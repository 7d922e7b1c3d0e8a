"""Image files <-> tensors in [-1, 1], and labelled sheets of images for people to look at."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from torch import Tensor

from sr3_lightning.data.degradations import to_rgb
from sr3_lightning.data.shards import pixels_to_tensor
from sr3_lightning.metrics import to_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
# What PIL raises for a file that is not a readable image (SyntaxError: some broken PNG / JPEG headers).
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
EXIF_ORIENTATION = 0x0112


def list_images(path: Path) -> list[Path]:
    """One image file, or the image files of a folder in name order; an error when there are none."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input {path} does not exist; pass an image file or a folder of images.")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"input folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).")
    return files


def check_out_folder(out: Path, holds: str = "the results") -> None:
    """An ``--out`` that names an existing file is refused before any work (mkdir would fail late)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; name a folder for {holds}")


def check_output_names(files: Sequence[Path], suffix: str) -> None:
    """Refuse inputs whose outputs ``<stem><suffix>`` would overwrite each other (a.png and a.jpg)."""
    seen: dict[str, Path] = {}
    for f in files:
        name = f"{f.stem}{suffix}"
        if name in seen:
            raise ValueError(
                f"inputs {seen[name]} and {f} would both be written as {name}, and one result would be "
                "lost; rename one of them (or move it to another folder and run it separately)."
            )
        seen[name] = f


def open_rgb(path: Path) -> Image.Image:
    """An input image as 8-bit RGB, turned upright as its EXIF orientation asks (as viewers show it), so
    a phone photo's result is not sideways. Training shards keep the stored pixels, as the reference does."""
    with Image.open(path) as img:
        return to_rgb(ImageOps.exif_transpose(img))


def shown_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as ``open_rgb`` returns the image, read from the header without decoding it."""
    width, height = img.size
    return (height, width) if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8) else (width, height)


def check_readable(files: Sequence[Path]) -> None:
    """Decode every input before any long work, so a corrupt file fails in seconds, not after hours."""
    bad = []
    for f in files:
        try:
            open_rgb(f)
        except IMAGE_ERRORS as err:
            bad.append(f"{f} ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else '-'})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ValueError(
            f"{len(bad)} input image(s) could not be read: {shown}. Each is corrupt, truncated, not an "
            "image despite its name, or in a pixel format named above; replace or remove it and run again."
        )


def to_tensor(img: Image.Image) -> Tensor:
    """RGB PIL image -> float ``[3, H, W]`` in [-1, 1], converted as the training data is."""
    return pixels_to_tensor(np.asarray(img.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))


def from_tensor(x: Tensor) -> Image.Image:
    """``[3, H, W]`` in [-1, 1] -> PIL image, quantised exactly as the reference saves results."""
    return Image.fromarray(to_uint8(x.detach().float().cpu()[None])[0].permute(1, 2, 0).numpy())


def save_sheet(
    rows: Sequence[Sequence[Image.Image]], titles: Sequence[str], path: Path, pad: int = 2
) -> Path:
    """Paste rows of equally sized images into one PNG with a title above each column."""
    w, h = rows[0][0].size
    header = 12
    sheet = Image.new("RGB", (len(titles) * (w + pad) + pad, header + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(titles):
        draw.text((pad + c * (w + pad), 0), title, fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            sheet.paste(
                img.resize((w, h), Image.NEAREST), (pad + c * (w + pad), header + pad + r * (h + pad))
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
