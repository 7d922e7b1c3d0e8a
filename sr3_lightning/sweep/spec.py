"""Load a W&B sweep YAML, check it is a valid sweep, and check every parameter against the ``fit`` CLI.

A sweep file is standard W&B sweep YAML whose ``command`` runs ``python -m sr3_lightning fit ... ${args}``.
The W&B agent (and the local backend, which builds the command with the agent's own functions) turns each
run's parameters into ``--key=value`` flags, so a parameter is accepted exactly when ``fit`` accepts
``--key=value`` and the model, data module and callbacks then accept the values. Before any run starts,
every run's flags are parsed with the real LightningCLI parser and those classes are constructed from the
result on the meta device (their own value checks run; no weights, no training). The files each run reads
first are looked up too: its ``init_from`` checkpoint and its shards' ``index.json`` files.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RUN_DIR_VARIABLE = "$WANDB_RUN_ID"  # the command must give each run its own directory (see sweeps/*.yaml)
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")  # W&B's environment macro in a sweep command


@dataclass(frozen=True)
class Sweep:
    """A sweep file: its W&B config as written and the fixed arguments its command gives ``fit``."""

    path: Path
    config: dict[str, Any]
    fit_args: list[str]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def method(self) -> str:
        return self.config["method"]


def sweep_engine() -> Any:
    """W&B's open-source sweep engine (the ``sweeps`` package), imported without its pydantic warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


# What a run logs and a sweep may optimise: DomainEval's and the validation loop's keys, or the train loss.
LOGGED_METRIC = re.compile(
    r"^(train/loss|val/[^/]+/loss|(val|forget)/[^/]+/(bicubic_)?(psnr|ssim|lpips|lpips_random|consistency|diversity))$"
)


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; ValueError names the file and what is wrong."""
    sweeps = sweep_engine()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist (the study sweeps are in sweeps/)")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not YAML: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a W&B sweep: expected a mapping with method, parameters, command")
    try:
        problems = sweeps.schema_violations_from_proposed_config(config)
    except ValueError as err:  # the engine raises on some malformed parameters, e.g. a bare list of values
        problems = [f"{err} (write a parameter as {{values: [...]}}, {{value: x}} or a distribution)"]
    metric = config.get("metric")
    if config.get("method") == "bayes" and not (isinstance(metric, dict) and metric.get("name")):
        problems.append(
            "a bayes sweep needs the metric it optimises, e.g. metric: {name: val/anime/psnr, goal: maximize}"
        )
    name = metric.get("name") if isinstance(metric, dict) else None
    if name and not LOGGED_METRIC.match(str(name)):
        problems.append(
            f"metric {name!r} is not a key the runs log, so the search would see no values: use "
            "val/DOMAIN/psnr (ssim, lpips, consistency, loss), forget/DOMAIN/psnr (...) or train/loss"
        )
    if problems:
        raise ValueError(f"{path} is not a valid W&B sweep: " + "; ".join(problems))
    _check_nulls(path, config.get("parameters", {}))
    return Sweep(path, config, _fit_args(path, config.get("command")))


def _has_none(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_none(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_none(v) for v in value)
    return value is None


def _check_nulls(path: Path, parameters: dict[str, Any], prefix: str = "") -> None:
    """The W&B agent writes a YAML null as ``--key=None``, which ``fit`` reads as the string "None" (or
    refuses); the string "null" reaches it as ``--key=null``, a real null."""
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            continue
        if "parameters" in spec:
            _check_nulls(path, spec["parameters"], f"{prefix}{name}.")
        values = [spec["value"]] if "value" in spec else spec.get("values", [])
        if not prefix and any(v is None for v in values):
            raise ValueError(
                f"{path}: parameter {prefix}{name} lists null, which the W&B agent passes as the string "
                '"None"; write it as the string "null" (e.g. values: ["null", ...]) so fit reads null'
            )
        if any(_has_none(v) for v in values):
            raise ValueError(
                f"{path}: a value of parameter {prefix}{name} holds a null, which the W&B agent passes as "
                "the string None; leave that key out (its default applies) or give it a value"
            )


def _fit_args(path: Path, command: Any) -> list[str]:
    """The arguments after ``sr3_lightning fit`` in the command, without the ``${args}`` macro."""
    hint = (
        "use e.g. [${env}, sh, -c, 'exec \"$@\" --trainer.default_root_dir=runs/NAME/$WANDB_RUN_ID', sh, "
        "python, -m, sr3_lightning, fit, --config, configs/finetune_anime.yaml, ${args}]"
    )
    if not isinstance(command, list) or not all(isinstance(c, str | int | float) for c in command):
        raise ValueError(f"{path}: `command` must be a list of strings; {hint}")
    command = [str(c) for c in command]
    starts = [i for i in range(len(command) - 1) if command[i : i + 2] == ["sr3_lightning", "fit"]]
    if not starts:
        raise ValueError(f"{path}: the command does not run `sr3_lightning fit`; {hint}")
    rest = command[starts[0] + 2 :]
    if "${args}" not in rest:
        raise ValueError(
            f"{path}: the command must end its fit arguments with ${{args}} (--key=value flags); {hint}"
        )
    if not any(RUN_DIR_VARIABLE in c for c in command):
        raise ValueError(
            f"{path}: the command gives every run the same directory; put each run in its own with "
            f"--trainer.default_root_dir=.../{RUN_DIR_VARIABLE} inside a shell; {hint}"
        )
    return [c for c in rest if c != "${args}"]


def expand_envvars(args: list[str]) -> list[str]:
    """Replace W&B's ``${envvar:NAME}`` macros, as the agent does, but fail on unset variables."""
    missing = sorted({m for a in args for m in ENVVAR.findall(a) if m not in os.environ})
    if missing:
        raise ValueError(f"the sweep command uses ${{envvar:{missing[0]}}} but {missing[0]} is not set")
    return [ENVVAR.sub(lambda m: os.environ[m.group(1)], a) for a in args]


