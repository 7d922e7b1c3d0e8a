"""The train stream: an infinite, resumable sequence of batches that does not depend on the worker count.

The train stream is a function of (selected keys, seed, samples already consumed) only. Pass ``p`` is a
seeded order of the selected images; the passes are concatenated into one global sequence ``G``. Rank ``r``
of ``W`` takes ``G[start + r + i*W]``, cut into batches of ``batch_size``; loader worker ``w`` of ``K`` makes
batches ``w, w+K, ...`` and the DataLoader returns them in that order. So every image of a pass is used
exactly once across ranks and workers, the stream a rank sees does not depend on the worker count, and a
checkpoint needs a single number (samples consumed) to resume mid-pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from sr3_lightning.data.shards import IMAGE_MEMBERS, SampleReader, SampleTable, scale_to_unit_range_


def pass_order(
    groups: np.ndarray, seed: int, pass_index: int, shuffle_buffer: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The order of pass ``pass_index`` over N samples and a horizontal-flip flag per position.

    groups: [N] shard of each sample. Shards are visited in a seeded order, then a webdataset-style buffer
    of ``shuffle_buffer`` samples mixes them; None or a buffer >= N gives a uniform permutation, 0 or 1
    keeps index order. A bounded buffer keeps the reads of a large dataset within a few shards at a time.
    """
    n = len(groups)
    rng = np.random.default_rng([seed, pass_index])
    flips = rng.random(n) < 0.5
    shuffle_buffer = n if shuffle_buffer is None else shuffle_buffer
    if shuffle_buffer <= 1:
        return np.arange(n), flips
    sequence = np.argsort(rng.permutation(int(groups.max()) + 1)[groups], kind="stable")
    draws = rng.random(n)
    order: list[int] = []
    buffer: list[int] = []

    def emit() -> None:  # a random buffered sample leaves; the last one takes its slot
        k = int(draws[len(order)] * len(buffer))
        order.append(buffer[k])
        buffer[k] = buffer[-1]
        buffer.pop()

    for i in sequence:
        buffer.append(int(i))
        if len(buffer) >= shuffle_buffer:
            emit()
    while buffer:
        emit()
    return np.array(order), flips


def _stack(images: list[np.ndarray], flipped: list[bool]) -> Tensor:
    """uint8 [3, S, S] images -> float32 [B, 3, S, S] in [-1, 1], each mirrored if asked, in one copy."""
    out = np.empty((len(images), *images[0].shape), dtype=np.float32)
    for i, (image, flip) in enumerate(zip(images, flipped)):
        np.copyto(out[i], image[..., ::-1] if flip else image, casting="unsafe")
    return torch.from_numpy(scale_to_unit_range_(out))


class TrainStream(IterableDataset):
    """Infinite batches of rank ``rank``'s share of the global stream, starting ``start`` samples in."""

    def __init__(
        self,
        table: SampleTable,
        domain: str,
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int | None = None,
        hflip: bool = True,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        self.table, self.domain, self.batch_size = table, domain, batch_size
        self.seed, self.shuffle_buffer, self.hflip = seed, shuffle_buffer, hflip
        self.rank, self.world_size, self.start = rank, world_size, start
        self._passes: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def position(self, batch: int, i: int) -> int:
        """Global stream position of sample ``i`` of this rank's batch ``batch`` (counted from start)."""
        return self.start + self.rank + (batch * self.batch_size + i) * self.world_size

    def _pass(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if index not in self._passes:
            self._passes = {k: v for k, v in self._passes.items() if k == index - 1}  # keep two passes
            self._passes[index] = pass_order(self.table.shard_of, self.seed, index, self.shuffle_buffer)
        return self._passes[index]

    def make_batch(self, reader: SampleReader, batch: int) -> dict[str, Any]:
        samples, keys, flipped = [], [], []
        for i in range(self.batch_size):
            pass_index, pos = divmod(self.position(batch, i), len(self.table))
            order, flips = self._pass(pass_index)
            samples.append(reader.read(int(order[pos])))
            keys.append(self.table.keys[order[pos]])
            flipped.append(self.hflip and bool(flips[pos]))  # one flip for hr, lr and lr_up, as the reference
        images = {m: _stack([s[m] for s in samples], flipped) for m in IMAGE_MEMBERS}
        return {**images, "key": keys, "domain": [self.domain] * self.batch_size}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = SampleReader(self.table)
        batch = worker
        while True:
            yield self.make_batch(reader, batch)
            batch += workers
