"""Shard format, verification and sample decoding: tar shards -> checked sample table -> batch tensors.

A domain directory holds ``{domain}-{index:06d}.tar`` shards and ``index.json`` (written by
``dataset_tools.make_shards``). Each sample is ``{key}.hr.png``, ``{key}.lr.png``, ``{key}.lr_up.png`` and
``{key}.json``, so the shards also stream as plain webdataset tars. Training reads samples by offset
(found by scanning the tar headers once), which is what lets the train stream pick any subset, split it
exactly across ranks and workers, and resume mid-pass without decoding what it skips.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT = "sr3-lightning-shards"
IMAGE_MEMBERS = ("hr", "lr", "lr_up")  # stored as f"{key}.{member}.png"
OnCorrupt = Literal["raise", "skip"]
# Decoded pixels of a table this small stay in memory, per process: the study's 8..128 training images
# (about 100 KB each at 16->128) are then decoded once instead of at every pass. Larger data streams.
CACHE_BYTES = 256 * 2**20
SHOWN_PROBLEMS = 10  # problems of an on_corrupt=skip run listed by name; the rest are counted

_MAKE_SHARDS = "python -m dataset_tools.make_shards --src IMAGES --out {out} --domain {domain}"


class ShardError(ValueError):
    """A shard or index.json is corrupt or does not match; the message names the file, the key and the fix."""


def shard_name(domain: str, index: int) -> str:
    return f"{domain}-{index:06d}.tar"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardInfo:
    name: str
    num_samples: int
    sha256: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ShardIndex:
    """The parsed ``index.json`` of one domain directory."""

    path: Path
    domain: str
    lr_size: int
    hr_size: int
    shards: tuple[ShardInfo, ...]

    @property
    def directory(self) -> Path:
        return self.path.parent

    @property
    def keys(self) -> list[str]:
        """All sample keys in index order (shard by shard, in the order make_shards wrote them)."""
        return [key for shard in self.shards for key in shard.keys]

    @classmethod
    def read(cls, path: Path) -> ShardIndex:
        try:
            raw = json.loads(path.read_text())
            shards = tuple(
                ShardInfo(s["name"], int(s["num_samples"]), s["sha256"], tuple(s["keys"]))
                for s in raw["shards"]
            )
            index = cls(path, raw["domain"], int(raw["lr_size"]), int(raw["hr_size"]), shards)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ShardError(
                f"{path}: not a valid {FORMAT} index ({type(err).__name__}: {err}); re-create it with "
                + _MAKE_SHARDS.format(out=path.parent, domain="NAME")
            ) from err
        for shard in shards:
            if len(shard.keys) != shard.num_samples:
                raise ShardError(
                    f"{path}: shard {shard.name} lists {len(shard.keys)} keys but num_samples "
                    f"{shard.num_samples}; the index was edited: re-run make_shards"
                )
        repeated = [key for key, n in Counter(index.keys).items() if n > 1]
        if repeated:
            raise ShardError(
                f"{path}: {len(repeated)} key(s) are listed more than once, e.g. '{repeated[0]}'; the index "
                "was edited or merged by hand: re-run make_shards"
            )
        return index


def find_index(shards: str | Path, domain: str) -> Path:
    """Return ``shards/index.json`` or ``shards/{domain}/index.json``, or explain what is missing."""
    root = Path(shards).expanduser()
    make = _MAKE_SHARDS.format(out=root, domain=domain)
    if not root.is_dir():
        raise FileNotFoundError(
            f"shard directory {root} (domain '{domain}') does not exist; create it with {make}"
        )
    for candidate in (root / INDEX_NAME, root / domain / INDEX_NAME):
        if candidate.is_file():
            return candidate
    present = sorted(p.parent.name for p in root.glob(f"*/{INDEX_NAME}"))
    hint = f" (it has sub-directories for domains {present})" if present else ""
    raise FileNotFoundError(
        f"shard directory {root} has no {INDEX_NAME} for domain '{domain}' (looked in {root / INDEX_NAME}, "
        f"{root / domain / INDEX_NAME}){hint}; create the shards with {make}"
    )


def load_index(shards: str | Path, domain: str, lr_size: int, hr_size: int) -> ShardIndex:
    """Load a domain's index and check it is that domain at the model's LR/HR sizes."""
    index = ShardIndex.read(find_index(shards, domain))
    if index.domain != domain:
        raise ValueError(
            f"domain '{domain}' asked for, but {index.path} holds domain '{index.domain}'; "
            f"fix `domain` or point `shards` at the '{domain}' shards"
        )
    if (index.lr_size, index.hr_size) != (lr_size, hr_size):
        raise ValueError(
            f"{index.path}: shards are {index.lr_size}->{index.hr_size} px but the model is configured for "
            f"{lr_size}->{hr_size} px; re-run make_shards with --lr {lr_size} --hr {hr_size}, or use a model "
            f"configured for {index.lr_size}->{index.hr_size}"
        )
    if not index.keys:
        raise ShardError(
            f"{index.path}: the index lists no samples; re-run make_shards on a folder with images"
        )
    return index


@dataclass
class SampleTable:
    """Where each selected sample's images are: shard file, byte offset and size of hr / lr / lr_up.

    Arrays instead of per-sample objects keep it small when it is copied to every loader worker.
    """

    keys: list[str]
    shard_paths: list[str]
    shard_of: np.ndarray  # [N] index into shard_paths
    offsets: np.ndarray  # [N, 3] byte offsets of hr, lr, lr_up
    sizes: np.ndarray  # [N, 3] byte sizes
    lr_size: int
    hr_size: int

    def __len__(self) -> int:
        return len(self.keys)


def _scan_tar(path: Path) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """Map key -> {member: (offset, size)} from the tar headers; also return a read error, if any."""
    members: dict[str, dict[str, tuple[int, int]]] = {}
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.rpartition("/")[2].partition(".")
                if info.offset_data + info.size > file_size:
                    return members, f"is truncated (member {info.name} is cut off at byte {file_size})"
                members.setdefault(key, {})[ext.removesuffix(".png")] = (info.offset_data, info.size)
            if tar.offset + 2 * tarfile.BLOCKSIZE > file_size:  # tarfile stops quietly at a cut header
                return members, f"is truncated (ends at byte {file_size} without the end-of-archive marker)"
    except (tarfile.TarError, OSError, EOFError) as err:
        return members, f"not a readable tar ({err})"
    return members, None


def decode_png(data: bytes, size: int) -> np.ndarray:
    """PNG bytes -> uint8 [3, size, size] RGB pixels; a ValueError if the image is not size x size."""
    with Image.open(io.BytesIO(data)) as img:
        if img.size != (size, size):
            raise ValueError(f"is {img.size[0]}x{img.size[1]} px, expected {size}x{size}")
        pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def scale_to_unit_range_(values: np.ndarray) -> np.ndarray:
    """In place, float32 levels 0..255 -> [-1, 1]: the reference's ToTensor (x / 255), then x * 2 - 1.

    Bit-identical to torch's ``x.float().div(255).mul(2).sub(1)``; numpy because small torch ops in a
    loader cost more (intra-op threads) than the whole conversion here.
    """
    values /= 255
    values *= 2
    values -= 1
    return values


def pixels_to_tensor(pixels: np.ndarray) -> Tensor:
    """uint8 [..., 3, H, W] -> float32 tensor in [-1, 1] (see ``scale_to_unit_range_``)."""
    return torch.from_numpy(scale_to_unit_range_(pixels.astype(np.float32)))


def _check_decodes(
    path: Path, key: str, where: dict[str, tuple[int, int]], lr_size: int, hr_size: int
) -> str | None:
    """Why this sample cannot be used (missing or undecodable member), or None."""
    with open(path, "rb") as f:
        if not where:
            return f"sample '{key}' is missing from the tar"
        for member in IMAGE_MEMBERS:
            if member not in where:
                return f"sample '{key}' has no {member}.png"
            f.seek(where[member][0])
            try:
                decode_png(f.read(where[member][1]), lr_size if member == "lr" else hr_size)
            except Exception as err:  # noqa: BLE001 - any decoder failure means this sample is unusable
                return f"sample '{key}' {member}.png cannot be decoded ({err})"
    return None


def _shard_problems(
    index: ShardIndex, shard: ShardInfo, path: Path, members: dict, error: str | None
) -> list[str]:
    """What is wrong with one shard file against its index entry (empty: it is what make_shards wrote)."""
    problems = [f"{path}: {error}"] if error else []
    digest = file_sha256(path)
    if digest != shard.sha256:
        problems.append(
            f"{path}: sha256 {digest[:12]}... does not match {index.path} ({shard.sha256[:12]}...), "
            "the shard changed after make_shards"
        )
    held = list(members)
    if held != list(shard.keys):
        end = "(no more samples)"
        differ = next((h, k) for h, k in zip([*held, end], [*shard.keys, end]) if h != k)
        problems.append(
            f"{path}: holds {len(held)} samples, {index.path} lists {shard.num_samples}; the first that "
            f"differs is '{differ[0]}' in the file, '{differ[1]}' in the index"
        )
    elif not problems and held:
        problems += _size_problem(index, path, held[0], members[held[0]])
    return problems


def _size_problem(index: ShardIndex, path: Path, key: str, where: dict[str, tuple[int, int]]) -> list[str]:
    """A shard that is what make_shards wrote, under an index whose sizes were edited: one sample's PNG
    headers (no decoding) tell, instead of the first training batch."""
    with open(path, "rb") as f:
        for member in IMAGE_MEMBERS:
            if member not in where:
                return [f"{path}: sample '{key}' has no {member}.png"]
            f.seek(where[member][0])
            try:
                with Image.open(io.BytesIO(f.read(where[member][1]))) as img:
                    size = img.size
            except Exception as err:  # noqa: BLE001 - any decoder failure means this shard is unusable
                return [f"{path}: sample '{key}' {member}.png cannot be read ({err})"]
            expected = index.lr_size if member == "lr" else index.hr_size
            if size != (expected, expected):
                return [
                    f"{path}: sample '{key}' {member}.png is {size[0]}x{size[1]} px but {index.path} says "
                    f"{expected}x{expected}; the index was edited"
                ]
    return []


def _undecodable(
    index: ShardIndex, path: Path, members: dict, keys: Sequence[str], first_only: bool
) -> dict[str, str]:
    """Key -> reason for the samples of a changed shard that no longer decode at the index's sizes."""
    bad: dict[str, str] = {}
    for key in keys:
        reason = _check_decodes(path, key, members.get(key, {}), index.lr_size, index.hr_size)
        if reason:
            bad[key] = f"{path}: {reason}"
            if first_only:
                break
    return bad


