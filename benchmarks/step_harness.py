"""The Lightning training step the benchmarks time, shared by ``train_step.py``, ``profile_step.py`` and
``compare_reference.py``: model configs, fast-path combinations, a fixed in-memory batch and ``trainer.fit``
on it with block timing. Keeping it in one place means every benchmark measures the same step users run."""

from __future__ import annotations

import itertools
import re
import resource
import time
from pathlib import Path

import torch
from device_info import synchronize
from torch.utils.data import DataLoader, IterableDataset

from sr3_lightning.models.unet import UNetConfig

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "real": (UNetConfig(), 2000),  # the reference 16->128 face model, 97.8 M parameters
    "tiny": (  # configs/demo.yaml: 8 -> 32 px, 263 k parameters
        UNetConfig(
            inner_channel=16,
            norm_groups=8,
            channel_multiplier=(1, 2, 2),
            attn_res=(8,),
            res_blocks=1,
            dropout=0.0,
            image_size=32,
        ),
        2000,
    ),
}


def results_file(script: str, device: torch.device, *tags: str) -> Path:
    """The default JSON of a run: named by the script, the device and the options that choose its rows
    (empty tags and the compile mode "default" dropped), so the README's command pairs (fp32 then bf16,
    one combo then another) keep both files."""
    kept = [t for t in tags if t and t != "default"]
    name = re.sub(r"[^a-z0-9]+", "_", "_".join([device.type, *kept]).lower()).strip("_")
    return RESULTS / f"{script}-{name}.json"


THREADS_HELP = "CPU threads (torch.set_num_threads); use 1 when other jobs load the cores (OpenMP stalls)"
KNOBS = ("progress_bar_loss", "fused_attention", "channels_last", "fused_adam", "compile")
LABELS = {"fused_attention": "sdpa", "channels_last": "cl", "fused_adam": "fadam", "compile": "compile"}


# --------------------------------------------------------------------------------------------- combinations
def row_name(c: dict) -> str:
    parts = [
        "bf16" if c["precision"] == "bf16-mixed" else "fp32",
        "sync" if c["progress_bar_loss"] else "nosync",
    ]
    labels = [label for k, label in LABELS.items() if c[k]]
    if c["compile"] and c.get("compile_mode", "default") != "default":
        labels[-1] += f"({c['compile_mode']})"
    return "+".join(parts + labels)


def combinations(kind: str, exclude: set[str]) -> list[dict]:
    """``ladder``: from the reference-like step (everything off, loss fetched every step) add one fast path at
    a time; ``ablation``: the fastest combination with each path switched off in turn; ``all``: every one."""
    base = {"precision": "32-true", "progress_bar_loss": True}
    base |= {k: False for k in KNOBS[1:]}
    steps = [("progress_bar_loss", False), *((k, True) for k in KNOBS[1:]), ("precision", "bf16-mixed")]
    if kind == "ladder":
        rows, c = [dict(base)], dict(base)
        for k, v in steps:
            c = {**c, k: v}
            rows.append(c)
    elif kind == "ablation":
        full = dict(base)
        for k, v in steps:
            full[k] = v
        rows = [full] + [{**full, k: base[k]} for k, _ in steps]
    else:
        rows = [
            {"precision": p, **dict(zip(KNOBS, flags))}
            for p in ("32-true", "bf16-mixed")
            for flags in itertools.product([True, False], repeat=len(KNOBS))
        ]
    rows = [r for r in rows if not ("bf16" in exclude and r["precision"] == "bf16-mixed")]
    rows = [r for r in rows if not any(r.get(k) for k in exclude if k in KNOBS)]
    return list({row_name(r): r for r in rows}.values())


def select_rows(combos: list[dict], only: list[str], every: list[str], context: str) -> list[dict]:
    """The ``combos`` named in ``only`` (all of them when it is empty), checked before any measurement: a
    mistyped name would otherwise give an empty table and overwrite the results JSON with no rows.

    ``every``: the names any selection could give, to tell a typo from a row that ``context`` (the flags
    that built ``combos``) leaves out."""
    names = [row_name(c) for c in combos]
    unknown = [n for n in only if n not in names]
    if unknown:
        elsewhere = [n for n in unknown if n in every]
        hint = f" ({', '.join(elsewhere)}: rows of --combos all, left out here)" if elsewhere else ""
        raise SystemExit(
            f"--only {' '.join(unknown)}: no such row in {context}{hint}; the rows are: {', '.join(names)}"
        )
    chosen = [c for c in combos if not only or row_name(c) in only]
    if not chosen:
        raise SystemExit(f"{context} leaves no rows to measure; drop some --exclude")
    return chosen


# ------------------------------------------------------------------------------- the step under Lightning
class RepeatBatch(IterableDataset):
    """The same batch forever: the step, not the loader, is measured."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch

    def __iter__(self):
        while True:
            yield self.batch


def make_batch(cfg: UNetConfig, batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = cfg.image_size
    hr = torch.rand(batch, 3, s, s, generator=g) * 2 - 1
    return {"hr": hr, "lr_up": (hr + 0.1 * torch.randn(hr.shape, generator=g)).clamp(-1, 1)}


def make_module(config: str, combo: dict):
    from sr3_lightning.module import SR3Module

    cfg, num_timesteps = CONFIGS[config]
    mode = combo.get("compile_mode", "default")
    return SR3Module(unet=cfg, num_timesteps=num_timesteps, compile_mode=mode, **{k: combo[k] for k in KNOBS})


def fit_on_batch(
    module,
    precision: str,
    batch: dict,
    device: torch.device,
    max_steps: int,
    callbacks: list,
    benchmark: bool | None = None,
) -> None:
    """``trainer.fit`` for ``max_steps`` on ``batch`` repeated, with nothing but ``callbacks`` attached (no
    logger, checkpoints or progress bar). ``benchmark`` (cuDNN autotuning) defaults to on with CUDA, as the
    reference's sr.py sets it."""
    from lightning.pytorch import Trainer

    trainer = Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        benchmark=device.type == "cuda" if benchmark is None else benchmark,
        callbacks=callbacks,
    )
    loader = DataLoader(RepeatBatch(batch), batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(module, train_dataloaders=loader)


def fit_blocks(
    module,
    precision: str,
    batch: dict,
    device: torch.device,
    warmup: int,
    steps: int,
    blocks: int,
    benchmark: bool | None = None,
) -> list[float]:
    """``trainer.fit`` for warmup + steps * blocks steps; the mean step time of each block of ``steps``.

    One synchronisation per block boundary; CUDA peak memory stats are reset when timing starts.
    """
    from lightning.pytorch import Callback

    marks: list[float] = []

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx >= warmup and (batch_idx - warmup) % steps == 0:
                synchronize(device)
                if batch_idx == warmup and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                marks.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            synchronize(device)
            marks.append(time.perf_counter())

    fit_on_batch(module, precision, batch, device, warmup + steps * blocks, [StepTimer()], benchmark)
    return [(b - a) / steps for a, b in zip(marks, marks[1:])]


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (KiB on Linux)