def parameter_flags(params: dict[str, Any]) -> list[str]:
    """``--key=value`` flags for one run's parameters, built by the W&B agent's own function."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args"]


def _candidates(spec: dict[str, Any]) -> list[Any]:
    """Values a parameter can take that are worth checking: all listed values, or the range's ends."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if "parameters" in spec:  # nested: the agent passes a dict
        nested = {k: _candidates(v) for k, v in spec["parameters"].items()}
        n = max(len(v) for v in nested.values())
        return [{k: v[i % len(v)] for k, v in nested.items()} for i in range(n)]
    if "min" in spec and "max" in spec:
        return [spec["min"], spec["max"]]
    return []


class _ParserBuilt(Exception):
    def __init__(self, parser: Any) -> None:
        super().__init__()
        self.parser = parser


@functools.cache
def fit_parser() -> Any:
    """The real ``python -m sr3_lightning`` parser (SR3CLI), built once without instantiating anything."""
    from sr3_lightning.cli import SR3CLI

    class ParserOnly(SR3CLI):
        def parse_arguments(self, parser: Any, args: Any) -> None:
            raise _ParserBuilt(parser)

    try:
        ParserOnly(args=[])
    except _ParserBuilt as built:
        return built.parser
    raise RuntimeError("SR3CLI did not reach parse_arguments")


