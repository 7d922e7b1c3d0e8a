"""Shared fixtures: tiny real images written into real shards by the real make_shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_tools.make_shards import make_shards


def write_images(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    """Write ``n`` small RGB PNGs ``{prefix}{i:03d}.png``: gradient + noise, varied sizes and shapes."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = 36 + (i % 3) * 4, 40 + (i % 4) * 6
        ramp = np.linspace(0, 255, w)[None, :, None] * np.array([1.0, 0.5, 0.2]) + 10 * i
        pixels = np.clip(ramp + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        paths.append(folder / f"{prefix}{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.fixture
def make_domain_shards(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_domain_shards(domain, n, lr=8, hr=32, shard_size=1000)`` -> ``tmp_path/shards/DOMAIN``.

    Each domain gets its own images (seeded by the domain name) and its own directory, so ``tmp_path/shards``
    can also be passed as a parent ``shards`` directory holding several domains.
    """

    def make(domain: str, n: int, lr: int = 8, hr: int = 32, shard_size: int = 1000) -> Path:
        src = tmp_path / "src" / domain
        write_images(src, n, seed=sum(map(ord, domain)), prefix=f"{domain}_")
        out = tmp_path / "shards" / domain
        make_shards(src, out, domain, lr, hr, shard_size=shard_size, workers=1, progress=False)
        return out

    return make


@pytest.fixture
def tiny_shards(make_domain_shards: Callable[..., Path]) -> Path:
    """A ``shards`` directory with domains anime (24 images), ffhq (8) and celebahq (8) at 8 -> 32 px.

    Use it as ``shards:`` for any of the three domains (sub-directory per domain).
    """
    for domain, n in (("anime", 24), ("ffhq", 8), ("celebahq", 8)):
        out = make_domain_shards(domain, n, shard_size=10)
    return out.parent
