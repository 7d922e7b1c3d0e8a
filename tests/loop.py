"""The training loop alone, for tests of what happens per step: a CPU Trainer without logger, checkpoints,
progress bar or summary, fitting a module on the tiny reference batch repeated."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, IterableDataset

from tests.reference import tiny_io


class _Repeat(IterableDataset):
    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self.batch


def fit_on_tiny_batch(model: LightningModule, root: Path, max_steps: int, **trainer_args: Any) -> Trainer:
    """Fit ``max_steps`` optimizer steps on the tiny reference batch; returns the Trainer."""
    io = tiny_io()
    batch = {"hr": io["train_hr"], "lr_up": io["train_sr"]}
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **trainer_args,
    )
    trainer.fit(model, DataLoader(_Repeat(batch), batch_size=None))
    return trainer
