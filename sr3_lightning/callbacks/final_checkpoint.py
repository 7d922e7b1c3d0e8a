"""FinalCheckpoint: ``last.ckpt`` holds the step training ended on, not only the last periodic save.

Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` writes ``last.ckpt`` only when it
saves a periodic checkpoint. A run that stops between two of them (``trainer.max_time``, a ``max_steps``
that is not a multiple of N, early stopping) would leave ``last.ckpt`` up to N - 1 steps behind, and a
resumed run would train those steps again. SIGTERM (a preempted job, a stopped sweep run) ends a run
between two steps too: Lightning raises ``SIGTERMException`` after the step, and this callback saves it.
The CLI adds this callback to every ``fit``.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class FinalCheckpoint(Callback):
    """At the end of training, every ``ModelCheckpoint`` with ``save_last=True`` that has not saved the
    final step writes ``last.ckpt`` for it (``save_last="link"`` keeps Lightning's meaning: a link to the
    newest periodic checkpoint)."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """SIGTERM between two training steps: save the step just finished. Raised inside validation, it
        leaves the last save as it is (a checkpoint taken mid-validation would not resume cleanly)."""
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.state.stage == RunningStage.TRAINING:
            self.on_train_end(trainer, pl_module)
        else:
            log.warning("SIGTERM during %s: last.ckpt is the last periodic save", trainer.state.stage)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 or trainer.sanity_checking or trainer.fast_dev_run:
            return
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback.save_last is not True:
                continue
            if callback._last_global_step_saved == trainer.global_step:
                continue
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            log.info("saved %s at the final step %d", callback.last_model_path, trainer.global_step)
