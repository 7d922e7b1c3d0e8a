"""Training-step speed of SR3Module per fast-path combination: images/s, step time, peak memory, MFU.

Run by hand (never a test); prints a table and writes JSON (default ``benchmarks/results/``):

    python benchmarks/train_step.py                                # 16->128 model; batch 4 (+ largest on GPU)
    python benchmarks/train_step.py --combos ablation --batches 4 max
    python benchmarks/train_step.py --config tiny --combos all --exclude bf16

Each row is the real training step users run: ``SR3Module.training_step`` (+ optimizer step and the
module's hooks) under a Lightning ``Trainer`` with ``trainer.precision`` set, on a fixed in-memory batch.
Every row runs in a fresh subprocess, so compile caches, allocator state and the peak memory of one row
never leak into the next. Step time is the median over ``--repeats`` blocks of ``--steps`` steps, timed
with one device synchronisation per block (so the no-sync path is measured as it runs).

MFU = model FLOPs per step / step time / device peak. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy of the UNet (forward + backward;
convolutions and matmuls, attention counted as its two matmuls). Peaks are dense tensor-core figures:
bf16 for ``bf16-mixed`` rows, TF32 for fp32 rows (cuDNN convolutions run in TF32 by default); on CPU an
estimate from the clock and the SIMD width (``--peak-tflops`` overrides either).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from device_info import device_name, peak_tflops, synchronize, train_flops
from torch.utils.data import DataLoader, IterableDataset

from sr3_lightning.fast_paths import find_max_batch, predict_max_batch
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


# ------------------------------------------------------------------------------- one measurement (subprocess)
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


def our_step_times(
    config: str, batch: int, combo: dict, device: torch.device, warmup: int, steps: int, repeats: int
) -> dict:
    """One combination in this process: per-block mean step times and peak memory."""
    data = make_batch(CONFIGS[config][0], batch)
    blocks = fit_blocks(make_module(config, combo), combo["precision"], data, device, warmup, steps, repeats)
    return {"block_step_s": blocks, "peak_memory_bytes": peak_memory_bytes(device)}


def interleaved_step_times(
    config: str, batch: int, combos: list[dict], device: torch.device, warmup: int, steps: int, repeats: int
) -> list[dict]:
    """All combinations in this process, round-robin (one block each per round): on a shared or throttling
    machine every combination sees the same conditions. Peak memory is not separable here."""
    data = make_batch(CONFIGS[config][0], batch)
    modules = [make_module(config, c) for c in combos]
    times: list[list[float]] = [[] for _ in combos]
    for _ in range(repeats):
        for i, (combo, module) in enumerate(zip(combos, modules)):
            times[i] += fit_blocks(module, combo["precision"], data, device, warmup, steps, 1)
    return [{"block_step_s": t, "peak_memory_bytes": None} for t in times]


def search_max_batch(spec: dict, limit: int) -> dict:
    """The largest batch that trains, searched in this process: one step per probe, compile and cuDNN
    autotuning off (same activations, no tuning per size). On CUDA the peak memory at batches 4 and 8 gives a
    linear guess (`predict_max_batch`), from which the search grows by 25 % and bisects: a handful of probes
    instead of a dozen fresh processes."""
    device = torch.device(spec["device"])
    combo = {**spec["combo"], "compile": False}
    module, cfg = make_module(spec["config"], combo), CONFIGS[spec["config"]][0]
    probes: list[int] = []

    def try_batch(b: int) -> None:
        probes.append(b)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fit_blocks(module, combo["precision"], make_batch(cfg, b), device, 1, 1, 1, benchmark=False)

    start, growth = max(8, spec["batch"]), 2.0
    if device.type == "cuda":
        points = []
        for b in (4, 8):
            try_batch(b)
            points.append((b, torch.cuda.max_memory_allocated(device)))
        capacity = torch.cuda.get_device_properties(device).total_memory
        start, growth = predict_max_batch(points[0], points[1], capacity), 1.25
    best = find_max_batch(try_batch, start=min(start, limit), limit=limit, growth=growth)
    return {"max_batch": best, "probes": probes}


def child(spec: dict) -> None:
    logging.disable(logging.WARNING)
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    if "search_limit" in spec:
        print("RESULT " + json.dumps(search_max_batch(spec, spec["search_limit"])), flush=True)
        return
    try:
        out = our_step_times(
            spec["config"],
            spec["batch"],
            spec["combo"],
            device,
            spec["warmup"],
            spec["steps"],
            spec["repeats"],
        )
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if "out of memory" not in str(err).lower() and not isinstance(err, torch.OutOfMemoryError):
            raise
        out = {"oom": True}
    print("RESULT " + json.dumps(out), flush=True)


def run_child(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; a process killed for memory counts as out of memory."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT ") :])
    if proc.returncode in (-9, 137):
        return {"oom": True}
    raise RuntimeError(f"measurement {spec} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


# ---------------------------------------------------------------------------------------------------- driver
def largest_batch(spec: dict, limit: int) -> int:
    """Largest batch that trains without running out of memory (`search_max_batch`, in a fresh process)."""
    out = run_child({**spec, "search_limit": limit})
    print(f"largest batch for {row_name(spec['combo'])}: {out['max_batch']} (probed {out['probes']})")
    return out["max_batch"]


def make_row(spec: dict, out: dict, device: torch.device, peak_override: float | None) -> dict:
    row = {
        "config": spec["config"],
        "batch": spec["batch"],
        "combo": row_name(spec["combo"]),
        **spec["combo"],
    }
    if out.get("oom"):
        return {**row, "oom": True}
    step = statistics.median(out["block_step_s"])
    flops = train_flops(CONFIGS[spec["config"]][0], spec["batch"])
    peak = peak_override or peak_tflops(device, spec["combo"]["precision"])
    memory = out["peak_memory_bytes"]
    return {
        **row,
        "step_s": step,
        "min_step_s": min(out["block_step_s"]),
        "block_step_s": out["block_step_s"],
        "images_per_s": spec["batch"] / step,
        "peak_memory_gib": memory / 2**30 if memory is not None else None,
        "flops_per_step": flops,
        "peak_tflops": peak,
        "mfu": flops / step / (peak * 1e12) if peak else None,
    }


def print_table(rows: list[dict], device: str) -> None:
    print(f"\ndevice: {device}, torch {torch.__version__}")
    print(
        f"{'combination':<38} {'batch':>5} {'step s':>9} {'min s':>9} {'img/s':>8} {'peak GiB':>9} {'MFU':>6}"
    )
    for r in rows:
        if r.get("oom"):
            print(f"{r['combo']:<38} {r['batch']:>5}  out of memory")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        print(
            f"{r['combo']:<38} {r['batch']:>5} {r['step_s']:>9.4f} {r['min_step_s']:>9.4f} "
            f"{r['images_per_s']:>8.2f} {mem:>9} {mfu:>6}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="real")
    ap.add_argument(
        "--batches", nargs="+", default=None, help="batch sizes and/or 'max' (default: 4, + max on GPU)"
    )
    ap.add_argument("--combos", choices=["ladder", "ablation", "all"], default="ladder")
    ap.add_argument(
        "--exclude", nargs="*", default=[], choices=["bf16", *KNOBS[1:]], help="drop rows using these"
    )
    ap.add_argument("--only", nargs="*", default=[], help="keep only these rows, e.g. fp32+nosync+sdpa+cl")
    ap.add_argument(
        "--compile-mode",
        default="default",
        help="torch.compile mode of the compile rows (reduce-overhead: CUDA graphs)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 5 on GPU, 1 on CPU)")
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per timed block (default 20 on GPU, 2 on CPU)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks; the median is reported")
    ap.add_argument("--max-batch-limit", type=int, default=1024)
    ap.add_argument("--peak-tflops", type=float, default=None, help="override the device peak used for MFU")
    ap.add_argument(
        "--json", type=Path, default=None, help="default: benchmarks/results/train_step-DEVICE.json"
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="all combinations in one process, one block each per round (shared machines; no peak memory)",
    )
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = args.batches or (["4", "max"] if gpu else ["4"])
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    steps = args.steps or (20 if gpu else 2)
    combos = [{**c, "compile_mode": args.compile_mode} for c in combinations(args.combos, set(args.exclude))]
    combos = [c for c in combos if not args.only or row_name(c) in args.only]
    common = {"config": args.config, "device": str(device), "warmup": warmup, "steps": steps}
    common |= {"repeats": args.repeats, "threads": torch.get_num_threads()}
    rows = []
    if args.interleave:
        if "max" in batches:
            raise SystemExit("--interleave measures fixed batch sizes; search 'max' without it")
        logging.disable(logging.WARNING)
        for b in map(int, batches):
            outs = interleaved_step_times(args.config, b, combos, device, warmup, steps, args.repeats)
            for combo, out in zip(combos, outs):
                rows.append(make_row({**common, "combo": combo, "batch": b}, out, device, args.peak_tflops))
    for combo in combos if not args.interleave else []:
        for b in batches:
            spec = {**common, "combo": combo, "batch": 4}
            spec["batch"] = largest_batch(spec, args.max_batch_limit) if b == "max" else int(b)
            if spec["batch"] == 0:
                rows.append({"config": args.config, "batch": 0, "combo": row_name(combo), "oom": True})
                continue
            out = run_child(spec)
            for _ in range(3 if b == "max" else 0):  # compile may need more memory than the eager probe
                if not out.get("oom"):
                    break
                spec["batch"] = max(1, spec["batch"] * 9 // 10)
                out = run_child(spec)
            rows.append({**make_row(spec, out, device, args.peak_tflops), "max_batch": b == "max"})
            print_table(rows[-1:], device_name(device))
    print_table(rows, device_name(device))
    out = (
        args.json
        or RESULTS / f"train_step-{re.sub(r'[^a-z0-9]+', '_', device.type + '_' + args.config)}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "torch": torch.__version__, "argv": sys.argv[1:]}
    meta["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