def _parse(args: list[str]) -> Any:
    """The whole parsed namespace of ``fit ARGS`` (subcommand included, as instantiation needs it)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return fit_parser().parse_args(["fit", *args])
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        start = next((i for i, line in enumerate(lines) if line.startswith("error:")), len(lines) - 1)
        raise ValueError(" ".join(line.strip() for line in lines[start:]).removeprefix("error: ")) from None


def check_values(cfg: Any) -> None:
    """Run the value checks of the model, the data module and the callbacks by constructing them as ``fit``
    does, on the meta device: no weights are allocated or initialised, no file is read (``init_from`` is
    left out; it and the shards are read when the run starts). Re-raises what a constructor rejects, and
    what ``fit`` itself refuses at start: top-level optimizer settings, unknown original domains."""
    import torch

    from sr3_lightning.callbacks import DomainEval

    for name in ("optimizer", "lr_scheduler"):
        if cfg.fit.get(name) is not None:
            raise ValueError(f"--{name} is not used by sr3-lightning: set model.{name} instead")
    cfg = cfg.clone()
    cfg.fit.model.init_from = None
    parser = fit_parser()
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init = instantiate(cfg)
    for callback in init.fit.trainer.get("callbacks") or []:
        if isinstance(callback, DomainEval):
            callback.check_domains(init.fit.data.val_domain_names)


def _input_problem(kind: str, *key: Any) -> str | None:
    """Why a run could not open this input (a checkpoint's name, or a domain's shard index), if it cannot."""
    from sr3_lightning.data.datamodule import check_num_images
    from sr3_lightning.data.shards import load_index
    from sr3_lightning.init_weights import resolve_reference_pair
    from sr3_lightning.metrics import check_lpips_weights

    try:
        if kind == "lpips":
            check_lpips_weights()
        elif kind == "init_from" and Path(key[0]).suffix == ".ckpt":
            return _checkpoint_problem(Path(key[0]), dict(key[1]))
        elif kind == "init_from":
            resolve_reference_pair(key[0])
        elif kind == "limit":
            _limit_problem(*key)
        elif kind == "val_shards":
            check_num_images(key[1], key[4], load_index(*key[:4]))
        else:
            load_index(*key)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return None


def _checkpoint_problem(path: Path, unet: dict[str, Any]) -> str | None:
    """One of our checkpoints as init_from: present, and trained with the run's model.unet (read from its
    hyper-parameters; the weights stay on disk, memory-mapped)."""
    import torch

    from sr3_lightning.init_weights import unet_differences

    if not path.is_file():
        return f"init_from={path}: the checkpoint does not exist"
    try:
        hparams = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters")
    except Exception as err:  # torch raises several types for truncated or foreign files
        return f"init_from={path} could not be read ({type(err).__name__}); copy it again"
    trained = (hparams or {}).get("unet")
    differ = unet_differences(trained, unet) if isinstance(trained, dict) else ""
    return (
        f"init_from={path} was trained with model.unet {differ}; set model.unet to match" if differ else None
    )


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _limit_problem(train: tuple, val: tuple, lr_size: int, hr_size: int, limit: int) -> None:
    """The data module's own limit check, from the index files (held out: val images of the same index)."""
    from sr3_lightning.data.datamodule import check_limit
    from sr3_lightning.data.shards import find_index, load_index

    try:
        index = load_index(*train, lr_size, hr_size)
        held_out = sum(
            n for shards, dom, n in val if find_index(shards, dom).resolve() == index.path.resolve()
        )
    except (ValueError, FileNotFoundError):
        return  # the shards' own entry names it
    check_limit(train[1], limit, index, held_out)


def _needs_lpips_weights(callback: Any) -> bool:
    """A DomainEval config with LPIPS on its pretrained AlexNet (the callback's defaults)."""
    if not str(getattr(callback, "class_path", "")).endswith("DomainEval"):
        return False
    args = callback.get("init_args") or {}
    return args.get("lpips", True) and args.get("lpips_backbone", "pretrained") == "pretrained"


def input_problems(fit: Any, seen: dict[tuple, str | None]) -> list[str]:
    """What keeps one run from opening its ``init_from``, its train and val shards (index files only:
    a sweep over many runs names each missing or mismatched input once, without decoding any image) and
    the LPIPS weights its DomainEval needs."""
    data = fit.data
    unet = tuple(sorted((k, _hashable(v)) for k, v in dict(vars(fit.model.unet)).items()))
    inputs = [("init_from", fit.model.init_from, unet)] if fit.model.init_from else []
    if any(_needs_lpips_weights(c) for c in fit.trainer.callbacks or []):
        inputs.append(("lpips",))
    if data.train is not None:
        inputs.append(("shards", data.train.shards, data.train.domain, data.lr_size, data.hr_size))
    for v in data.val or []:
        inputs.append(("val_shards", v.shards, v.domain, data.lr_size, data.hr_size, v.num_images))
    if data.train is not None and data.train.limit is not None:
        val = tuple(
            (v.shards, v.domain, v.num_images) for v in data.val or [] if v.domain == data.train.domain
        )
        train = (data.train.shards, data.train.domain)
        inputs.append(("limit", train, val, data.lr_size, data.hr_size, data.train.limit))
    for key in inputs:
        if key not in seen:
            seen[key] = _input_problem(*key)
    return list(dict.fromkeys(seen[key] for key in inputs if seen[key]))  # train and val may share shards


