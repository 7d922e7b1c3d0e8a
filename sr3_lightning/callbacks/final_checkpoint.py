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
        """SIGTERM between two optimizer steps: save the step just finished. Inside validation or inside a
        gradient-accumulation window nothing is saved (the loop or the summed gradients would not resume
        exactly): the newest checkpoint stays the last periodic save, and the log says so."""
        if not isinstance(exception, SIGTERMException):
            return
        why_not = self._why_not_saved(trainer)
        if why_not:
            log.warning("SIGTERM at step %d: not saved (%s)", trainer.global_step, why_not)
        else:
            self.on_train_end(trainer, pl_module)

    @staticmethod
    def _why_not_saved(trainer: pl.Trainer) -> str | None:
        if trainer.state.stage != RunningStage.TRAINING:
            return f"during {trainer.state.stage}; the newest checkpoint is the last periodic save"
        if trainer.fit_loop.epoch_loop.batch_progress.current.ready % trainer.accumulate_grad_batches:
            return "inside a gradient-accumulation window; the newest checkpoint is the last periodic save"
        if not any(getattr(c, "save_last", None) is True for c in trainer.checkpoint_callbacks):
            return "no ModelCheckpoint with save_last: true"
        return None

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
