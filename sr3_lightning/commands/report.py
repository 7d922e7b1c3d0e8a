"""``report``: the study's tables, plots and CSV from finished runs.

    python -m sr3_lightning report runs/steps runs/data runs/timesteps runs/forgetting --out reports/study
    python -m sr3_lightning report wandb:ENTITY/sr3-finetune/SWEEP_ID --out reports/steps   # online

RUNS are run directories, sweep directories (their finished runs) or ``wandb:ENTITY/PROJECT[/SWEEP_ID]``.
Writes ``report.md`` (Tables 1-4, plots embedded), ``report.csv`` (every number) and PNG plots into --out.
Runs without DomainEval metrics are named in a warning and in report.md; with none left, it is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from jsonargparse import ArgumentParser

from sr3_lightning.commands import command_parser
from sr3_lightning.images import check_out_folder
from sr3_lightning.report import write_report
from sr3_lightning.runs import load_runs

log = logging.getLogger(__name__)


def parser() -> ArgumentParser:
    p = command_parser("report", __doc__)
    p.add_argument(
        "runs", type=str, nargs="+", help="run or sweep directories, or wandb:ENTITY/PROJECT[/SWEEP]"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    check_out_folder(args.out, "report.md, report.csv and the plots")
    runs, skipped = load_runs(args.runs)
    path = write_report(runs, args.out, skipped)
    log.info("report of %d run(s): %s (numbers: %s)", len(runs), path, path.with_suffix(".csv"))
