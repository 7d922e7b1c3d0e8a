"""Experiment tracking: W&B (online when credentials exist, offline otherwise) always beside a CSV log.

W&B must never stop a run: a failed online start continues offline with a warning, and offline runs
print the ``wandb sync`` command that uploads them later.
"""

from __future__ import annotations

import csv
import logging
import netrc
import os
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self._wandb_init.get("anonymous") is None:  # W&B warns that the setting is gone, even for None
            del self._wandb_init["anonymous"]

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


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps its rows and header."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class RunCSVLogger(CSVLogger):
    """CSVLogger that continues ``metrics.csv`` across resumes instead of starting it anew."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


@rank_zero_only
def trim_metrics_csv(run_dir: str | Path, last_step: int) -> None:
    """Drop rows logged after ``last_step``: a resumed run logs those steps again."""
    _keep_metrics_rows(Path(run_dir) / "metrics.csv", lambda _, step: step <= last_step)


def count_metrics_rows(path: Path) -> int:
    """Rows in a metrics.csv (0 when there is none)."""
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        return sum(1 for _ in csv.DictReader(f))


@rank_zero_only
def drop_earlier_rows(path: Path, step: int, earlier: int) -> None:
    """Drop the rows of ``step`` among the first ``earlier`` rows (those written before this measurement):
    ``validate`` / ``test`` of the same weights again replaces their rows once it has finished."""
    if _keep_metrics_rows(path, lambda i, s: i >= earlier or s != step):
        log.warning("%s: the earlier rows of step %d are replaced by this measurement", path, step)


def _keep_metrics_rows(path: Path, keep: Callable[[int, int], bool]) -> int:
    """Rewrite ``path`` with the rows ``keep(index, step)`` accepts; returns how many were dropped."""
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for i, r in enumerate(rows) if keep(i, int(r["step"]))]
    if len(kept) < len(rows):
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, path)
    return len(rows) - len(kept)


@rank_zero_only
def set_aside_logs_without_checkpoint(run_dir: Path) -> None:
    """A fit that finds no checkpoint starts over: the rows of an earlier start that saved none are moved
    to ``metrics.<time>.csv`` (not appended to, which would log those steps twice) and its W&B run id is
    dropped, so the new start is a W&B run of its own."""
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        aside = metrics.with_name(f"metrics.{time.strftime('%Y%m%d-%H%M%S')}.csv")
        metrics.rename(aside)
        log.warning("%s has no checkpoint to resume: its earlier metrics.csv is moved to %s", run_dir, aside)
    if not os.environ.get("WANDB_RUN_ID"):
        (run_dir / "wandb_run_id.txt").unlink(missing_ok=True)


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id of this run directory, fixed at its first start so a resumed run continues the same
    W&B run. A sweep agent's ``WANDB_RUN_ID`` wins: the run must keep the id the sweep gave it."""
    path = run_dir / "wandb_run_id.txt"
    if os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]
    elif path.is_file():
        return path.read_text().strip()
    else:
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id


def make_loggers(tracking: Tracking, run_dir: str | Path, job_type: str = "train") -> list[Logger]:
    """CSV metrics at run_dir/metrics.csv (first: it sets trainer.log_dir), plus W&B unless disabled;
    ``job_type`` tells training runs from evaluations of their checkpoints (``validate``, ``test``)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [RunCSVLogger(save_dir=str(run_dir), name="", version="")]
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
                id=wandb_run_id(run_dir),
                resume="allow",
                job_type=job_type,
            )
        )
    return loggers
