"""Readers for the inputs make_shards accepts: an image folder, a zip file, a reference-prepared folder
(``hr_{H}/ lr_{L}/ sr_{L}_{H}/``) and a reference LMDB.

Each source lists its items in a fixed (sorted) order and loads one item as an (lr, hr, lr_up) triplet;
``load`` runs in pool workers, so zip and LMDB handles are opened lazily, once per process.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from sr3_lightning.data.degradations import prepare_triplet, resize_and_crop, to_rgb
from sr3_lightning.images import EXIF_ORIENTATION

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
)


def make_key(stem: str) -> str:
    """A webdataset-safe key from a file stem: webdataset splits names at the first '.', so dots,
    spaces and other punctuation become '_'."""
    return re.sub(r"[^\w-]", "_", stem)


@dataclass(frozen=True)
class Item:
    key: str
    source: str  # path relative to --src (for an LMDB: the HR key)


@dataclass(frozen=True)
class Triplet:
    lr: Image.Image
    hr: Image.Image
    lr_up: Image.Image
    original_size: tuple[int, int] | None  # (width, height) of the source image; None if already prepared
    exif_rotated: bool = False  # the file asks to be shown rotated or mirrored (EXIF orientation 2..8)


class Source(Protocol):
    kind: str

    def items(self) -> list[Item]: ...

    def load(self, item: Item) -> Triplet: ...


def _decode(data: bytes | Path) -> Image.Image:
    """Open and fully decode an image, so that a broken file fails here and not later."""
    img = Image.open(data if isinstance(data, Path) else io.BytesIO(data))
    img.load()
    return img


def _prepare(img: Image.Image, lr_size: int, hr_size: int) -> Triplet:
    """The reference's preprocessing, which takes the stored pixels as they are: EXIF orientation is not
    applied (`Triplet.exif_rotated` says when that matters)."""
    lr, hr, lr_up = prepare_triplet(img, lr_size, hr_size)
    rotated = img.getexif().get(EXIF_ORIENTATION, 1) not in (0, 1)
    return Triplet(lr, hr, lr_up, img.size, rotated)


def _is_hidden(parts: tuple[str, ...]) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


class FolderSource:
    """Every image file under ``root`` (recursive, sorted by relative path; hidden files ignored)."""

    kind = "folder"

    def __init__(self, root: Path, lr_size: int, hr_size: int) -> None:
        self.root, self.lr_size, self.hr_size = root, lr_size, hr_size

    def items(self) -> list[Item]:
        files = [
            p.relative_to(self.root)
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and not _is_hidden(p.relative_to(self.root).parts)
        ]
        return [Item(make_key(p.stem), p.as_posix()) for p in sorted(files, key=lambda p: p.as_posix())]

    def load(self, item: Item) -> Triplet:
        return _prepare(_decode(self.root / item.source), self.lr_size, self.hr_size)


class _PerProcess:
    """Holds one handle per process: a handle inherited through fork must not be shared."""

    def __init__(self) -> None:
        self._pid, self._handle = -1, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pid": -1, "_handle": None}

    def handle(self) -> Any:
        if self._pid != os.getpid():
            self._handle, self._pid = self.open(), os.getpid()
        return self._handle

    def open(self) -> Any:
        raise NotImplementedError


class ZipSource(_PerProcess):
    """Every image member of a zip file (sorted by member name; ``__MACOSX/`` and hidden files ignored)."""

    kind = "zip"

    def __init__(self, path: Path, lr_size: int, hr_size: int) -> None:
        super().__init__()
        self.path, self.lr_size, self.hr_size = path, lr_size, hr_size

    def open(self) -> zipfile.ZipFile:
        return zipfile.ZipFile(self.path)

    def items(self) -> list[Item]:
        with zipfile.ZipFile(self.path) as archive:
            names = [
                n
                for n in archive.namelist()
                if not n.endswith("/")
                and Path(n).suffix.lower() in IMAGE_EXTENSIONS
                and not _is_hidden(Path(n).parts)
            ]
        return [Item(make_key(Path(n).stem), n) for n in sorted(names)]

    def load(self, item: Item) -> Triplet:
        return _prepare(_decode(self.handle().read(item.source)), self.lr_size, self.hr_size)


def _check_prepared(
    lr: Image.Image, hr: Image.Image, lr_up: Image.Image, lr_size: int, hr_size: int
) -> Triplet:
    for name, img, size in (("lr", lr, lr_size), ("hr", hr, hr_size), ("sr", lr_up, hr_size)):
        if img.size != (size, size):
            raise ValueError(f"{name} image is {img.size[0]}x{img.size[1]} px, expected {size}x{size}")
    return Triplet(to_rgb(lr), to_rgb(hr), to_rgb(lr_up), None)


class ReferenceFolderSource:
    """A folder written by the reference ``prepare_data.py``: ``hr_{H}/``, ``lr_{L}/``, ``sr_{L}_{H}/``.

    Images are taken as they are (sizes checked); a missing ``sr_{L}_{H}/`` is recomputed from LR, which
    is how the reference makes it.
    """

    kind = "reference-folder"

    def __init__(self, root: Path, lr_size: int, hr_size: int) -> None:
        self.root, self.lr_size, self.hr_size = root, lr_size, hr_size
        self.hr_dir, self.lr_dir = f"hr_{hr_size}", f"lr_{lr_size}"
        self.sr_dir = f"sr_{lr_size}_{hr_size}"

    def items(self) -> list[Item]:
        files = sorted(p.name for p in (self.root / self.hr_dir).iterdir() if p.suffix.lower() == ".png")
        return [Item(make_key(Path(name).stem), f"{self.hr_dir}/{name}") for name in files]

    def load(self, item: Item) -> Triplet:
        name = Path(item.source).name
        hr = _decode(self.root / self.hr_dir / name)
        lr = _decode(self.root / self.lr_dir / name)
        sr_path = self.root / self.sr_dir / name
        lr_up = _decode(sr_path) if sr_path.parent.is_dir() else resize_and_crop(to_rgb(lr), self.hr_size)
        return _check_prepared(lr, hr, lr_up, self.lr_size, self.hr_size)


class ReferenceLmdbSource(_PerProcess):
    """An LMDB written by the reference ``prepare_data.py --lmdb``: keys ``lr_{L}_{stem}``, ``hr_{H}_{stem}``,
    ``sr_{L}_{H}_{stem}`` (utf-8) -> PNG bytes, and ``length``."""

    kind = "reference-lmdb"

    def __init__(self, root: Path, lr_size: int, hr_size: int) -> None:
        super().__init__()
        self.root, self.lr_size, self.hr_size = root, lr_size, hr_size

    def open(self) -> Any:
        try:
            import lmdb
        except ImportError as err:
            raise ImportError(
                f"{self.root} is an LMDB; reading it needs the lmdb package: "
                "pip install 'sr3-lightning[lmdb]'"
            ) from err
        return lmdb.open(str(self.root), readonly=True, lock=False, readahead=False, meminit=False)

    def items(self) -> list[Item]:
        prefix = f"hr_{self.hr_size}_".encode()
        env = self.open()
        try:
            with env.begin() as txn:
                all_keys = list(txn.cursor().iternext(values=False))
            keys = [k.decode() for k in all_keys if k.startswith(prefix)]
            sizes = sorted({k.decode().split("_")[1] for k in all_keys if k.startswith(b"hr_")})
        finally:
            env.close()
        if not keys:
            raise ValueError(
                f"{self.root}: no '{prefix.decode()}*' keys in the LMDB (HR sizes: {sizes or 'none'}); "
                "pass the --hr (and --lr) the reference prepared it with"
            )
        return [Item(make_key(k[len(prefix) :]), k) for k in sorted(keys)]

    def load(self, item: Item) -> Triplet:
        stem = item.source[len(f"hr_{self.hr_size}_") :]
        names = (f"lr_{self.lr_size}_{stem}", item.source, f"sr_{self.lr_size}_{self.hr_size}_{stem}")
        with self.handle().begin() as txn:
            values = [txn.get(name.encode()) for name in names]
        missing = [n for n, v in zip(names, values) if v is None]
        if missing:
            raise KeyError(f"LMDB keys {missing} are missing")
        lr, hr, lr_up = (_decode(v) for v in values)
        return _check_prepared(lr, hr, lr_up, self.lr_size, self.hr_size)


def open_source(src: Path, lr_size: int, hr_size: int) -> Source:
    """Pick the reader for ``src``: a ``.zip`` file, an LMDB (``data.mdb``), a reference-prepared folder
    (``hr_{H}/`` and ``lr_{L}/``) or else a plain image folder."""
    if not src.exists():
        raise FileNotFoundError(f"--src {src} does not exist")
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise ValueError(f"--src {src} is a file but not a zip; pass a folder or a zip file of images")
        return ZipSource(src, lr_size, hr_size)
    if (src / "data.mdb").is_file():
        return ReferenceLmdbSource(src, lr_size, hr_size)
    if (src / f"hr_{hr_size}").is_dir() and (src / f"lr_{lr_size}").is_dir():
        return ReferenceFolderSource(src, lr_size, hr_size)
    prepared = sorted(
        p.name for p in src.glob("[hl]r_*") if p.is_dir() and re.fullmatch(r"[hl]r_\d+", p.name)
    )
    if prepared:
        raise ValueError(
            f"--src {src} looks reference-prepared ({', '.join(prepared)}) but has no hr_{hr_size}/ and "
            f"lr_{lr_size}/; pass the --lr/--hr it was prepared with"
        )
    return FolderSource(src, lr_size, hr_size)