def locate_samples(
    index: ShardIndex,
    keys: Sequence[str],
    on_corrupt: OnCorrupt = "raise",
    skip_hint: str = "set on_corrupt: skip to go on without the bad samples",
) -> SampleTable:
    """Verify the shards holding ``keys`` against the index (sha256, count, keys) and locate each sample.

    Shards whose sha256 matches are exactly what make_shards wrote, so only a mismatching shard is decoded
    sample by sample: with ``on_corrupt='raise'`` the first problem raises a ShardError naming the shard,
    the key and the fix; with ``'skip'`` unusable samples are dropped, counted and logged.
    """
    wanted = set(keys)
    found: dict[str, tuple[int, dict[str, tuple[int, int]]]] = {}
    shard_paths: list[str] = []
    problems: list[str] = []
    fix = f"re-run make_shards for domain '{index.domain}' (or restore the file), or {skip_hint}"
    for shard in index.shards:
        if wanted.isdisjoint(shard.keys):
            continue
        path = index.directory / shard.name
        if not path.is_file():
            if on_corrupt == "raise":
                raise FileNotFoundError(f"{path} (listed in {index.path}) is missing; {fix}")
            problems.append(f"{path} is missing")
            continue
        members, error = _scan_tar(path)
        shard_problems = _shard_problems(index, shard, path, members, error)
        usable = [k for k in shard.keys if k in wanted]
        bad: dict[str, str] = {}
        if shard_problems:
            bad = _undecodable(index, path, members, usable, first_only=on_corrupt == "raise")
            if on_corrupt == "raise":
                raise ShardError("; ".join([shard_problems[0], *bad.values()]) + f"; {fix}")
            problems.extend([*shard_problems, *bad.values()])
        shard_paths.append(str(path))
        for key in usable:
            if key not in bad:
                found[key] = (len(shard_paths) - 1, members[key])
    kept = [k for k in keys if k in found]
    if problems:
        shown = problems[:SHOWN_PROBLEMS] + [f"... and {len(problems) - SHOWN_PROBLEMS} more"] * (
            len(problems) > SHOWN_PROBLEMS
        )
        log.warning(
            "on_corrupt=skip: %d of %d samples of domain '%s' skipped:\n  %s",
            len(keys) - len(kept),
            len(keys),
            index.domain,
            "\n  ".join(shown),
        )
    if not kept:
        raise ShardError(f"{index.directory}: none of the {len(keys)} requested samples is usable; {fix}")
    return SampleTable(
        keys=kept,
        shard_paths=shard_paths,
        shard_of=np.array([found[k][0] for k in kept], dtype=np.int32),
        offsets=np.array([[found[k][1][m][0] for m in IMAGE_MEMBERS] for k in kept], dtype=np.int64),
        sizes=np.array([[found[k][1][m][1] for m in IMAGE_MEMBERS] for k in kept], dtype=np.int64),
        lr_size=index.lr_size,
        hr_size=index.hr_size,
    )


