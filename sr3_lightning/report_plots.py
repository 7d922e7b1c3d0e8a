"""The report's plots: every metric against fine-tuning steps, one line per recipe.

Replicates (the same recipe with other seeds, `replicates.py`) are drawn as one line, their mean, with a
band of one standard deviation: the spread a reader needs to judge a difference between two lines.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from sr3_lightning.replicates import group_labels, replicate_groups
from sr3_lightning.runs import METRICS, NAMES, Run

COLOURS = (  # matplotlib's 10, then 10 more distinct ones
    *(f"C{i}" for i in range(10)),
    *(
        "#393b79",
        "#637939",
        "#8c6d31",
        "#843c39",
        "#7b4173",
        "#3182bd",
        "#e6550d",
        "#31a354",
        "#756bb1",
        "#636363",
    ),
)
LINE_STYLES = ("-", "-.", ":")


def trajectory(group: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and standard deviation (0 with one run) of ``key`` over the group's runs that logged it
    at each step."""
    steps = sorted({s for r in group for s, e in r.evals.items() if key in e})
    values = [[r.evals[s][key] for r in group if key in r.evals.get(s, {})] for s in steps]
    sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return steps, [statistics.fmean(v) for v in values], sd


def _line_label(group: list[Run], name: str) -> str:
    """The legend entry: the group's name, what kind of model, and how many seeds its mean holds."""
    kind = " (regression)" if group[0].settings["objective"] == "regression" else ""
    return f"{name}{kind}, mean ± sd of {len(group)} seeds" if len(group) > 1 else f"{name}{kind}"


def _draw(ax: Any, groups: list[list[Run]], names: list[str], key: str) -> None:
    """One line per group (past 20 groups, new dashes), with its ± sd band when it holds replicates."""
    for i, (group, name) in enumerate(zip(groups, names)):
        steps, mean, sd = trajectory(group, key)
        if not steps:
            continue
        colour, style = COLOURS[i % len(COLOURS)], LINE_STYLES[i // len(COLOURS) % len(LINE_STYLES)]
        ax.plot(steps, mean, style, marker="o", markersize=3, label=_line_label(group, name), color=colour)
        if len(group) > 1:
            low, high = [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)]
            ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)


def _figure(
    runs: list[Run], groups: list[list[Run]], names: list[str], kind: str, domain: str, path: Path
) -> bool:
    """One figure: a panel per metric logged for the domain (``kind`` metrics or forgetting deltas)."""
    import matplotlib.pyplot as plt

    prefix = "val" if kind == "metrics" else "forget"
    metrics = [
        m for m in METRICS if any(f"{prefix}/{domain}/{m}" in e for r in runs for e in r.evals.values())
    ]
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        _draw(ax, groups, names, f"{prefix}/{domain}/{metric}")
        bicubic_key = f"val/{domain}/bicubic_{metric}"
        bicubic = [e[bicubic_key] for r in runs for e in r.evals.values() if bicubic_key in e]
        if kind == "metrics" and bicubic:
            ax.axhline(bicubic[0], color="gray", linestyle="--", linewidth=1, label="bicubic")
        if kind == "forgetting":
            ax.axhline(0.0, color="gray", linewidth=0.8)
        ax.set_xlabel("fine-tuning steps")
        ax.set_title(f"{domain} {'Δ' if kind == 'forgetting' else ''}{NAMES[metric]}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_metrics(runs: list[Run], out: Path) -> list[Path]:
    """Per domain: each metric against steps, one line per recipe (bicubic dashed); per original domain:
    the forget/* deltas against steps. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    groups = replicate_groups(runs, by_length=True)
    names = group_labels(groups)
    domains = list(dict.fromkeys(d for r in runs for d in r.domains))
    originals = list(dict.fromkeys(d for r in runs for d in r.original_domains))
    paths = []
    for kind, names in (("metrics", domains), ("forgetting", originals)):
        for domain in names:
            path = out / f"{kind}_{domain}.png"
            if _figure(runs, groups, names, kind, domain, path):
                paths.append(path)
    return paths
