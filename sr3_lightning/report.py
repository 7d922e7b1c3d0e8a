"""The study's report: Tables 1-4 and every metric plotted against steps, from finished runs (`runs.py`).

A table row is a setting read at a step: it comes from the runs that have that setting and evaluated that
step, so one trajectory serves every step of it (Table 1), and runs of different sweeps fill each other's
rows (e.g. 128 images = L1 at 2000). Replicates (the same recipe with other seeds, `replicates.py`) are
averaged: the row shows mean ± sample standard deviation and how many seeds it holds. A run with the row's
settings but another recipe (say another init_optimizer) is not averaged in: it is named in a warning and
listed under Other runs.
"""

from __future__ import annotations

import csv
import logging
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sr3_lightning.replicates import (
    group_labels,
    one_per_seeds,
    recipe_differences,
    recipe_groups,
    replicate_groups,
)
from sr3_lightning.report_plots import plot_metrics
from sr3_lightning.runs import FIXED_KNOBS, METRICS, NAMES, SETTING_NAMES, Run, has_setting

log = logging.getLogger(__name__)

DIGITS = {"psnr": 2, "ssim": 4, "lpips": 4, "lpips_random": 4}  # the study's precision

# The study: the fine-tuning setup of configs/finetune_anime.yaml and what each table varies.
BASE = {"objective": "diffusion", "loss": "l1", "limit": 128, "t_min": 1, "t_max": 2000}
STEPS = {"l1": (400, 1200, 1600, 2000, 4000, 12000), "l2": (400, 2000, 6000, 8000, 12000, 18000)}
DATA_SIZES = (8, 16, 32, 64, 128)
T_RANGES = ((1, 2000), (1, 100), (1, 500), (1, 1000), (1000, 2000), (1500, 2000), (1900, 2000))
FORGET_STEPS = (2000, 4000, 12000)


@dataclass
class Row:
    """A setting at a step, read from one run or averaged over its replicates (`runs`)."""

    label: str
    runs: list[Run]
    step: int | None
    keys: dict[str, str]  # column id -> logged key
    values: dict[str, float] = field(default_factory=dict)  # column id -> value (the mean of replicates)
    spread: dict[str, float] = field(default_factory=dict)  # column id -> sample sd, with 2+ replicates
    counts: dict[str, int] = field(default_factory=dict)  # column id -> how many replicates logged it

    @classmethod
    def read(cls, label: str, runs: list[Run], step: int, keys: dict[str, str]) -> Row:
        """The row's cells at ``step``: each key's mean over the runs that logged it (and sd, with 2+)."""
        row = cls(label, runs, step, keys)
        for col, key in keys.items():
            found = [r.evals[step][key] for r in runs if key in r.evals[step]]
            if found:
                row.values[col], row.counts[col] = statistics.fmean(found), len(found)
            if len(found) > 1:
                row.spread[col] = statistics.stdev(found)
        return row

    def cell(self, col: str, digits: int) -> str:
        """A cell as the markdown shows it: the value, ± sd when averaged, and n where fewer replicates than
        the row's logged it."""
        value = self.values.get(col)
        if value is None:
            return "–"
        text = f"{value:+.{digits}f}" if col.startswith("d_") else f"{value:.{digits}f}"
        if col in self.spread:
            text += f" ± {self.spread[col]:.{digits}f}"
        return text + (f" (n={self.counts[col]})" if self.counts[col] < len(self.runs) else "")


@dataclass
class Table:
    title: str
    columns: list[tuple[str, str, int]]  # (column id, header, digits)
    rows: list[Row]
    missing: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------- tables
Found = list[tuple[str, list[Run], int]]  # (row label, the runs that have it, one per replicate; step)


@dataclass
class Picks:
    """What the study tables took (run ids), and the runs passed over for another recipe (id -> why)."""

    used: set[int] = field(default_factory=set)
    passed_over: dict[int, str] = field(default_factory=dict)


