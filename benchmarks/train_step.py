"""Training-step speed of SR3Module per fast-path combination: images/s, step time, peak memory, MFU.

Run by hand (never a test); prints a table and writes JSON (default ``benchmarks/results/``):

    python benchmarks/train_step.py                                # 16->128 model; batch 4 (+ largest on GPU)
    python benchmarks/train_step.py --combos ablation --batches 4 max    # GPU ('max': a GPU's memory)
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
import json
import logging
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
from device_info import device_name, peak_tflops, train_flops
from step_harness import (
    CONFIGS,
    KNOBS,
    THREADS_HELP,
    combinations,
    fit_blocks,
    make_batch,
    make_module,
    peak_memory_bytes,
    results_file,
    row_name,
    select_rows,
)

from sr3_lightning.fast_paths import COMPILE_MODES, find_max_batch, predict_max_batch


# ------------------------------------------------------------------------------- one measurement (subprocess)
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
    """Largest batch that trains without running out of memory (`search_max_batch`, in a fresh process);
    0 when the search process itself was killed for memory."""
    out = run_child({**spec, "search_limit": limit})
    if out.get("oom"):
        print(f"largest batch for {row_name(spec['combo'])}: the search was killed for memory")
        return 0
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


def selected_combos(args: argparse.Namespace) -> list[dict]:
    """The rows ``--combos``, ``--exclude``, ``--only`` and ``--compile-mode`` ask for; an error if none."""

    def rows(kind: str, exclude: set[str]) -> list[dict]:
        return [{**c, "compile_mode": args.compile_mode} for c in combinations(kind, exclude)]

    every = [row_name(c) for c in rows("all", set())]
    context = f"--combos {args.combos}" + (f" --exclude {' '.join(args.exclude)}" if args.exclude else "")
    return select_rows(rows(args.combos, set(args.exclude)), args.only, every, context)


def parser() -> argparse.ArgumentParser:
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
        choices=COMPILE_MODES,
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
        "--json",
        type=Path,
        default=None,
        help="default: benchmarks/results/train_step-DEVICE_CONFIG_ROWS_BATCHES.json (rewritten per row)",
    )
    ap.add_argument(
        "--interleave",
        action="store_true",
        help="all combinations in one process, one block each per round (shared machines; no peak memory)",
    )
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def interleaved_rows(args: argparse.Namespace, common: dict, combos: list[dict], batches: list[str]) -> list:
    """Every combination in this process, one timed block each per round (`--interleave`)."""
    if "max" in batches:
        raise SystemExit("--interleave measures fixed batch sizes; search 'max' without it")
    logging.disable(logging.WARNING)
    device, rows = torch.device(args.device), []
    for b in map(int, batches):
        outs = interleaved_step_times(
            args.config, b, combos, device, common["warmup"], common["steps"], args.repeats
        )
        for combo, out in zip(combos, outs):
            rows.append(make_row({**common, "combo": combo, "batch": b}, out, device, args.peak_tflops))
    return rows


def child_row(args: argparse.Namespace, common: dict, combo: dict, batch: str) -> dict:
    """One row in a fresh process; ``max`` searches the largest batch first, then backs off on OOM."""
    device = torch.device(args.device)
    spec = {**common, "combo": combo, "batch": 4}
    spec["batch"] = largest_batch(spec, args.max_batch_limit) if batch == "max" else int(batch)
    if spec["batch"] == 0:
        return {**make_row(spec, {"oom": True}, device, args.peak_tflops), "max_batch": True}
    out = run_child(spec)
    for _ in range(3 if batch == "max" else 0):  # compile may need more memory than the eager probe
        if not out.get("oom"):
            break
        spec["batch"] = max(1, spec["batch"] * 9 // 10)
        out = run_child(spec)
    return {**make_row(spec, out, device, args.peak_tflops), "max_batch": batch == "max"}


def default_json(args: argparse.Namespace, device: torch.device, batches: list[str]) -> Path:
    rows = "only_" + "_".join(args.only) if args.only else args.combos
    excluded = "no_" + "_".join(args.exclude) if args.exclude else ""
    batch_tag = "b" + "_".join(batches)
    return results_file("train_step", device, args.config, rows, excluded, args.compile_mode, batch_tag)


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = args.batches or (["4", "max"] if gpu else ["4"])
    bad = [b for b in batches if b != "max" and not (b.isdigit() and int(b) > 0)]
    if bad:
        raise SystemExit(
            f"--batches {' '.join(bad)}: each must be a positive integer or 'max', e.g. 4 16 max"
        )
    if "max" in batches and not gpu:
        raise SystemExit(
            "--batches max searches the GPU's memory; on the CPU a batch grows until the machine swaps or "
            "the kernel kills it: give batch sizes instead, e.g. --batches 4 16"
        )
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    combos = selected_combos(args)
    common = {
        "config": args.config,
        "device": str(device),
        "warmup": warmup,
        "steps": args.steps or (20 if gpu else 2),
    }
    common |= {"repeats": args.repeats, "threads": torch.get_num_threads()}
    out = args.json or default_json(args, device, batches)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "torch": torch.__version__, "argv": sys.argv[1:]}
    meta["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = interleaved_rows(args, common, combos, batches) if args.interleave else []
    for combo in combos if not args.interleave else []:
        for b in batches:
            rows.append(child_row(args, common, combo, b))
            print_table(rows[-1:], device_name(device))
            out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # rows so far survive a kill
    print_table(rows, device_name(device))
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
