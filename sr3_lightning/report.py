"""The study's report: Tables 1-4 and every metric plotted against steps, from finished runs (`runs.py`).

A table row is a setting read at a step: it comes from whichever run has that setting and evaluated that
step, so one trajectory serves every step of it (Table 1), and runs of different sweeps fill each other's
rows (e.g. 128 images = L1 at 2000).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sr3_lightning.runs import FIXED_KNOBS, SETTING_NAMES, Run, has_setting

log = logging.getLogger(__name__)

METRICS = ("psnr", "ssim", "lpips", "lpips_random")  # table columns per domain, when logged
NAMES = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "lpips_random": "LPIPS (untrained net)"}
DIGITS = {"psnr": 2, "ssim": 4, "lpips": 4, "lpips_random": 4}  # the study's precision

# The study: the fine-tuning setup of configs/finetune_anime.yaml and what each table varies.
BASE = {"objective": "diffusion", "loss": "l1", "limit": 128, "t_min": 1, "t_max": 2000}
STEPS = {"l1": (400, 1200, 1600, 2000, 4000, 12000), "l2": (400, 2000, 6000, 8000, 12000, 18000)}
DATA_SIZES = (8, 16, 32, 64, 128)
T_RANGES = ((1, 2000), (1, 100), (1, 500), (1, 1000), (1000, 2000), (1500, 2000), (1900, 2000))
FORGET_STEPS = (2000, 4000, 12000)
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


@dataclass
class Row:
    label: str
    run: Run | None
    step: int | None
    keys: dict[str, str]  # column id -> logged key
    values: dict[str, float] = field(default_factory=dict)  # column id -> value


@dataclass
class Table:
    title: str
    columns: list[tuple[str, str, int]]  # (column id, header, digits)
    rows: list[Row]
    missing: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- tables
Found = list[tuple[str, Run | None, int]]  # (row label, the run that has it or None, step)


def _find(runs: list[Run], wanted: list[tuple[str, dict, int]], used: set[int]) -> Found:
    found = []
    for label, match, step in wanted:
        run = next(
            (r for r in runs if step in r.evals and all(r.settings.get(k) == v for k, v in match.items())),
            None,
        )
        if run is not None:
            used.add(id(run))
        found.append((label, run, step))
    return found


def _pick(values: dict[str, float], keys: dict[str, str]) -> dict[str, float]:
    return {c: values[k] for c, k in keys.items() if k in values}


def _metric_row(
    label: str, run: Run, step: int, columns: list[tuple[str, str, int]], prefix: str = ""
) -> Row:
    keys = {col: f"val/{col.split('/')[0]}/{prefix}{col.split('/')[1]}" for col, _, _ in columns}
    return Row(label, run, step, keys, _pick(run.evals[step], keys))


def _domain_table(title: str, found: Found, runs: list[Run]) -> Table:
    """Rows = settings read at their step, after bicubic and step 0 (before fine-tuning); then regression."""
    present = [(label, run, step) for label, run, step in found if run is not None]
    if not present:
        return Table(title, [], [])
    first = present[0][1]
    columns = [
        (f"{d}/{m}", f"{d} {NAMES[m]}", DIGITS[m])
        for d in first.domains
        for m in METRICS
        if any(f"val/{d}/{m}" in e for e in first.evals.values())
    ]
    rows = [_metric_row("Bicubic", first, min(first.evals), columns, prefix="bicubic_")]
    if 0 in first.evals:
        rows.append(_metric_row("Step 0 (before fine-tuning)", first, 0, columns))
    rows += [_metric_row(label, run, step, columns) for label, run, step in present]
    for run in runs:
        if run.settings["objective"] == "regression":
            step = max(run.evals)
            rows.append(_metric_row(f"Regression ({run.label}, {_steps(step)})", run, step, columns))
    return Table(title, columns, rows, [label for label, run, _ in found if run is None])


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _forgetting_table(runs: list[Run], used: set[int]) -> Table:
    """Table 4: each original domain at step 0 and after the listed steps, with the change since step 0."""
    title = "Table 4: forgetting on the original domains (L1, 128 images)"
    found = _find(runs, [(f"after {s} steps", BASE, s) for s in FORGET_STEPS], used)
    present = [(step, run) for _, run, step in found if run is not None and run.original_domains]
    if not present:
        return Table(title, [], [])
    last_step, last = present[-1]
    metrics = [m for m in METRICS if any(k.endswith(f"/{m}") for k in last.evals[last_step])]
    columns = [(m, NAMES[m], DIGITS[m]) for m in metrics]
    columns += [(f"d_{m}", f"Δ{NAMES[m]}", DIGITS[m]) for m in metrics]
    rows = []
    for domain in last.original_domains:
        first = present[0][1]
        bicubic = {m: f"val/{domain}/bicubic_{m}" for m in metrics}
        rows.append(
            Row(f"{domain}: bicubic", last, last_step, bicubic, _pick(last.evals[last_step], bicubic))
        )
        if 0 in first.evals:
            keys = {m: f"val/{domain}/{m}" for m in metrics}
            rows.append(Row(f"{domain}: step 0", first, 0, keys, _pick(first.evals[0], keys)))
        for step, run in present:
            keys = {m: f"val/{domain}/{m}" for m in metrics} | {
                f"d_{m}": f"forget/{domain}/{m}" for m in metrics
            }
            rows.append(Row(f"{domain}: after {_steps(step)}", run, step, keys, _pick(run.evals[step], keys)))
    return Table(title, columns, rows, [label for label, run, _ in found if run is None])


def study_setup(runs: list[Run]) -> dict[str, str]:
    """The study's fixed knobs: each one's most common value among the diffusion runs (ties: first run)."""
    voters = [r for r in runs if r.settings["objective"] == "diffusion"] or runs
    return {k: Counter(str(r.settings[k]) for r in voters).most_common(1)[0][0] for k in FIXED_KNOBS}


def study_runs(runs: list[Run], setup: dict[str, str]) -> list[Run]:
    """The runs that share the study's fixed knobs: only they fill Tables 1-4, so a run with another
    learning rate or starting point cannot stand in for a study row."""
    inside = []
    for r in runs:
        differ = [
            f"{SETTING_NAMES[k]}={r.settings[k]} (study: {setup[k]})"
            for k in FIXED_KNOBS
            if str(r.settings[k]) != setup[k] and has_setting(r, k)
        ]
        if differ:
            log.warning(
                "%s differs from the study's setup in %s: listed under Other runs",
                r.source,
                ", ".join(differ),
            )
        else:
            inside.append(r)
    return inside


def build_tables(runs: list[Run]) -> list[Table]:
    """Tables 1-4 of the study (the rows found in the runs), then every other run at its listed steps."""
    used: set[int] = set()
    runs = sorted(runs, key=lambda r: r.source)
    if not runs:
        return []
    study = study_runs(runs, study_setup(runs))
    t1 = [
        (f"{loss.upper()}, {s} steps", BASE | {"loss": loss}, s)
        for loss, steps in STEPS.items()
        for s in steps
    ]
    t2 = [(f"{n} images", BASE | {"limit": n}, 2000) for n in DATA_SIZES]
    t3 = [(f"t in [{a}, {b}]", BASE | {"t_min": a, "t_max": b}, 2000) for a, b in T_RANGES]
    tables = [
        _domain_table(
            "Table 1: fine-tuning steps and loss (128 images, t in [1, 2000])", _find(study, t1, used), study
        ),
        _domain_table("Table 2: training images (L1, 2000 steps)", _find(study, t2, used), study),
        _domain_table("Table 3: timestep range (L1, 128 images, 2000 steps)", _find(study, t3, used), study),
        _forgetting_table(study, used),
    ]
    in_study = {id(r) for r in study}
    others = [
        r
        for r in runs
        if id(r) not in used and (r.settings["objective"] != "regression" or id(r) not in in_study)
    ]
    found = [
        (f"{r.label}, {_steps(s)}", r if s in r.evals else None, s)
        for r in others
        for s in r.listed_steps or sorted(r.evals)[1:]
    ]
    regression_shown = any(t.rows for t in tables[:3])  # else the study's regression rows go here
    tables.append(
        _domain_table("Other runs, each at its listed steps", found, [] if regression_shown else study)
    )
    return [t for t in tables if t.rows]


# ------------------------------------------------------------------------------------------------- output
def _fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def table_markdown(table: Table) -> str:
    head = "| Setting | " + " | ".join(h for _, h, _ in table.columns) + " |"
    rule = "|---|" + "---:|" * len(table.columns)
    body = [
        f"| {row.label} | "
        + " | ".join(_fmt(row.values.get(c), d, signed=c.startswith("d_")) for c, _, d in table.columns)
        + " |"
        for row in table.rows
    ]
    text = "\n".join([f"### {table.title}", "", head, rule, *body])
    if table.missing:
        text += "\n\nNot in these runs: " + ", ".join(table.missing) + "."
    return text


def write_csv(tables: list[Table], path: Path) -> None:
    """Every number of the tables, unrounded, with the run, step and logged key it was read from."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["table", "row", "run", "step", "key", "value"])
        for table in tables:
            for row in table.rows:
                for col, _, _ in table.columns:
                    if col in row.values:
                        source = row.run.source if row.run else ""
                        writer.writerow(
                            [table.title, row.label, source, row.step, row.keys[col], row.values[col]]
                        )