def _find(runs: list[Run], wanted: list[tuple[str, dict, int]], picks: Picks) -> Found:
    """Each wanted row's runs: of the recipes with its settings, the one most seeds share (ties: first),
    one run per set of seeds that evaluated the row's step (the same seeds share a trajectory). Runs with
    the row's settings and another recipe are passed over, each named once in a warning."""
    found = []
    for label, match, step in wanted:
        groups = recipe_groups([r for r in runs if all(r.settings.get(k) == v for k, v in match.items())])
        study = max(groups, key=lambda g: len(one_per_seeds(g)), default=[])
        at_step = [r for r in study if step in r.evals]
        picks.used.update(id(r) for r in at_step)  # the twins of a replicate are shown by it
        for other in (r for g in groups if g is not study for r in g if step in r.evals):
            differ = "; ".join(recipe_differences(other.recipe, study[0].recipe))
            picks.passed_over.setdefault(
                id(other),
                f"{other.source} has the settings of row '{label}' but another recipe than the row's runs "
                f"({study[0].source}, ...), so it is not averaged into the row: {differ}",
            )
        found.append((label, one_per_seeds(at_step), step))
    return found


def _metric_row(
    label: str, runs: list[Run], step: int, columns: list[tuple[str, str, int]], prefix: str = ""
) -> Row:
    keys = {col: f"val/{col.split('/')[0]}/{prefix}{col.split('/')[1]}" for col, _, _ in columns}
    return Row.read(label, runs, step, keys)


def _domain_table(title: str, found: Found, runs: list[Run]) -> Table:
    """Rows = settings read at their step, after bicubic and step 0 (before fine-tuning); then regression."""
    present = [(label, found_runs, step) for label, found_runs, step in found if found_runs]
    if not present:
        return Table(title, [], [])
    first = present[0][1][0]
    columns = [
        (f"{d}/{m}", f"{d} {NAMES[m]}", DIGITS[m])
        for d in first.domains
        for m in METRICS
        if any(f"val/{d}/{m}" in e for e in first.evals.values())
    ]
    rows = [_metric_row("Bicubic", [first], min(first.evals), columns, prefix="bicubic_")]
    if 0 in first.evals:
        rows.append(_metric_row("Step 0 (before fine-tuning)", [first], 0, columns))
    rows += [_metric_row(label, found_runs, step, columns) for label, found_runs, step in present]
    regression = replicate_groups(
        [r for r in runs if r.settings["objective"] == "regression"], by_length=True
    )
    for group, name in zip(regression, group_labels(regression)):
        step = max(group[0].evals)
        replicates = [r for r in group if step in r.evals]
        rows.append(_metric_row(f"Regression ({name}, {_steps(step)})", replicates, step, columns))
    return Table(title, columns, rows, [label for label, found_runs, _ in found if not found_runs])


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _forgetting_table(runs: list[Run], picks: Picks) -> Table:
    """Table 4: each original domain at step 0 and after the listed steps, with the change since step 0."""
    title = "Table 4: forgetting on the original domains (L1, 128 images)"
    found = _find(runs, [(f"after {s} steps", BASE, s) for s in FORGET_STEPS], picks)
    present = [(step, [r for r in rs if r.original_domains]) for _, rs, step in found]
    present = [(step, rs) for step, rs in present if rs]
    if not present:
        return Table(title, [], [])
    last_step, last = present[-1][0], present[-1][1][0]
    metrics = [m for m in METRICS if any(k.endswith(f"/{m}") for k in last.evals[last_step])]
    columns = [(m, NAMES[m], DIGITS[m]) for m in metrics]
    columns += [(f"d_{m}", f"Δ{NAMES[m]}", DIGITS[m]) for m in metrics]
    first = present[0][1][0]
    rows = []
    for domain in last.original_domains:
        bicubic = {m: f"val/{domain}/bicubic_{m}" for m in metrics}
        rows.append(Row.read(f"{domain}: bicubic", [last], last_step, bicubic))
        keys = {m: f"val/{domain}/{m}" for m in metrics}
        if 0 in first.evals:
            rows.append(Row.read(f"{domain}: step 0", [first], 0, keys))
        deltas = {f"d_{m}": f"forget/{domain}/{m}" for m in metrics}
        rows += [Row.read(f"{domain}: after {_steps(step)}", rs, step, keys | deltas) for step, rs in present]
    return Table(title, columns, rows, [label for label, rs, _ in found if not rs])


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
    picks = Picks()
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
            "Table 1: fine-tuning steps and loss (128 images, t in [1, 2000])", _find(study, t1, picks), study
        ),
        _domain_table("Table 2: training images (L1, 2000 steps)", _find(study, t2, picks), study),
        _domain_table("Table 3: timestep range (L1, 128 images, 2000 steps)", _find(study, t3, picks), study),
        _forgetting_table(study, picks),
    ]
    for run_id, why in picks.passed_over.items():
        log.warning("%s%s", why, "" if run_id in picks.used else "; it is listed under Other runs")
    in_study = {id(r) for r in study}
    others = [
        r
        for r in runs
        if id(r) not in picks.used and (r.settings["objective"] != "regression" or id(r) not in in_study)
    ]
    regression_shown = any(t.rows for t in tables[:3])  # else the study's regression rows go here
    tables.append(
        _domain_table(
            "Other runs, each at its listed steps", _other_rows(others), [] if regression_shown else study
        )
    )
    return [t for t in tables if t.rows]


