"""SR3DataModule: per-domain shards -> an infinite, resumable train stream and fixed validation sets.

How the train stream is ordered, cut across ranks and workers, and resumed: ``data/train_stream.py``.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sr3_lightning.data.shards import (
    OnCorrupt,
    SampleReader,
    SampleTable,
    ShardIndex,
    load_index,
    locate_samples,
    pixels_to_tensor,
)
from sr3_lightning.data.train_stream import TrainStream

log = logging.getLogger(__name__)


@dataclass
class TrainDomain:
    """The domain to train on and which of its images to use."""

    domain: str  # name recorded in the shards' index.json, e.g. "anime"
    shards: str  # directory holding index.json (or a parent with one sub-directory per domain)
    limit: int | None = None  # train on this many images only (the limited-data study: 8..128); None = all
    subset_seed: int | None = None  # None: the first `limit` keys in index order; an int: a seeded sample


@dataclass
class ValDomain:
    """A domain to validate on: a fixed list of images, the same at every validation."""

    domain: str
    shards: str
    num_images: int = 8  # the last `num_images` keys in index order, never trained on (see SR3DataModule)


def select_subset(keys: list[str], limit: int | None, subset_seed: int | None) -> list[str]:
    """Pick ``limit`` keys, in index order: the first ones, or those ranked first by sha256(seed:key).

    Ranking by a hash of the key makes the subset a function of the keys alone (no RNG state, library
    version, worker or rank), and subsets with the same seed are nested: limit 8 is inside limit 16.
    """
    if limit is None:
        return list(keys)
    if limit > len(keys):
        raise ValueError(f"limit {limit}: only {len(keys)} training images are available; lower `limit`")
    if subset_seed is None:
        return list(keys[:limit])
    ranked = sorted(keys, key=lambda k: hashlib.sha256(f"{subset_seed}:{k}".encode()).digest())
    chosen = set(ranked[:limit])
    return [k for k in keys if k in chosen]


def check_limit(domain: str, limit: int | None, index: ShardIndex, held_out: int) -> None:
    """A limit must fit the images the shards leave for training (``sweep --check`` asks too)."""
    if limit is not None and limit > len(index.keys) - held_out:
        raise ValueError(
            f"train domain '{domain}': limit {limit} but {index.path} holds {len(index.keys)} "
            f"images, {held_out} of them held out for validation; lower `limit` or `num_images`"
        )


def check_num_images(domain: str, num_images: int, index: ShardIndex) -> None:
    """A val domain's ``num_images`` must fit its shards (``sweep --check`` asks too)."""
    if num_images > len(index.keys):
        raise ValueError(
            f"val domain '{domain}': num_images {num_images} but {index.path} holds {len(index.keys)} "
            "images; lower `num_images` or add images to the shards"
        )


class FixedSamples(Dataset):
    """The fixed validation images of one domain, in index order."""

    def __init__(self, table: SampleTable, domain: str) -> None:
        self.table, self.domain, self.reader = table, domain, SampleReader(table)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict[str, Tensor | str]:
        images = {m: pixels_to_tensor(pixels) for m, pixels in self.reader.read(i).items()}
        return {**images, "key": self.table.keys[i], "domain": self.domain}


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    """The train loader's collate: batches come ready (the default would walk them again)."""
    return batch


