"""The report's plots: every metric against fine-tuning steps, one line per setting.

Replicates of a setting (runs that differ only in their seeds, `runs.replicate_of`) are drawn as one line,
their mean, with a band of one standard deviation: the spread a reader needs to judge a difference between
two lines.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from sr3_lightning.runs import METRICS, NAMES, REPLICATE_KNOBS, Run, replicate_of

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


def replicate_groups(runs: list[Run]) -> list[list[Run]]:
    """The runs grouped by every setting but their seeds, in order; a run whose seeds repeat another's in
    its group (the same grid point in two sweep directories) is left out, so no trajectory counts twice."""
    groups: dict[tuple, dict[tuple, Run]] = {}
    for run in runs:
        setting = tuple(str(v) for k, v in sorted(run.settings.items()) if k not in REPLICATE_KNOBS)
        groups.setdefault(setting, {}).setdefault(replicate_of(run), run)
    return [list(members.values()) for members in groups.values()]


def _line_label(group: list[Run]) -> str:
    first = group[0]
    suffix = " (regression)" if first.settings["objective"] == "regression" else ""
    if len(group) == 1:
        return first.label + suffix
    return f"{first.setting_label or 'all runs'}{suffix}, mean ± sd of {len(group)} seeds"


def trajectory(group: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and standard deviation of ``key`` at the steps every run of the group evaluated."""
    steps = sorted(set.intersection(*({s for s, e in r.evals.items() if key in e} for r in group)))
    values = [[r.evals[s][key] for r in group] for s in steps]
    sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return steps, [statistics.fmean(v) for v in values], sd


def plot_metrics(runs: list[Run], out: Path) -> list[Path]:
    """Per domain: each metric against steps, one line per setting (bicubic dashed); per original domain:
    the forget/* deltas against steps. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups = replicate_groups(runs)
    domains = list(dict.fromkeys(d for r in runs for d in r.domains))
    originals = list(dict.fromkeys(d for r in runs for d in r.original_domains))
    for kind, prefix, names in (("metrics", "val", domains), ("forgetting", "forget", originals)):
        for domain in names:
            metrics = [
                m
                for m in METRICS
                if any(f"{prefix}/{domain}/{m}" in e for r in runs for e in r.evals.values())
            ]
            if not metrics:
                continue
            fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
            for ax, metric in zip(axes[0], metrics):
                key = f"{prefix}/{domain}/{metric}"
                for i, group in enumerate(groups):
                    steps, mean, sd = trajectory(group, key)
                    if not steps:
                        continue
                    colour = COLOURS[i % len(COLOURS)]
                    style = LINE_STYLES[i // len(COLOURS) % len(LINE_STYLES)]  # past 20 lines, new dashes
                    ax.plot(
                        steps, mean, style, marker="o", markersize=3, label=_line_label(group), color=colour
                    )
                    if len(group) > 1:
                        low = [m - s for m, s in zip(mean, sd)]
                        high = [m + s for m, s in zip(mean, sd)]
                        ax.fill_between(steps, low, high, color=colour, alpha=0.2, linewidth=0)
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
            paths.append(out / f"{kind}_{domain}.png")
            fig.savefig(paths[-1], dpi=100)
            plt.close(fig)
    return paths
