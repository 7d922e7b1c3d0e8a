"""``python -m sr3_lightning``: LightningCLI (fit, validate, test) plus the project's own commands."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sr3_lightning.callbacks.domain_eval import DomainEval
from sr3_lightning.callbacks.final_checkpoint import FinalCheckpoint
from sr3_lightning.callbacks.step_progress import StepProgressBar
from sr3_lightning.checkpoint_io import AtomicCheckpointIO, find_resume_checkpoint
from sr3_lightning.data.datamodule import SR3DataModule
from sr3_lightning.module import SR3Module, restoring_from_checkpoint
from sr3_lightning.resume import changed_settings, check_resume_settings, read_checkpoint_head
from sr3_lightning.run_dirs import evaluated_run_dir, evaluation_dir, prepare_run_dir, run_dir_of
from sr3_lightning.tracking import (
    Tracking,
    count_metrics_rows,
    drop_earlier_rows,
    make_loggers,
    set_aside_logs_without_checkpoint,
    trim_metrics_csv,
)

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
    ``last.ckpt`` always holds the final step (`FinalCheckpoint`). The optimizer is the model's
    (``model.optimizer``), so no top-level ``--optimizer`` competes with it."""

    def __init__(self, args: ArgsType = None, **kwargs) -> None:
        self.restore_from: str | None = None  # the checkpoint fit resumes or validate / test evaluates
        self.nothing_left = False  # fit: the resumed run is already at max_steps
        self.weights_step = 0  # validate / test: the step of the weights evaluated (0: model.init_from)
        self.evaluation_log: Path | None = None  # validate / test: the metrics.csv they log into
        super().__init__(
            SR3Module,
            SR3DataModule,
            save_config_callback=SaveConfigToRun,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [FinalCheckpoint()]},
            auto_configure_optimizers=False,
            parser_kwargs={"prog": "python -m sr3_lightning", "allow_abbrev": False},  # no `--model.los`
            args=args,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate (losses) and test (`DomainEval`'s metrics); ``sample`` stands in for predict."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate", "test")}

    def _parse_ckpt_path(self) -> None:
        """Pick the checkpoint to restore (`restore_from`): ``--ckpt_path``, else for fit the run
        directory's newest (resume) and for validate and test `_checkpoint_to_evaluate`. They build the model
        from the checkpoint's settings; fit keeps the given ones, which `before_fit` checks against the
        checkpoint's instead of silently replacing them. A missing or unreadable file is named here,
        before Lightning's own load would fail with a traceback."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        for name in ("optimizer", "lr_scheduler"):
            if self.config[subcommand].get(name) is not None:
                raise ValueError(f"--{name} is not used by sr3-lightning: set model.{name} instead")
        cfg = self.config[subcommand]
        ckpt_path = cfg.get("ckpt_path")
        if subcommand in ("validate", "test") and not ckpt_path:
            ckpt_path = cfg["ckpt_path"] = self._checkpoint_to_evaluate(subcommand)
        if ckpt_path:
            self.weights_step, saved = read_checkpoint_head(ckpt_path)
            if subcommand != "fit":
                warn_replaced_settings(subcommand, ckpt_path, cfg.model, saved)
        elif subcommand == "fit" and not cfg.get("fresh"):
            found = find_resume_checkpoint(run_dir_of(cfg.trainer))
            ckpt_path = str(found) if found else None
        self.restore_from = ckpt_path
        if subcommand != "fit":
            super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """A model whose weights a checkpoint replaces does not read its ``model.init_from`` first: that
        file may be gone, or on another machine, by the time a run is resumed or validated."""
        with restoring_from_checkpoint(self.restore_from is not None):
            super().instantiate_classes()

    def _checkpoint_to_evaluate(self, subcommand: str) -> str | None:
        """validate or test without --ckpt_path: the run directory's newest checkpoint, else the weights
        of model.init_from. An untrained model is refused: its numbers would pass for a result."""
        cfg = self.config[subcommand]
        run_dir = run_dir_of(cfg.trainer)
        found = find_resume_checkpoint(run_dir)
        if found is not None:
            log.warning(
                "%s: evaluating %s, the newest checkpoint of %s (--ckpt_path picks another)",
                *(subcommand, found, run_dir),
            )
            return str(found)
        if cfg.model.get("init_from"):
            log.warning(
                "%s: evaluating the weights of model.init_from=%s: %s holds no checkpoint",
                *(subcommand, cfg.model.init_from, run_dir / "checkpoints"),
            )
            return None  # the model loads them when it is built
        raise ValueError(
            f"{subcommand} has no weights to evaluate: {run_dir / 'checkpoints'} holds no checkpoint and "
            "model.init_from is not set. Pass --ckpt_path=RUN/checkpoints/last.ckpt, point "
            "--trainer.default_root_dir at a training run, or set --model.init_from to a reference "
            "checkpoint."
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(Tracking, "tracking")
        parser.link_arguments("model.unet.image_size", "data.hr_size")
        parser.set_defaults({"trainer.default_root_dir": "runs/default"})
        for name in ("optimizer", "lr_scheduler"):  # configs saved before the model owned them say `null`
            parser.add_argument(f"--{name}", type=Any, default=None, help=f"unused; set model.{name} instead")
        parser.add_argument(
            "--fresh",
            type=bool,
            default=False,
            help="fit: start anew although the run directory holds checkpoints (the old run is moved aside)",
        )

    def instantiate_trainer(self, **kwargs):
        """Read the data first: a missing or corrupt shard (or the LPIPS weights `DomainEval` needs) stops
        the command before a run directory, W&B run or ``--fresh`` move is made for a run that cannot
        start."""
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        if self.subcommand in ("fit", "validate", "test"):
            self.datamodule.setup(self.subcommand)
        if self.subcommand == "test":
            check_test_inputs(
                callbacks, self.datamodule.val_domain_names, trainer_cfg.get("limit_test_batches")
            )
        for callback in callbacks if self.subcommand in ("fit", "test") else []:  # validate: losses only
            if isinstance(callback, DomainEval):
                callback.check_inputs(self.datamodule.val_domain_names)
        run_dir = run_dir_of(trainer_cfg)
        if self.subcommand in ("validate", "test"):
            run_dir = evaluated_run_dir(run_dir, self.restore_from, self.subcommand)
        prepare_run_dir(run_dir, fresh=self.subcommand == "fit" and bool(self._get(self.config, "fresh")))
        if self.subcommand == "fit" and self.restore_from is None:
            set_aside_logs_without_checkpoint(run_dir)
        if trainer_cfg.get("logger") in (None, True):
            tracking = self._get(self.config_init, "tracking")
            if isinstance(tracking, Namespace):
                tracking = Tracking(**tracking.as_dict())
            log_dir = evaluation_dir(run_dir, self.subcommand, callbacks, self.model.hparams.objective)
            if log_dir != run_dir:  # keep the training run's config and metrics intact
                name = "-".join((run_dir.name, *log_dir.relative_to(run_dir).parts))
                tracking = replace(tracking, name=tracking.name or name)
                self.evaluation_log = log_dir / "metrics.csv"
            kwargs["logger"] = make_loggers(tracking, log_dir, job_type=JOB_TYPES[self.subcommand or "fit"])
        if not trainer_cfg.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        if trainer_cfg.get("enable_progress_bar") is not False:
            kwargs["callbacks"] = with_step_progress_bar(callbacks)
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Resume by default: a run directory that holds checkpoints continues from the newest good one
        (found by `_parse_ckpt_path`)."""
        cfg = self.config_init[self.subcommand]
        cfg["ckpt_path"] = self.restore_from
        self.nothing_left = False
        if cfg.get("ckpt_path"):
            optimizer = self.model.configure_optimizers()  # as configured now; the resume restores the saved
            optimizer = None if isinstance(optimizer, dict) else optimizer  # dict: with an lr scheduler
            step = check_resume_settings(cfg["ckpt_path"], dict(self.model.hparams), optimizer)
            log.warning(
                "resuming from %s at step %d (pass --fresh=true to start anew)", cfg["ckpt_path"], step
            )
            if 0 <= self.trainer.max_steps <= step:
                log.warning(
                    "the run is already at step %d and trainer.max_steps is %d: nothing left to train, and "
                    "nothing is run or rewritten; raise --trainer.max_steps, or pass --fresh=true to start "
                    "a new run",
                    *(step, self.trainer.max_steps),
                )
                self.nothing_left = True
                return
            trim_metrics_csv(self.trainer.default_root_dir, step)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``, unless the resumed run is already at ``max_steps`` (`before_fit`): then the
        run's config.yaml, metrics and checkpoints stay as they are."""
        if not self.nothing_left:
            self.trainer.fit(**kwargs)

    def validate(self, **kwargs: Any) -> None:
        self._measure(self.trainer.validate, kwargs)

    def test(self, **kwargs: Any) -> None:
        self._measure(self.trainer.test, kwargs)

    def _measure(self, run: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        """An evaluation of weights measured before replaces their earlier rows in its metrics.csv, as it
        replaces their per-image files, once it has finished: each step's rows are one measurement."""
        earlier = count_metrics_rows(self.evaluation_log) if self.evaluation_log else 0
        run(**kwargs)
        if self.evaluation_log:
            drop_earlier_rows(self.evaluation_log, self.weights_step, earlier)


def warn_replaced_settings(subcommand: str, ckpt_path: str, model: Namespace, saved: dict[str, Any]) -> None:
    """validate and test build the model from the checkpoint's settings: a config value they replace is
    named, so nobody reads the results as measured with it."""
    given = model.as_dict() if isinstance(model, Namespace) else dict(model)
    replaced = changed_settings(given, saved)
    if replaced:
        log.warning(
            "%s: the model is built as %s was trained; these config values are not used: %s",
            *(subcommand, ckpt_path, "; ".join(replaced)),
        )


JOB_TYPES = {"fit": "train", "validate": "validate", "test": "test"}  # W&B's job_type: `report` reads train


def check_test_inputs(callbacks: list, val_names: list[str], limit_batches: Any) -> None:
    """``test`` measures the val domains with `DomainEval`: without either it would measure nothing."""
    if not any(isinstance(c, DomainEval) for c in callbacks):
        raise ValueError(
            "test super-resolves the val domains with the DomainEval callback, and the config has none: "
            "add --trainer.callbacks+=sr3_lightning.callbacks.DomainEval (or use the training run's config, "
            "e.g. configs/finetune_anime.yaml)"
        )
    if not val_names:
        raise ValueError("test evaluates the val domains, and data.val is empty: set data.val")
    if limit_batches == 0:
        raise ValueError("trainer.limit_test_batches=0 skips the test loop and its evaluation: remove it")


def with_step_progress_bar(callbacks: list) -> list:
    """The configured callbacks, plus `StepProgressBar` unless the config brings its own bar."""
    if any(isinstance(c, ProgressBar) for c in callbacks):
        return callbacks
    return [*callbacks, StepProgressBar()]


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


def show_project_logs() -> None:
    """Our INFO lines (resume, init_from, DomainEval, shards) on stderr; other libraries stay at WARNING,
    without the lines that say nothing about the run (`quiet_library_noise`)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("sr3_lightning", "make_shards"):
        logging.getLogger(name).setLevel(logging.INFO)
    quiet_library_noise()


# Library output that is true of every run and says nothing about this one.
NOISE_WARNINGS = (
    r"Checkpoint directory .* exists and is not empty",  # the run directory is resumed on purpose
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # Lightning's internals on newer torch
)
NOISE_LOG_PREFIXES = ("💡 Tip:",)  # Lightning's adverts for its cloud products


def quiet_library_noise() -> None:
    """Drop `NOISE_WARNINGS` and Lightning's product tips, so the lines a user sees are about the run."""
    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_not_a_tip)


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(NOISE_LOG_PREFIXES)


def cli_main(args: ArgsType = None) -> SR3CLI | None:
    """Entry point of `python -m sr3_lightning` and `sr3-lightning`; `args` lets tests run it in-process."""
    argv = list(sys.argv[1:] if args is None else args)
    commands = _commands()
    show_project_logs()
    if argv and argv[0] in commands:
        with bad_input_exits():
            commands[argv[0]](argv[1:])
        return None
    if argv and argv[0] in ("-h", "--help"):
        print("Project commands: " + ", ".join(commands) + " (each takes --help).\n")
    if args is None:
        return SR3CLI()  # LightningCLI reads sys.argv itself
    with warnings.catch_warnings():  # a project command (demo) runs fit with its own arguments: intended
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return SR3CLI(args=argv)


@contextlib.contextmanager
def bad_input_exits() -> Iterator[None]:
    """Bad input (missing or corrupt files, bad values) is one paragraph and exit code 2, not a traceback.

    A ValueError counts as bad input only when our own checks raised it; one from inside torch or another
    library is more likely a bug, and its traceback is what a bug report needs."""
    try:
        yield
    except (ValueError, FileNotFoundError) as err:
        bad_input = _bad_input(err)
        if bad_input is None:
            raise
        print(f"error: {bad_input}", file=sys.stderr)
        raise SystemExit(2) from None


PROJECT_MODULES = ("sr3_lightning", "dataset_tools")


def _bad_input(err: BaseException | None) -> BaseException | None:
    """`err`, or the error it was raised from (jsonargparse re-raises a config class's own check as "does
    not validate against any of the Union subtypes"), when it is a missing file or one of our checks."""
    while err is not None:
        if isinstance(err, FileNotFoundError) or (isinstance(err, ValueError) and _raised_by_project(err)):
            return err
        err = err.__cause__
    return None


def _raised_by_project(err: BaseException) -> bool:
    """Whether the innermost frame of `err`'s traceback is in this project's code."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return module.split(".")[0] in PROJECT_MODULES


SIGTERM_EXIT = 128 + 15  # the shell's code for a process ended by SIGTERM


def main() -> None:
    """The command line; in-process callers of `cli_main` get fit's, validate's and test's exceptions instead.

    A run stopped by SIGTERM exits with 143, not Lightning's 0: a job scheduler or sweep must not take it
    for a finished run (`FinalCheckpoint` saves the step it stopped at, where that resumes exactly)."""
    try:
        with bad_input_exits():
            cli_main()
    except SIGTERMException:
        print(
            "stopped by SIGTERM (the log above says which step was saved); run the command again, without "
            "--ckpt_path, to resume from the run's newest checkpoint",
            file=sys.stderr,
        )
        raise SystemExit(SIGTERM_EXIT) from None
