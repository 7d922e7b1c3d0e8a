"""How tests drive training: the command line of a tiny `fit` on the test shards, and the training loop
alone (a CPU Trainer without logger, checkpoints, progress bar or summary) on the tiny reference batch."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, IterableDataset

from tests.reference import tiny_io


def tiny_fit_args(shards: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    """``fit`` of configs/tiny_cpu.yaml on ``shards`` (anime, 2 val images) into ``run_dir`` for ``steps``."""
    return [
        "fit",
        "--config",
        "configs/tiny_cpu.yaml",
        f"--data.train.shards={shards}",
        "--data.val=[{domain: anime, shards: " + str(shards) + ", num_images: 2}]",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_steps={steps}",
        *extra,
    ]


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


class SigtermAt(Callback):
    """Sends this process SIGTERM during training step ``step``, as a scheduler preempting a job would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, *_: Any) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
