"""``python -m sr3_lightning``: LightningCLI (fit/validate/test/predict) plus the project's own commands."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback

from sr3_lightning.callbacks.final_checkpoint import FinalCheckpoint
from sr3_lightning.checkpoint_io import AtomicCheckpointIO, find_resume_checkpoint
from sr3_lightning.data.datamodule import SR3DataModule
from sr3_lightning.module import SR3Module
from sr3_lightning.tracking import Tracking, make_loggers, trim_metrics_csv

log = logging.getLogger(__name__)


class SaveConfigToRun(SaveConfigCallback):
    """Write ``config.yaml`` into the run directory and send the resolved config (and the training subset
    of a limited-data run) to every logger, so each dashboard row says exactly how it was made."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = self.config.clone()
        config.pop("config", None)
        hparams = {"config": config.as_dict()}
        keys = getattr(trainer.datamodule, "train_keys", None) if trainer.datamodule else None
        if keys:
            hparams["train_keys"] = list(keys)
            # not trainer.log_dir: it broadcasts, and this runs on rank 0 alone
            run_dir = trainer.loggers[0].log_dir if trainer.loggers else trainer.default_root_dir
            Path(run_dir or trainer.default_root_dir, "train_keys.txt").write_text("\n".join(keys) + "\n")
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)


class SR3CLI(LightningCLI):
    """LightningCLI with a ``tracking`` section; the model's image size is written once and linked;
    ``last.ckpt`` always holds the final step (`FinalCheckpoint`)."""

    def __init__(self, args: ArgsType = None, **kwargs) -> None:
        super().__init__(
            SR3Module,
            SR3DataModule,
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [FinalCheckpoint()]},
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(Tracking, "tracking")
        parser.link_arguments("model.unet.image_size", "data.hr_size")
        parser.set_defaults({"trainer.default_root_dir": "runs/default"})
        parser.add_argument(
            "--fresh",
            type=bool,
            default=False,
            help="fit: start anew although the run directory holds checkpoints (the old run is moved aside)",
        )

    def instantiate_trainer(self, **kwargs):
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        run_dir = Path(trainer_cfg.get("default_root_dir") or "runs/default")
        prepare_run_dir(run_dir, fresh=self.subcommand == "fit" and bool(self._get(self.config, "fresh")))
        if trainer_cfg.get("logger") in (None, True):
            tracking = self._get(self.config_init, "tracking")
            if isinstance(tracking, Namespace):
                tracking = Tracking(**tracking.as_dict())
            kwargs["logger"] = make_loggers(tracking, run_dir)
        if not trainer_cfg.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Resume by default: a run directory that holds checkpoints continues from the newest good one."""
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") is None:
            found = find_resume_checkpoint(self.trainer.default_root_dir)
            if found is not None:
                cfg["ckpt_path"] = str(found)
        if cfg.get("ckpt_path"):
            step = torch.load(cfg["ckpt_path"], map_location="cpu", weights_only=False, mmap=True)[
                "global_step"
            ]
            log.warning("resuming from %s at step %d (pass --fresh to start anew)", cfg["ckpt_path"], step)
            trim_metrics_csv(self.trainer.default_root_dir, step)


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


def _commands() -> dict[str, Callable[[list[str]], None]]:
    from sr3_lightning.commands import (
        demo,
        diffsr_calibrate,
        import_reference,
        report,
        sample,
        sweep,
        upscale,
    )

    return {
        "import-reference": import_reference.main,
        "sample": sample.main,
        "demo": demo.main,
        "upscale": upscale.main,
        "diffsr-calibrate": diffsr_calibrate.main,
        "sweep": sweep.main,
        "report": report.main,
    }


def cli_main(args: ArgsType = None) -> SR3CLI | None:
    """Entry point of `python -m sr3_lightning` and `sr3-lightning`; `args` lets tests run it in-process."""
    argv = list(sys.argv[1:] if args is None else args)
    commands = _commands()
    if argv and argv[0] in commands:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            commands[argv[0]](argv[1:])
        except (ValueError, FileNotFoundError) as err:  # bad input: one paragraph, no traceback
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        return None
    if argv and argv[0] in ("-h", "--help"):
        print("Project commands: " + ", ".join(commands) + " (each takes --help).\n")
    return SR3CLI(args=argv)