class SampleReader:
    """Reads and decodes samples of a SampleTable; opens shard files lazily, once per process, and keeps
    the decoded pixels when the whole table fits in ``CACHE_BYTES``."""

    def __init__(self, table: SampleTable) -> None:
        self.table = table
        self._files: dict[int, Any] = {}
        sample_bytes = 3 * (2 * table.hr_size**2 + table.lr_size**2)  # uint8 hr + lr_up + lr
        self._cache: dict[int, dict[str, np.ndarray]] | None = (
            {} if len(table) * sample_bytes <= CACHE_BYTES else None
        )

    def __getstate__(self) -> dict:
        # open files and decoded pixels stay in the process that made them
        return {**self.__dict__, "_files": {}, "_cache": None if self._cache is None else {}}

    def read(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i`` as {'hr', 'lr', 'lr_up'}: uint8 [3, S, S] pixels (see ``pixels_to_tensor``)."""
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        t = self.table
        shard = int(t.shard_of[i])
        if shard not in self._files:
            self._files[shard] = open(t.shard_paths[shard], "rb")  # noqa: SIM115 - kept open for later reads
        fd = self._files[shard].fileno()
        out = {}
        for j, member in enumerate(IMAGE_MEMBERS):
            data = os.pread(fd, int(t.sizes[i, j]), int(t.offsets[i, j]))
            try:
                out[member] = decode_png(data, t.lr_size if member == "lr" else t.hr_size)
            except Exception as err:
                raise ShardError(
                    f"{t.shard_paths[shard]}: sample '{t.keys[i]}' {member}.png cannot be decoded ({err}); "
                    "the file changed after the data module checked it: re-run make_shards and restart"
                ) from err
        if self._cache is not None:
            self._cache[i] = out
        return out