def _fingerprint(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


class SR3DataModule(pl.LightningDataModule):
    """Serves one training domain as an infinite stream (``trainer.max_steps`` decides the length) and
    each validation domain as its own loader of fixed images.

    Batches are ``{'hr', 'lr', 'lr_up': float [B, 3, S, S] in [-1, 1], 'key': list[str], 'domain':
    list[str]}``; ``lr_up`` is the bicubic upsample the reference calls "SR". Validation images (the last
    ``num_images`` keys of a domain) are excluded from training when train and val share a shard directory.
    The stream position is counted from the train batches the Trainer consumes (``on_before_batch_transfer``)
    and saved in checkpoints.
    """

    def __init__(
        self,
        train: TrainDomain | None = None,
        val: list[ValDomain] | None = None,
        batch_size: int = 4,
        num_workers: int = 2,
        shuffle_buffer: int | None = None,
        hflip: bool = True,
        lr_size: int = 16,
        hr_size: int = 128,
        on_corrupt: OnCorrupt = "raise",
        seed: int = 0,
    ) -> None:
        """
        Args:
            train: training domain, e.g. ``{domain: anime, shards: DIR, limit: 128, subset_seed: 0}``;
                None for validation-only runs.
            val: validation domains, e.g. ``[{domain: ffhq, shards: DIR, num_images: 8}]``; one loader each.
            batch_size: samples per batch (the reference 16->128 config's 4); every train batch is full.
            num_workers: train loader processes (validation reads its few images in the main process).
            shuffle_buffer: samples mixed at once within a pass; None (default): all of them, a uniform
                permutation as the reference's shuffling DataLoader; a bound keeps the reads of a pass
                within a few shards at a time (slow network storage); 0 or 1: index order.
            hflip: random horizontal flip of train samples (the same for hr, lr, lr_up), as the reference.
            lr_size: LR side in px; must equal the shards' (linked from the model config by the CLI).
            hr_size: HR side in px; must equal the shards'.
            on_corrupt: ``raise`` on a corrupt or mismatching shard, or ``skip`` its bad samples (logged).
            seed: seed of the pass orders and flips (the subset has its own ``subset_seed``).
        """
        super().__init__()
        if batch_size < 1 or num_workers < 0 or (shuffle_buffer or 0) < 0:
            raise ValueError(
                f"batch_size {batch_size}, num_workers {num_workers}, shuffle_buffer {shuffle_buffer}: "
                "batch_size must be >= 1, the others >= 0"
            )
        val = list(val or [])
        names = [v.domain for v in val]
        if len(set(names)) != len(names):
            raise ValueError(
                f"val domains {names}: each domain may appear once (they name the logged metrics)"
            )
        for v in val:
            if v.num_images < 1:
                raise ValueError(f"val domain '{v.domain}': num_images {v.num_images} must be >= 1")
        if train is not None and train.limit is not None and train.limit < 1:
            raise ValueError(
                f"train domain '{train.domain}': limit {train.limit} must be >= 1 (or None for all)"
            )
        self.train, self.val = train, val
        self.batch_size, self.num_workers, self.shuffle_buffer = batch_size, num_workers, shuffle_buffer
        self.hflip, self.lr_size, self.hr_size = hflip, lr_size, hr_size
        self.on_corrupt, self.seed = on_corrupt, seed
        self.train_keys: list[str] = []
        self._train_table: SampleTable | None = None
        self._val_tables: list[SampleTable] = []
        self._val_index_paths: list[Path] = []
        self._start, self._batches, self._world = 0, 0, 1
        self._loaded_state: dict[str, Any] | None = None

    @property
    def val_domain_names(self) -> list[str]:
        """Domain of each loader returned by ``val_dataloader()``, in order."""
        return [v.domain for v in self.val]

    def setup(self, stage: str | None = None) -> None:
        """Read and verify the indexes and shards; select the validation and training images."""
        if self.val and not self._val_tables:
            for v in self.val:
                index = load_index(v.shards, v.domain, self.lr_size, self.hr_size)
                check_num_images(v.domain, v.num_images, index)
                self._val_tables.append(locate_samples(index, index.keys[-v.num_images :], self.on_corrupt))
                self._val_index_paths.append(index.path.resolve())
        if self.train is not None and self._train_table is None and stage in (None, "fit"):
            t = self.train
            index = load_index(t.shards, t.domain, self.lr_size, self.hr_size)
            held_out = {
                key
                for path, table in zip(self._val_index_paths, self._val_tables)
                if path == index.path.resolve()
                for key in table.keys
            }
            pool = [k for k in index.keys if k not in held_out]
            if not pool:  # say so here: locate_samples would blame the shards for an empty request
                raise ValueError(
                    f"train domain '{t.domain}': all {len(index.keys)} images of {index.path} are held out "
                    f"for validation of domain '{t.domain}'; lower its val `num_images` or add training "
                    "images"
                )
            check_limit(t.domain, t.limit, index, len(held_out))
            keys = select_subset(pool, t.limit, t.subset_seed)
            self._train_table = locate_samples(index, keys, self.on_corrupt)
            self.train_keys = self._train_table.keys
            shown = self.train_keys if len(self.train_keys) <= 128 else [*self.train_keys[:20], "..."]
            rank_zero_info(
                f"train domain '{t.domain}': {len(self.train_keys)} images (limit {t.limit}, subset_seed "
                f"{t.subset_seed}, {len(held_out)} held out for validation) from {index.directory}, "
                f"fingerprint {_fingerprint(self.train_keys)}: {shown}"
            )

    def _rank_and_world_size(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def train_loader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """The train loader of one rank; ``train_dataloader`` calls it with the real rank and world size."""
        if self.train is None:
            raise ValueError("no train domain configured; set `train: {domain: ..., shards: ...}`")
        if self._train_table is None:
            self.setup("fit")
        assert self._train_table is not None
        state = self._loaded_state
        if state is not None and self._stream_settings(state) != self._stream_settings(self.state_dict()):
            log.warning(
                "train images, seed or shuffle_buffer differ from the checkpoint's; going on at sample %d of "
                "the new stream",
                state["samples_seen"],
            )
        self._start, self._batches, self._world, self._loaded_state = self.samples_seen, 0, world_size, None
        stream = TrainStream(
            self._train_table,
            self.train.domain,
            self.batch_size,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            hflip=self.hflip,
            rank=rank,
            world_size=world_size,
            start=self._start,
        )
        return DataLoader(
            stream,
            batch_size=None,  # the stream makes whole batches
            collate_fn=_as_is,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(*self._rank_and_world_size())

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per val domain (order: ``val_domain_names``); few images, read in the main process."""
        if not self._val_tables:
            self.setup("validate")
        return [
            DataLoader(
                FixedSamples(table, v.domain), batch_size=self.batch_size, shuffle=False, num_workers=0
            )
            for v, table in zip(self.val, self._val_tables)
        ]

    def test_dataloader(self) -> list[DataLoader]:
        """``test`` measures the val domains: their images are the ones held out of training."""
        return self.val_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count the train batches the Trainer actually uses (the loader itself runs ahead)."""
        if self.trainer is not None and self.trainer.training:
            self._batches += 1
        return batch

    @property
    def samples_seen(self) -> int:
        """Samples of the global train stream consumed so far, by all ranks together."""
        return self._start + self._batches * self.batch_size * self._world

    def state_dict(self) -> dict[str, Any]:
        """Stream position for checkpoints: samples consumed, and the pass and position in it they mean."""
        n = max(len(self.train_keys), 1)
        return {
            "samples_seen": self.samples_seen,
            "pass": self.samples_seen // n,
            "position": self.samples_seen % n,
            "train_fingerprint": _fingerprint(self.train_keys),
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def _stream_settings(self, state: dict[str, Any]) -> tuple[Any, ...]:
        """What decides a stream's order: the images, the seed and the buffer as far as it bounds a pass
        (any buffer of at least the subset size is the same full permutation; checkpoints from before the
        buffer was saved used 10,000)."""
        n = len(self.train_keys)
        buffer = state.get("shuffle_buffer", 10_000)
        return state.get("train_fingerprint"), state.get("seed"), min(n if buffer is None else buffer, n)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream where the checkpoint left it (from the next ``train_dataloader`` on)."""
        self._start, self._batches = int(state_dict["samples_seen"]), 0
        self._loaded_state = dict(state_dict)
        if (
            self.trainer is None or self.trainer.state.fn == "fit"
        ):  # validate loads it too, and trains nothing
            log.info(
                "train stream resumes at pass %s, position %s",
                state_dict.get("pass"),
                state_dict.get("position"),
            )