def _other_rows(runs: list[Run]) -> Found:
    """The runs no study row took, replicates averaged, each group at the steps its runs were asked for."""
    groups = replicate_groups(runs, by_length=True)
    found = []
    for group, name in zip(groups, group_labels(groups)):
        steps = sorted({s for r in group for s in r.listed_steps or sorted(r.evals)[1:]})
        found += [(f"{name}, {_steps(s)}", [r for r in group if s in r.evals], s) for s in steps]
    return found


# ------------------------------------------------------------------------------------------------- output
def row_label(row: Row) -> str:
    """A row's label as shown, with how many seeds an averaged row holds."""
    return f"{row.label} ({len(row.runs)} seeds)" if len(row.runs) > 1 else row.label


def table_markdown(table: Table) -> str:
    head = "| Setting | " + " | ".join(h for _, h, _ in table.columns) + " |"
    rule = "|---|" + "---:|" * len(table.columns)
    body = [
        f"| {row_label(row)} | " + " | ".join(row.cell(c, d) for c, _, d in table.columns) + " |"
        for row in table.rows
    ]
    text = "\n".join([f"### {table.title}", "", head, rule, *body])
    if any(row.spread for row in table.rows):
        text += "\n\nmean ± sample standard deviation over the seeds (`model.seed`, `data.seed`, "
        text += "`subset_seed`, and `seed_everything` for runs trained from scratch); (n=k): only k of them "
        text += "logged that value."
    if table.missing:
        text += "\n\nNot in these runs: " + ", ".join(table.missing) + "."
    return text


def _cell_lines(row: Row, col: str) -> list[tuple[str, float, str]]:
    """(run, value, stat) of one cell: its run's value, or each replicate's value, then their mean and sd."""
    if len(row.runs) == 1:
        return [(row.runs[0].source, row.values[col], "value")]
    key, evals = row.keys[col], [r.evals[row.step] for r in row.runs]
    lines = [(r.source, e[key], "replicate") for r, e in zip(row.runs, evals) if key in e]
    sources = "; ".join(r.source for r in row.runs)
    lines.append((sources, row.values[col], "mean"))
    if col in row.spread:
        lines.append((sources, row.spread[col], "sd"))
    return lines


def write_csv(tables: list[Table], path: Path) -> None:
    """Every number of the tables, unrounded, with the run, step and logged key it was read from. An
    averaged row has one line per replicate (stat ``replicate``), then its ``mean`` and ``sd``."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["table", "row", "run", "step", "key", "value", "stat"])
        for table in tables:
            for row in table.rows:
                for col in (c for c, _, _ in table.columns if c in row.values):
                    for source, value, stat in _cell_lines(row, col):
                        writer.writerow(
                            [table.title, row.label, source, row.step, row.keys[col], value, stat]
                        )


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
