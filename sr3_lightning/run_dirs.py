"""Run directories: where ``fit``, ``validate`` and ``test`` write, checked before anything starts."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sr3_lightning.callbacks.domain_eval import DomainEval

log = logging.getLogger(__name__)


def evaluation_dir(run_dir: Path, subcommand: str | None, callbacks: list, objective: str) -> Path:
    """Where a subcommand logs: ``fit`` into the run directory, ``validate`` into RUN/validate, ``test``
    into RUN/test/<sampler settings> (e.g. RUN/test/ddim-50-eta0.0-seed0), one metrics.csv and W&B run per
    setting, so rows measured with other samplers at the same step are never mixed."""
    if subcommand in (None, "fit"):
        return run_dir
    if subcommand == "test":
        tags = [c.settings_tag(objective) for c in callbacks if isinstance(c, DomainEval)]
        return run_dir / "test" / "+".join(tags)
    return run_dir / subcommand


EVALUATION_DIRS = ("validate", "test")  # RUN/validate, RUN/test: evaluations of RUN's checkpoints


def check_not_evaluation(path: Path) -> None:
    """A ``validate`` or ``test`` directory measures one checkpoint of a training run; read as a run, its
    config would pass for a training run that stopped at that checkpoint."""
    path = path.resolve()
    for evaluation in (path, path.parent):  # RUN/validate, RUN/test, RUN/test/SETTINGS
        if evaluation.name in EVALUATION_DIRS and (evaluation.parent / "config.yaml").is_file():
            raise ValueError(
                f"{path} holds `{evaluation.name}` measurements of the checkpoints of {evaluation.parent} "
                f"(in the metrics.csv files under it), not a training run: report {evaluation.parent}"
            )


def run_dir_of(trainer_cfg: Any) -> Path:
    """The run directory a trainer config names (``trainer.default_root_dir``)."""
    return Path(trainer_cfg.get("default_root_dir") or "runs/default")


def run_of_checkpoint(ckpt_path: str | None) -> Path | None:
    """The training run that saved a checkpoint (``RUN/checkpoints/x.ckpt`` beside ``RUN/config.yaml``),
    or None for a checkpoint kept elsewhere (a download, ``import-reference`` output)."""
    if not ckpt_path:
        return None
    folder = Path(ckpt_path).parent
    if folder.name == "checkpoints" and (folder.parent / "config.yaml").is_file():
        return folder.parent
    return None


def evaluated_run_dir(configured: Path, ckpt_path: str | None, subcommand: str) -> Path:
    """validate / test log into the run that trained the weights, so two runs' checkpoints evaluated
    with one config never share (or replace) each other's rows; weights from outside a run log into
    ``trainer.default_root_dir``."""
    owner = run_of_checkpoint(ckpt_path)
    if owner is None or owner.resolve() == configured.resolve():
        return configured
    log.warning(
        "%s: logging into %s, the run that saved %s (trainer.default_root_dir=%s is another run)",
        *(subcommand, owner, ckpt_path, configured),
    )
    return owner


def prepare_run_dir(run_dir: Path, fresh: bool) -> None:
    """Fail early on a run directory that cannot be written; with ``fresh``, move an old run aside."""
    if fresh and run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        log.warning("--fresh: moved the previous run %s to %s", run_dir, aside)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(
            f"run directory {run_dir} is not writable ({err.strerror or err}); choose another "
            "--trainer.default_root_dir"
        ) from None
