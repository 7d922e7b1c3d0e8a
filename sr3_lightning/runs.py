"""Finished runs of a study, read for the report: settings, the steps asked for, metrics per step.

Runs come from local run directories (``config.yaml`` + ``metrics.csv`` and the W&B offline files), from
sweep directories (their finished runs, see ``sweep/local.py``), or from a W&B project or sweep through the
public API (``wandb:ENTITY/PROJECT[/SWEEP_ID]``).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sr3_lightning.callbacks.domain_eval import sampler_tag
from sr3_lightning.diffusion.schedule import REFERENCE_SCHEDULE
from sr3_lightning.replicates import recipe_of, seeds_of
from sr3_lightning.run_dirs import EVALUATION_DIRS, check_not_evaluation

log = logging.getLogger(__name__)

KEY = re.compile(
    r"^(val|forget)/([^/]+)/((?:bicubic_)?(?:psnr|ssim|lpips|lpips_random|consistency|diversity))$"
)
METRICS = ("psnr", "ssim", "lpips", "lpips_random")  # the report's columns and plots per domain, when logged
NAMES = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "lpips_random": "LPIPS (untrained net)"}
# Knobs a study keeps fixed: a table row is only filled by runs that share the study's values of these.
FIXED_KNOBS = (
    "optimizer",
    "init_from",
    "ema_decay",
    "t_sampling",
    "train_domain",
    "batch_size",
    "beta_schedule",
    "num_timesteps",
    "evaluation",
)
# Seeds, named in run labels where they vary; runs that differ only in them are replicates (replicates.py).
SEED_NAMES = {
    "seed_everything": "seed_everything",
    "model_seed": "model.seed",
    "data_seed": "data.seed",
    "subset_seed": "subset_seed",
}
SETTING_NAMES = {  # run labels
    **{"loss": "loss", "limit": "images", "t_min": "t_min", "t_max": "t_max"},
    **{k: k for k in FIXED_KNOBS},
    "evaluation": "DomainEval sampler",
    **SEED_NAMES,
}


@dataclass
class Run:
    """One finished run: its settings, the steps it was asked to evaluate, and metrics per evaluated step."""

    name: str
    source: str
    settings: dict[str, Any]
    listed_steps: list[int]
    original_domains: list[str]
    evals: dict[int, dict[str, float]]  # global step -> {val/..., forget/...}
    seconds: float | None = None
    label: str = ""  # the settings that vary between the reported runs (`_label`)
    setting_label: str = ""  # the same without the seeds: what its replicates share
    # its config without seeds and bookkeeping (replicates.py)
    recipe: dict[str, str] = field(default_factory=dict)
    seeds: tuple = ()  # what tells its replicates apart (`replicates.seeds_of`)
    has_domain_eval: bool = True  # its config lists the DomainEval callback
    log_name: str = "metrics.csv"  # where its metrics were read, for messages
    val_order: tuple[str, ...] = ()  # its config's val domains, in order: the tables' column order

    @property
    def why_no_metrics(self) -> str:
        """Why a run has no evaluation metrics, and the fix (for the report's warning and error)."""
        missing = f"no DomainEval metrics (val/DOMAIN/psnr ...) in its {self.log_name}"
        if not self.has_domain_eval:
            return (
                f"{missing}; its config has no DomainEval callback: add sr3_lightning.callbacks.DomainEval "
                "to trainer.callbacks (see configs/finetune_anime.yaml) and run it again"
            )
        return f"{missing}, although its config lists DomainEval: it never logged an evaluation; run it again"

    @property
    def domains(self) -> list[str]:
        keys = [k for step in sorted(self.evals) for k in self.evals[step]]
        logged = list(dict.fromkeys(KEY.match(k).group(2) for k in keys if k.startswith("val/")))
        return sorted(logged, key=lambda d: self.val_order.index(d) if d in self.val_order else len(logged))


def _optimizer(model: dict[str, Any]) -> str:
    opt = model.get("optimizer")
    if not isinstance(opt, dict):
        return "default"
    args = ", ".join(f"{k}={v}" for k, v in sorted((opt.get("init_args") or {}).items()))
    return f"{str(opt.get('class_path', '?')).rsplit('.', 1)[-1]}({args})"


def settings_of(config: dict[str, Any]) -> dict[str, Any]:
    """The study's knobs from a resolved fit config (t_max None = T), and those it keeps fixed."""
    model, trainer = config.get("model") or {}, config.get("trainer") or {}
    data = config.get("data") or {}
    train = data.get("train") or {}
    return {
        "objective": model.get("objective", "diffusion"),
        "loss": model.get("loss", "l1"),
        "limit": train.get("limit"),
        "t_min": model.get("t_min", 1),
        "t_max": model.get("t_max") or model.get("num_timesteps", REFERENCE_SCHEDULE["num_timesteps"]),
        "max_steps": trainer.get("max_steps"),
        "optimizer": _optimizer(model),
        "init_from": model.get("init_from"),
        "ema_decay": model.get("ema_decay"),
        "t_sampling": model.get("t_sampling", "batch"),
        "seed_everything": config.get("seed_everything"),
        "model_seed": model.get("seed", 0),
        "data_seed": data.get("seed", 0),
        "subset_seed": train.get("subset_seed"),
        "train_domain": train.get("domain"),
        "batch_size": data.get("batch_size"),
        "beta_schedule": model.get("beta_schedule", REFERENCE_SCHEDULE["kind"]),
        "num_timesteps": model.get("num_timesteps", REFERENCE_SCHEDULE["num_timesteps"]),
        "evaluation": _evaluation(config, model.get("objective", "diffusion")),
    }


def has_setting(run: Run, knob: str) -> bool:
    """Whether the run has this knob at all: a regression run has no DomainEval sampler to differ in."""
    return not (knob == "evaluation" and run.settings[knob] is None)


def _evaluation(config: dict[str, Any], objective: str) -> str | None:
    """The DomainEval sampler a run was measured with (None: a regression run, which has no sampler)."""
    if objective == "regression":
        return None
    args = domain_eval_args(config) or {}
    sampler, steps = args.get("sampler", "ddpm"), args.get("steps")
    return sampler_tag(sampler, steps, args.get("eta", 0.0), args.get("seed", 0))


def domain_eval_args(config: dict[str, Any]) -> dict[str, Any] | None:
    """The DomainEval callback's init_args in a fit config; None when it has no DomainEval."""
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("DomainEval"):
            return cb.get("init_args") or {}
    return None


def listed_steps(config: dict[str, Any]) -> list[int]:
    """The steps DomainEval was asked for: at_steps, multiples of every_n_steps, and the end."""
    args, max_steps = domain_eval_args(config) or {}, (config.get("trainer") or {}).get("max_steps") or 0
    steps = set(args.get("at_steps") or [])
    if args.get("every_n_steps"):
        steps |= set(range(args["every_n_steps"], max_steps + 1, args["every_n_steps"]))
    if args.get("at_end", True) and max_steps > 0:
        steps.add(max_steps)
    return sorted(s for s in steps if 0 < s <= max_steps)


def metrics_by_step(rows: Iterable[dict[str, Any]], step_key: str) -> dict[int, dict[str, float]]:
    """DomainEval's keys per step from logged rows (CSV or W&B history); a later value wins."""
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        if row.get(step_key) in (None, ""):
            continue
        values = {k: float(v) for k, v in row.items() if KEY.match(k) and v not in (None, "")}
        if values:
            out.setdefault(int(float(row[step_key])), {}).update(values)
    return {s: v for s, v in sorted(out.items()) if any(k.endswith("/psnr") for k in v)}


def make_run(
    name: str, source: str, config: dict, rows: Iterable[dict], step_key: str, seconds=None, log_name=""
) -> Run:
    eval_args = domain_eval_args(config)
    settings = settings_of(config)
    return Run(
        name=name,
        source=source,
        settings=settings,
        listed_steps=listed_steps(config),
        original_domains=list((eval_args or {}).get("original_domains") or []),
        evals=metrics_by_step(rows, step_key),
        seconds=seconds,
        has_domain_eval=eval_args is not None,
        log_name=log_name or "metrics.csv",
        recipe=recipe_of(config, settings["evaluation"]),
        seeds=seeds_of(config),
        val_order=tuple(
            v.get("domain") for v in (config.get("data") or {}).get("val") or [] if isinstance(v, dict)
        ),
    )


def read_run_dir(run_dir: Path, seconds: float | None = None) -> Run:
    """A local run: ``config.yaml``, the offline W&B history of each segment, then ``metrics.csv``.

    Both logs hold the same numbers; reading both keeps the early steps of a run that was resumed (the CSV
    logger starts its file anew on resume, while every segment keeps its own offline W&B run).
    """
    from sr3_lightning.wandb_offline import read_history

    config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    rows = []
    for segment in sorted(run_dir.glob("wandb/offline-run-*"), key=lambda p: p.name):
        if any(segment.glob("run-*.wandb")):
            rows += [{"step": r.get("trainer/global_step"), **r} for r in read_history(segment)]
    if (run_dir / "metrics.csv").is_file():
        with (run_dir / "metrics.csv").open(newline="") as f:
            rows += list(csv.DictReader(f))
        log_name = "metrics.csv"
    else:
        log_name = "run directory (it has no metrics.csv)"
    return make_run(run_dir.name, str(run_dir), config, rows, "step", seconds, log_name)


def _local_runs(path: Path, left_out: list[str], depth: int = 0) -> list[Run]:
    """Runs under ``path``; runs of a local sweep that did not finish are named in ``left_out``."""
    from sr3_lightning.sweep.local import latest_records

    if (path / "config.yaml").is_file():
        return [read_run_dir(path)]
    last = latest_records(path)
    if last:  # a local sweep directory: its finished runs only
        done = {rid: r for rid, r in last.items() if r["state"] == "finished"}
        gone = [rid for rid in done if not (path / rid / "config.yaml").is_file()]
        left_out += [f"{path / rid}: recorded as finished, but its config.yaml is gone" for rid in gone]
        left_out += [
            f"{path / rid}: failed (log: {path / 'logs' / (rid + '.log')}); a grid's relaunch retries it"
            for rid, r in sorted(last.items())
            if r["state"] != "finished"
        ]
        unfinished = [
            p for p in sorted(path.iterdir()) if (p / "config.yaml").is_file() and p.name not in last
        ]
        left_out += [f"{p}: not finished (running, or cut off: relaunch the sweep)" for p in unfinished]
        return [
            read_run_dir(path / rid, r.get("seconds")) for rid, r in sorted(done.items()) if rid not in gone
        ]
    if depth >= 3 or not path.is_dir():
        return []
    return [
        run
        for child in sorted(path.iterdir())
        if child.is_dir() and child.name not in EVALUATION_DIRS
        for run in _local_runs(child, left_out, depth + 1)
    ]


def _wandb_runs(path: str, left_out: list[str]) -> list[Run]:
    """Finished runs of ``ENTITY/PROJECT`` or ``ENTITY/PROJECT/SWEEP_ID`` from the W&B server; the others
    (running, crashed, failed, killed) are named in ``left_out``."""
    import wandb
    from wandb.errors import AuthenticationError, CommError, UsageError

    try:
        api = wandb.Api()
        found = api.sweep(path).runs if path.count("/") == 2 else api.runs(path)
        runs = []
        for r in found:
            if getattr(r, "job_type", None) in EVALUATION_DIRS:
                continue  # a `validate` or `test` of a checkpoint, not a training run
            if r.state != "finished":
                left_out.append(f"wandb:{'/'.join(r.path)} ({r.name}): {r.state}, not finished")
            else:
                config, seconds = r.config.get("config") or {}, r.summary.get("_runtime")
                source, history = f"wandb:{'/'.join(r.path)}", r.scan_history()
                runs.append(
                    make_run(r.name, source, config, history, "trainer/global_step", seconds, "W&B history")
                )
    except (UsageError, AuthenticationError) as err:
        raise ValueError(
            f"report wandb:{path} reads the W&B server, which needs a login ({err}): run `wandb login` (or "
            "set WANDB_API_KEY), or report local run or sweep directories instead (e.g. runs/steps)"
        ) from None
    except CommError as err:
        raise ValueError(
            f"could not read wandb:{path} from the W&B server ({err}); check ENTITY/PROJECT[/SWEEP_ID] and "
            "the network, or report local run or sweep directories instead"
        ) from None
    return runs


def load_runs(sources: list[str]) -> tuple[list[Run], list[str]]:
    """Every finished run under the given directories / ``wandb:`` paths, each once, labelled; runs without
    evaluation metrics cannot fill a table or plot, so they are returned apart (one line each, with the fix)
    and named in a warning. ValueError when no run has metrics."""
    runs: dict[str, Run] = {}
    left_out: list[str] = []
    for source in sources:
        before = len(left_out)
        if source.startswith("wandb:"):
            found = _wandb_runs(source.removeprefix("wandb:"), left_out)
        elif not Path(source).exists():
            raise FileNotFoundError(
                f"{source} does not exist (a run directory, a sweep directory or wandb:E/P)"
            )
        else:
            check_not_evaluation(Path(source))
            found = _local_runs(Path(source), left_out)
        if not found:
            where = "a run directory holds config.yaml and metrics.csv"
            if source.startswith("wandb:"):
                where = "W&B holds no finished runs there"
                if source.count("/") == 1:
                    where += " (read as ENTITY/PROJECT; a sweep is wandb:ENTITY/PROJECT/SWEEP_ID)"
            raise FileNotFoundError(
                f"no finished runs under {source} ({where})" + "".join(f"; {w}" for w in left_out[before:])
            )
        runs.update({str(Path(r.source).resolve()) if ":" not in r.source else r.source: r for r in found})
    out = [r for r in runs.values() if r.evals]
    skipped = [f"{r.source}: {r.why_no_metrics}" for r in runs.values() if not r.evals]
    if not out:
        raise ValueError(
            f"none of the {len(skipped)} run(s) has evaluation metrics, so there is nothing to report: "
            + "; ".join(skipped)
        )
    if skipped:
        log.warning("skipping %d run(s) without evaluation metrics: %s", len(skipped), "; ".join(skipped))
    partial = [r for r in out if r.listed_steps and max(r.listed_steps) not in r.evals]
    left_out += [
        f"{r.source}: stopped before its last evaluation (evaluated up to step {max(r.evals)} of "
        f"{max(r.listed_steps)}); resume it to report it"
        for r in partial
    ]
    out = [r for r in out if all(r is not p for p in partial)]
    if left_out:
        log.warning("leaving out %d run(s): %s", len(left_out), "; ".join(left_out))
    if not out:
        raise ValueError("no run finished, so there is nothing to report: " + "; ".join(left_out))
    _label(out)
    return out, skipped + left_out


def _label(runs: list[Run]) -> None:
    """Name each run by the settings that vary between the runs (plus its name where that is ambiguous);
    ``setting_label`` leaves the seeds out, naming what a run's replicates share."""
    varying = [k for k in SETTING_NAMES if len({str(r.settings[k]) for r in runs if has_setting(r, k)}) > 1]
    for r in runs:
        shown = {
            k: f"{SETTING_NAMES[k]}={'all' if k == 'limit' and r.settings[k] is None else r.settings[k]}"
            for k in varying
            if has_setting(r, k)
        }
        r.setting_label = ", ".join(v for k, v in shown.items() if k not in SEED_NAMES)
        r.label = ", ".join(shown.values()) or r.name
    labels = [(r.label, r.settings["objective"]) for r in runs]
    names = [r.name for r in runs]  # a grid point of two sweeps has the same run id in both
    for r in runs:
        name = r.name if names.count(r.name) == 1 else f"{Path(r.source).parent.name}/{r.name}"
        r.label += f" ({name})" if labels.count((r.label, r.settings["objective"])) > 1 else ""