def combinations(sweep: Sweep) -> list[dict[str, Any]]:
    """The parameter sets to check: every run of a grid sweep (as the W&B engine proposes them, so
    pairs like t_min 80 with t_max 50 are seen); for random and bayes sweeps, whose runs are drawn later,
    each parameter's listed values or range ends, combined row by row (their product can be huge)."""
    if sweep.method == "grid":
        engine, runs = sweep_engine(), []
        while (run := engine.next_run(sweep.config, runs)) is not None:
            runs.append(run)
        return [{k: v["value"] for k, v in r.config.items()} for r in runs]
    candidates = {name: _candidates(spec) for name, spec in sweep.config["parameters"].items()}
    candidates = {name: values for name, values in candidates.items() if values}
    rows = max((len(v) for v in candidates.values()), default=0)
    return [{name: values[i % len(values)] for name, values in candidates.items()} for i in range(rows)]


def _run_problems(args: list[str], seen: dict[tuple, str | None] | None) -> tuple[Any, list[str]]:
    """One run's parsed config and why it would fail at its start: the first error of the parser or a
    constructor, else (with `seen`, the inputs looked up so far) its missing or mismatched inputs."""
    try:
        cfg = _parse(args)
        check_values(cfg)
    except Exception as err:  # any error of a constructor is a run that would fail at its start
        return None, [str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"]
    return cfg, input_problems(cfg.fit, seen) if seen is not None else []


def check_parameters(sweep: Sweep, inputs: bool = True) -> Any:
    """Parse the sweep's fit command with every parameter combination and run the model's, data module's
    and callbacks' own value checks on it, before any run; with `inputs`, also look up the checkpoint and
    shards each run reads first. ValueError lists every rejected combination.

    Returns the resolved fit config of the first combination (a jsonargparse Namespace).
    """
    base = expand_envvars(sweep.fit_args)
    combos = combinations(sweep) or [{}]
    rejected: dict[str, list[str]] = {}  # error -> the combinations' flags
    first, seen = None, {}
    for params in combos:
        flags = parameter_flags(params)
        cfg, problems = _run_problems([*base, *flags], seen if inputs else None)
        for message in problems:
            rejected.setdefault(message, []).append(" ".join(flags) or "(no parameters)")
        if not problems and first is None:
            first = cfg.fit
    if rejected:
        n = len({run for runs in rejected.values() for run in runs})
        listed = "; ".join(
            f"[{'every run' if len(runs) == len(combos) > 1 else ' | '.join(runs)}]: {message}"
            for message, runs in rejected.items()
        )
        raise ValueError(
            f"{sweep.path}: `fit` rejects {n} of {len(combos)} parameter combination(s) of the sweep, "
            f"so those runs would fail: {listed}. Fix these values or inputs (`parameters` or the command)."
        )
    _check_metric_domain(sweep, first)
    return first


def _check_metric_domain(sweep: Sweep, fit: Any) -> None:
    """The domain of the metric a sweep optimises is one its runs evaluate (a typo leaves it blind)."""
    metric = sweep.config.get("metric")
    parts = str(metric.get("name", "")).split("/") if isinstance(metric, dict) else []
    domains = [v.domain for v in fit.data.val or []] if fit is not None else []
    if len(parts) == 3 and domains and parts[1] not in domains:
        raise ValueError(
            f"{sweep.path}: metric {metric['name']!r} names domain {parts[1]!r}, but the runs evaluate "
            f"{', '.join(domains)}; name one of these"
        )
