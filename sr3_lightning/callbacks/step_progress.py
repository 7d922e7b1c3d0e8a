"""StepProgressBar: the train bar counts the run's steps, also after a resume.

The train stream is one infinite epoch ended by ``trainer.max_steps``. Lightning sizes its bar by the
steps *left* and sets that size at the epoch start, which a run restored mid-epoch skips: a resumed run
showed ``11/?``. The CLI adds this bar to every run that shows one.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


class StepProgressBar(TQDMProgressBar):
    """Train batches so far out of the run's ``max_steps`` (times gradient accumulation), from the first
    batch of a fresh run and the first batch after a resume alike."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps > 0 and trainer.num_training_batches == float("inf"):
            return trainer.max_steps * trainer.accumulate_grad_batches
        return super().total_train_batches

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.total = convert_inf(self.total_train_batches)
        bar.n = bar.initial = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        bar.refresh()