def plot_metrics(runs: list[Run], out: Path) -> list[Path]:
    """Per domain: each metric against steps, one line per run (bicubic dashed); per original domain: the
    forget/* deltas against steps. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
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
                for i, run in enumerate(runs):
                    points = [(s, e[key]) for s, e in sorted(run.evals.items()) if key in e]
                    if points:
                        regression = run.settings["objective"] == "regression"
                        label = f"{run.label} (regression)" if regression else run.label
                        style = LINE_STYLES[i // len(COLOURS) % len(LINE_STYLES)]  # past 20 runs, new dashes
                        ax.plot(
                            *zip(*points),
                            marker="o",
                            markersize=3,
                            label=label,
                            color=COLOURS[i % len(COLOURS)],
                            linestyle=style,
                        )
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


def write_report(runs: list[Run], out: Path, skipped: list[str] | None = None) -> Path:
    """``report.md`` (tables, plots, cost), ``report.csv`` and the PNG plots in ``out``; returns report.md.

    ``skipped``: the runs left out (no evaluation metrics, failed, not finished), one line each with why.
    """
    out.mkdir(parents=True, exist_ok=True)
    tables = build_tables(runs)
    write_csv(tables, out / "report.csv")
    plots = plot_metrics(runs, out)
    lines = ["# SR3 fine-tuning study", "", f"{len(runs)} finished run(s):", ""]
    lines += [
        f"- `{r.label}`{' (regression)' if r.settings['objective'] == 'regression' else ''}: {r.source}"
        for r in sorted(runs, key=lambda r: r.source)
    ]
    if runs:
        setup = ", ".join(f"{SETTING_NAMES[k]}={v}" for k, v in study_setup(runs).items())
        lines += ["", f"Study setup (the table rows' fixed settings): {setup}."]
    if skipped:
        lines += ["", f"Left out {len(skipped)} run(s):", ""]
        lines += [f"- {line}" for line in skipped]
    lines += [
        "",
        "PSNR/SSIM on uint8 as the reference computes them; LPIPS lower is better. Δ = change since",
    ]
    lines += ["step 0 (negative PSNR/SSIM, positive LPIPS = forgetting). Every number: `report.csv`.", ""]
    lines += [table_markdown(t) + "\n" for t in tables]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    timed = [r for r in runs if r.seconds]
    if timed:
        hours = sum(r.seconds for r in timed) / 3600
        lines += [
            "",
            "## Cost",
            "",
            f"{len(timed)} timed run(s), one device each: {hours:.2f} device-hours.",
            "",
        ]
        lines += ["| Run | steps | hours | s/step (with evaluations) |", "|---|---:|---:|---:|"]
        for r in timed:
            steps = r.settings["max_steps"] or 0
            per_step = f"{r.seconds / steps:.3f}" if steps else "–"
            name = r.label + (" (regression)" if r.settings["objective"] == "regression" else "")
            lines.append(f"| {name} | {steps} | {r.seconds / 3600:.2f} | {per_step} |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
