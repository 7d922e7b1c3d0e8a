"""Which finished runs are replicates of one another: the same recipe, other seeds.

A run's recipe is its resolved config without what does not change the model it trains: the seeds (which
tell replicates apart), where and how often it logs, checkpoints and evaluates, how long it runs (a longer
run shares the shorter one's trajectory) and the speed knobs. Runs with the same recipe and seeds share
their trajectory, so one of them stands for all; runs whose recipes differ anywhere, also in a setting the
report's labels do not show (init_optimizer, the UNet, an lr scheduler, the val images, ...), are never
averaged together.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Dotted config keys (and everything under them) that are not part of a recipe.
NOT_RECIPE = frozenset(
    {
        *("seed_everything", "tracking", "ckpt_path", "fresh", "optimizer", "lr_scheduler"),
        *(f"trainer.{k}" for k in ("default_root_dir", "max_steps", "max_time", "callbacks", "logger")),
        *(f"trainer.{k}" for k in ("enable_progress_bar", "enable_checkpointing", "enable_model_summary")),
        *(f"trainer.{k}" for k in ("log_every_n_steps", "val_check_interval", "check_val_every_n_epoch")),
        *(f"trainer.{k}" for k in ("limit_val_batches", "num_sanity_val_steps", "benchmark", "accelerator")),
        *(f"trainer.{k}" for k in ("profiler", "plugins")),
        *(f"model.{k}" for k in ("seed", "channels_last", "compile", "compile_mode", "fused_attention")),
        *(f"model.{k}" for k in ("fused_adam", "progress_bar_loss", "nonfinite_patience")),
        *("data.seed", "data.num_workers", "data.train.subset_seed"),
    }
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def recipe_of(config: dict[str, Any], evaluation: str | None) -> dict[str, str]:
    """A run's recipe, flattened (``model.unet.dropout`` -> its value as JSON), with the sampler its
    evaluations used (the DomainEval callback itself is bookkeeping)."""
    flat = _flatten(config)
    kept = {
        k: json.dumps(v, sort_keys=True, default=str)
        for k, v in flat.items()
        if not any(k == n or k.startswith(f"{n}.") for n in NOT_RECIPE)
    }
    return kept | {"evaluation": json.dumps(evaluation)}


def seeds_of(config: dict[str, Any]) -> tuple:
    """What tells replicates apart: ``model.seed`` (t, noise, dropout), ``data.seed`` (pass order, flips),
    ``data.train.subset_seed`` (which images) and, for a run trained from scratch, ``seed_everything`` (its
    initial weights; with ``init_from`` it changes nothing). A run from scratch without a fixed
    ``seed_everything`` has weights of its own: ``None`` stands for "unlike any other"."""
    model, data = config.get("model") or {}, config.get("data") or {}
    seeds: tuple = (model.get("seed", 0), data.get("seed", 0), (data.get("train") or {}).get("subset_seed"))
    if model.get("init_from"):
        return seeds
    everything = config.get("seed_everything")
    return (*seeds, None if everything is None or isinstance(everything, bool) else everything)


def recipe_differences(a: dict[str, str], b: dict[str, str]) -> list[str]:
    """``key: a-value / b-value`` for each recipe key the two runs set differently."""
    return [
        f"{k}: {a.get(k, '(unset)')} / {b.get(k, '(unset)')}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def recipe_groups(runs: list, by_length: bool = False) -> list[list]:
    """``runs`` grouped by recipe (and with ``by_length`` by ``max_steps`` too, so a plotted line or a
    listed run keeps its own steps), in order."""
    groups: dict[str, list] = {}
    for run in runs:
        key = json.dumps(run.recipe, sort_keys=True) + (f"|{run.settings['max_steps']}" if by_length else "")
        groups.setdefault(key, []).append(run)
    return list(groups.values())


def one_per_seeds(runs: list) -> list:
    """The first of the runs with the same seeds (they share a trajectory); an unseeded run from scratch is
    a replicate of its own."""
    kept: dict[Any, Any] = {}
    for run in runs:
        kept.setdefault(run.seeds if None not in run.seeds[3:] else (run.source,), run)
    return list(kept.values())


def replicate_groups(runs: list, by_length: bool = False) -> list[list]:
    """Each recipe's replicates, one run per set of seeds (`recipe_groups`, `one_per_seeds`)."""
    return [one_per_seeds(group) for group in recipe_groups(runs, by_length)]


def group_labels(groups: list[list]) -> list[str]:
    """Each group's name: its runs' shared settings (`runs._label`), and where two groups would read alike,
    its first run's directory."""
    labels = [g[0].setting_label or g[0].label for g in groups]
    return [
        label if labels.count(label) == 1 else f"{label} ({Path(g[0].source).parent.name}/{g[0].name})"
        for label, g in zip(labels, groups)
    ]
