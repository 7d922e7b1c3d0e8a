"""Experiment tracking: W&B (online when credentials exist, offline otherwise) always beside a CSV log.

W&B must never stop a run: a failed online start continues offline with a warning, and offline runs
print the ``wandb sync`` command that uploads them later.
"""

from __future__ import annotations

import logging
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)

WandbMode = Literal["auto", "online", "offline", "disabled"]


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc for the configured W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: WandbMode) -> str:
    if mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return mode


@dataclass
class Tracking:
    """Where and how a run is tracked (the ``tracking:`` section of a config)."""

    project: str = "sr3-lightning"
    name: str | None = None  # run name; default: the run directory's name
    mode: WandbMode = "auto"  # auto = online with credentials, else offline
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    group: str | None = None  # e.g. a sweep id


class SafeWandbLogger(WandbLogger):
    """WandbLogger that never stops a run: a failed online start continues offline and a failed log call
    is reported once; the CSV log beside it stays complete."""

    @property
    def experiment(self) -> Any:
        try:
            return super().experiment
        except Exception as err:  # network errors surface as many exception types
            if self._wandb_init.get("mode") == "offline":
                raise
            log.warning(
                "W&B online start failed (%s); continuing offline. Upload later with `wandb sync`.", err
            )
            self._wandb_init["mode"] = "offline"
            return super().experiment

    def _guarded(self, name: str, call, *args, **kwargs) -> None:
        try:
            call(*args, **kwargs)
        except Exception as err:  # W&B server or network trouble must not end a training run
            if not getattr(self, "_warned", False):
                log.warning("W&B %s failed (%s); training continues, the CSV log is complete.", name, err)
                self._warned = True

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._guarded("log_metrics", super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_hyperparams", super().log_hyperparams, params, *args, **kwargs)

    def log_image(self, key: str, images: list, step: int | None = None, **kwargs: Any) -> None:
        self._guarded("log_image", super().log_image, key, images, step, **kwargs)

    def log_table(self, key: str, *args: Any, **kwargs: Any) -> None:
        self._guarded("log_table", super().log_table, key, *args, **kwargs)

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guarded("checkpoint upload", super().after_save_checkpoint, checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._guarded("finalize", super().finalize, status)
        run = self._experiment
        if run is not None and self._wandb_init.get("mode") == "offline":
            log.warning(
                "W&B offline run stored in %s; upload it with: wandb sync %s", run.dir, Path(run.dir).parent
            )


def make_loggers(tracking: Tracking, run_dir: str | Path) -> list[Logger]:
    """CSV metrics at run_dir/metrics.csv (first: it sets trainer.log_dir), plus W&B unless disabled."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    mode = resolve_mode(tracking.mode)
    if mode != "disabled":
        os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
        loggers.append(
            SafeWandbLogger(
                project=tracking.project,
                name=tracking.name or run_dir.name,
                save_dir=str(run_dir),
                mode=mode,
                entity=tracking.entity,
                tags=tracking.tags or None,
                group=tracking.group,
                log_model=mode == "online",
            )
        )
    return loggers
