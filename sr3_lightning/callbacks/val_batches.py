"""The val images as `DomainEval` walks them: in batches of its own size, counted, and hashed."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def regroup(loader: Iterable[dict[str, Any]], size: int | None) -> Iterator[dict[str, Any]]:
    """The loader's images (``lr``, ``lr_up``, ``hr``, ``key``) in batches of ``size`` (None: one batch).
    Images without a key are named by their position."""
    held: dict[str, list] = {"lr": [], "lr_up": [], "hr": [], "key": []}
    count = seen = 0
    for batch in loader:
        n = len(batch["hr"])
        for k in ("lr", "lr_up", "hr"):
            held[k].append(batch[k])
        held["key"].extend(str(k) for k in batch.get("key", range(seen, seen + n)))
        count, seen = count + n, seen + n
        while size is not None and count >= size:
            tensors = {k: torch.cat(held[k]) for k in ("lr", "lr_up", "hr")}
            yield {**{k: v[:size] for k, v in tensors.items()}, "key": held["key"][:size]}
            held = {**{k: [v[size:]] for k, v in tensors.items()}, "key": held["key"][size:]}
            count -= size
    if count:
        yield {**{k: torch.cat(held[k]) for k in ("lr", "lr_up", "hr")}, "key": held["key"]}


def loader_size(loader: Any) -> int | None:
    """Number of val images for the progress bar, when the loader knows it."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def add_to_digest(digest: hashlib._Hash, batch: dict[str, Any]) -> None:
    """Hash a batch's keys and pixels, image by image (so the digest does not depend on how the images
    are batched): a baseline is compared only with the very images it measured, and shards rebuilt from
    other images may reuse the names."""
    images = [batch[k].detach().cpu().contiguous().numpy() for k in ("lr", "lr_up", "hr")]
    for i, key in enumerate(batch["key"]):
        digest.update(f"{key}\n".encode())
        for member in images:
            digest.update(member[i].tobytes())
