"""Tables of evaluation results: per-image metrics on disk and in W&B, and a per-domain summary as text."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor


def write_image_table(
    trainer: Trainer, path: Path, key: str, step: int, keys: list[str], columns: dict[str, Tensor]
) -> None:
    """One row per image (``key`` plus a column per metric) as the CSV ``path`` and the W&B table ``key``."""
    names = ["key", *columns]
    rows = [[name, *(columns[c][i].item() for c in columns)] for i, name in enumerate(keys)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(names)
        writer.writerows(rows)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.log_table(key=key, columns=names, data=rows, step=step)


def metrics_table(metrics: dict[str, float]) -> str:
    """``val/{domain}/*`` and ``forget/{domain}/*`` as a text table: a row per domain, its bicubic
    upsample and its change from the baseline (other keys are left out)."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        kind, domain, name = (key.split("/", 2) + ["", ""])[:3]
        if kind == "val" and name and name != "loss":
            label = f"{domain} bicubic" if name.startswith("bicubic_") else domain
            rows.setdefault(label, {})[name.removeprefix("bicubic_")] = value
        elif kind == "forget" and name:
            rows.setdefault(f"{domain} forget", {})[name] = value
    columns = {c: max(11, len(c)) for values in rows.values() for c in values}  # name -> width
    width = max([len("domain"), *map(len, rows)])
    lines = ["  ".join([f"{'domain':<{width}}", *(f"{c:>{w}}" for c, w in columns.items())])]
    for label in sorted(rows, key=lambda r: (r.split()[0], r)):
        sign = "+" if label.endswith(" forget") else ""
        cells = [
            f"{rows[label][c]:>{sign}{w}.4f}" if c in rows[label] else " " * w for c, w in columns.items()
        ]
        lines.append("  ".join([f"{label:<{width}}", *cells]).rstrip())
    return "\n".join(lines)
