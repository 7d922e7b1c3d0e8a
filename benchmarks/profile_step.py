"""Where the training step's time goes: is the device busy, or waiting for the host to launch kernels?

Run by hand (never a test); prints a summary and the top kernels, and writes JSON (default
``benchmarks/results/``):

    python benchmarks/profile_step.py                                   # fastest combination, batch 4
    python benchmarks/profile_step.py --combo fp32+sync --batch 4       # the reference-like step
    python benchmarks/profile_step.py --config tiny --combo fp32+nosync+sdpa+fadam

The step is ``train_step.py``'s (``SR3Module`` under a Lightning ``Trainer``, a fixed in-memory batch),
profiled with ``torch.profiler`` for ``--steps`` steps after ``--warmup``. Reported per step: wall time,
device kernels launched, the fraction of the wall time in which some kernel ran (GPU busy; 100 % means
device-bound, far less means the host's launches are the limit, and only CUDA graphs or a larger batch
help), and host-side operator calls. On a CPU only the operator counts and times are meaningful.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from device_info import device_name, synchronize
from step_harness import (
    CONFIGS,
    THREADS_HELP,
    combinations,
    fit_on_batch,
    make_batch,
    make_module,
    results_file,
    row_name,
)
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from sr3_lightning.fast_paths import COMPILE_MODES, uses_cuda_graphs

FASTEST = "bf16+nosync+sdpa+cl+fadam+compile"


def busy_fraction(intervals: list[tuple[float, float]], wall: float) -> float:
    """Fraction of ``wall`` covered by the union of ``(start, end)`` intervals (same unit)."""
    covered, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered / wall if wall > 0 else 0.0


def profile_fit(module, precision: str, batch: dict, device: torch.device, warmup: int, steps: int):
    """``trainer.fit`` for ``warmup + steps`` steps, the last ``steps`` profiled; (profile, wall s)."""
    from lightning.pytorch import Callback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    wall: list[float] = []

    class Window(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                synchronize(device)
                prof.__enter__()
                wall.append(time.perf_counter())

        def on_train_end(self, trainer, pl_module) -> None:
            synchronize(device)
            wall.append(time.perf_counter())
            prof.__exit__(None, None, None)

    fit_on_batch(module, precision, batch, device, warmup + steps, [Window()])
    return prof, wall[1] - wall[0]


def summarise(prof, wall_s: float, steps: int) -> dict:
    """Per-step wall time, kernels, GPU busy fraction and outermost host operators of a profile."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    ops = [e for e in events if e.name.startswith("aten::") and not _inside_aten(e)]
    start = min((e.time_range.start for e in events), default=0.0)
    intervals = [(e.time_range.start - start, e.time_range.end - start) for e in kernels]
    return {
        "step_s": wall_s / steps,
        "kernels_per_step": len(kernels) / steps,
        "kernel_s_per_step": sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps,
        "gpu_busy": busy_fraction(intervals, wall_s * 1e6) if kernels else None,
        "host_ops_per_step": len(ops) / steps,
    }


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=list(CONFIGS), default="real")
    ap.add_argument("--combo", default=FASTEST, help="a row name of train_step.py, e.g. fp32+sync")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="torch.compile mode (reduce-overhead: CUDA graphs)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=None, help="unprofiled steps (default 5 on GPU, 1 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="profiled steps (default 10 on GPU, 2 on CPU)")
    ap.add_argument("--top", type=int, default=12, help="kernels / operators listed")
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/profile_step-…")
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    combos = {row_name(c): c for c in combinations("all", set())}
    if args.combo not in combos:
        raise SystemExit(f"--combo {args.combo!r} is not a train_step.py row; one of: {', '.join(combos)}")
    combo = {**combos[args.combo], "compile_mode": args.compile_mode}
    if combo["precision"] == "bf16-mixed" and not gpu:
        combo = {**combo, "precision": "32-true"}
        print("bf16 autocast is a GPU fast path: profiling fp32 on the CPU")
    if uses_cuda_graphs(args.compile_mode) and not gpu:
        print(
            f"--compile-mode {args.compile_mode}: CUDA graphs need a GPU; on the CPU it compiles without them"
        )
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    steps = args.steps or (10 if gpu else 2)
    module = make_module(args.config, combo)
    batch = make_batch(CONFIGS[args.config][0], args.batch)
    prof, wall = profile_fit(module, combo["precision"], batch, device, warmup, steps)
    result = summarise(prof, wall, steps)

    name = device_name(device)
    print(
        f"\ndevice: {name}, torch {torch.__version__}; "
        f"{args.config} config, {row_name(combo)}, batch {args.batch}"
    )
    busy = f"{100 * result['gpu_busy']:.1f}%" if result["gpu_busy"] is not None else "n/a (no device kernels)"
    print(
        f"step {result['step_s'] * 1e3:.2f} ms | kernels/step {result['kernels_per_step']:.0f} "
        f"({result['kernel_s_per_step'] * 1e3:.2f} ms of kernel time) | GPU busy {busy} | "
        f"host ops/step {result['host_ops_per_step']:.0f}"
    )
    sort = "self_device_time_total" if gpu else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.top))
    tags = (args.config, args.combo, args.compile_mode, f"b{args.batch}")
    out = args.json or results_file("profile_step", device, *tags)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "torch": torch.__version__, "argv": sys.argv[1:], "combo": row_name(combo)}
    meta |= {
        "batch": args.batch,
        "steps": steps,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    out.write_text(json.dumps({"meta": meta, "result": result}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
