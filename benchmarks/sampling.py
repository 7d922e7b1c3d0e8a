"""Sample quality vs network evaluations: the full ancestral chain vs respaced DDPM, DDIM and start-from-step.

Run by hand (never a test); prints a table and writes JSON (default ``benchmarks/results/``):

    python benchmarks/sampling.py --train                        # train the demo SR3 first, then measure
    python benchmarks/sampling.py --train --train-steps 100000 --train-time 00:00:04:00 \\
        -- --data.batch_size=64          # a time budget (the steps only cap it); fit overrides after --
    python benchmarks/sampling.py --ckpt RUN/checkpoints/last.ckpt --val photos:DIR science:DIR

Model: ``--ckpt`` loads one of our checkpoints; ``--train`` trains the demo's small SR3 (8 -> 32 px) on
crops of the real photographs bundled with scikit-image for a fixed budget of ``--train-steps``, with the
reference noise schedule (linear 1e-6..1e-2, T = 2000) so the full chain has the reference's 2000 steps.

For the val images, every row super-resolves all of them with one seed per image batch and reports
PSNR / SSIM / LR consistency against HR (as the reference computes them), PSNR against the full-chain
result, and seconds per image at batch 1 and batch 64 (median of ``--time-repeats``). Rows: ancestral
DDPM over all T steps; DDPM and DDIM (eta 0) respaced to K steps; DDPM on K=100 started from the noised
bicubic image at step ``t_start`` (Diff-SR / SDEdit). Chains longer than ``--time-cap`` evaluations are
timed over that many steps and scaled by NFE (every step costs the same), which the table marks with ``~``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from device_info import device_name, synchronize
from step_harness import THREADS_HELP, results_file

from sr3_lightning.data.datamodule import SR3DataModule, ValDomain
from sr3_lightning.data.shards import ShardIndex, find_index
from sr3_lightning.fast_paths import FastPaths, compile_for_sampling
from sr3_lightning.metrics import consistency, psnr, ssim, to_uint8
from sr3_lightning.module import SR3Module

REFERENCE_SCHEDULE = ["--model.num_timesteps=2000", "--model.beta_start=1e-6", "--model.beta_end=1e-2"]


def train_demo_model(
    data_dir: Path,
    run_dir: Path,
    steps: int,
    accelerator: str,
    max_time: str | None = None,
    overrides: tuple[str, ...] = (),
) -> Path:
    """The demo's small SR3 on real photographs for ``steps`` steps (or until ``max_time``, Lightning's
    ``DD:HH:MM:SS``, whichever comes first), reference schedule, plus ``overrides`` for ``fit`` (e.g.
    ``--data.batch_size=64``); its last.ckpt. An earlier run in ``run_dir`` is moved aside, never resumed:
    its Lightning timer would count against ``max_time``."""
    from sr3_lightning.commands import demo

    budget = [f"--trainer.max_time={max_time}"] if max_time else []
    demo.main(
        [
            "--data-dir",
            str(data_dir),
            "--",
            f"--trainer.default_root_dir={run_dir}",
            "--fresh=true",  # a new model each time (an earlier run is moved aside, not resumed)
            f"--trainer.max_steps={steps}",
            f"--trainer.accelerator={accelerator}",
            "--tracking.mode=disabled",
            *budget,
            *REFERENCE_SCHEDULE,
            *overrides,
        ]
    )
    return run_dir / "checkpoints" / "last.ckpt"


def load_val(specs: list[str], module: SR3Module, num_images: int) -> dict[str, torch.Tensor]:
    """``domain:DIR`` shard directories -> concatenated val batch ``{'lr', 'lr_up', 'hr'}`` on CPU."""
    domains = [ValDomain(*s.split(":", 1), num_images=num_images) for s in specs]
    lr_sizes = {ShardIndex.read(find_index(d.shards, d.domain)).lr_size for d in domains}
    if len(lr_sizes) != 1:
        raise SystemExit(f"--val domains {specs} have different LR sizes {sorted(lr_sizes)}")
    size = module.unet.config.image_size
    dm = SR3DataModule(
        val=domains, lr_size=lr_sizes.pop(), hr_size=size, num_workers=0, batch_size=num_images
    )
    dm.setup("validate")
    parts: dict[str, list[torch.Tensor]] = {"lr": [], "lr_up": [], "hr": []}
    for loader in dm.val_dataloader():
        for batch in loader:
            for k in parts:
                parts[k].append(batch[k])
    return {k: torch.cat(v) for k, v in parts.items()}


def rows_to_run(ks: list[int], starts: list[int], num_timesteps: int) -> list[dict]:
    rows = [{"name": f"ddpm full T={num_timesteps}", "sampler": "ddpm", "steps": None, "t_start": None}]
    for k in [k for k in ks if k < num_timesteps]:
        rows.append({"name": f"ddpm K={k}", "sampler": "ddpm", "steps": k, "t_start": None})
        rows.append({"name": f"ddim K={k}", "sampler": "ddim", "steps": k, "t_start": None})
    for t in starts:
        rows.append({"name": f"ddpm K=100 from t={t}", "sampler": "ddpm", "steps": 100, "t_start": t})
    return rows


def run(module: SR3Module, row: dict, lr_up: torch.Tensor, seed: int, t_start: int | None = None):
    gen = torch.Generator(device=lr_up.device).manual_seed(seed)
    start = row["t_start"] if t_start is None else t_start
    return module.super_resolve(lr_up, row["sampler"], row["steps"], t_start=start, generator=gen)


def seconds_per_image(module: SR3Module, row: dict, lr_up: torch.Tensor, batch: int, repeats: int, cap: int):
    """Median seconds per image at ``batch``; chains over ``cap`` steps are timed on ``cap`` and scaled."""
    cond = lr_up[torch.arange(batch) % len(lr_up)]
    nfe = row["t_start"] or row["steps"] or module.schedule.num_timesteps
    timed_steps = min(nfe, cap)
    run(module, row, cond, 0, t_start=min(timed_steps, 2))  # warm-up (compilation, allocator)
    times = []
    for r in range(repeats):
        synchronize(cond.device)
        start = time.perf_counter()
        run(module, row, cond, r, t_start=timed_steps if timed_steps < nfe else None)
        synchronize(cond.device)
        times.append((time.perf_counter() - start) * nfe / timed_steps / batch)
    return statistics.median(times), timed_steps < nfe


def quality(module: SR3Module, row: dict, val: dict[str, torch.Tensor], device: torch.device, seed: int):
    result = run(module, row, val["lr_up"].to(device), seed)
    sr = result.images.clamp(-1, 1).cpu()
    hr8 = to_uint8(val["hr"])
    return (
        sr,
        result.nfe,
        {
            "psnr": psnr(to_uint8(sr), hr8).mean().item(),
            "ssim": ssim(to_uint8(sr), hr8).mean().item(),
            "consistency": consistency(sr, val["lr"]).mean().item(),
        },
    )


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=Path, help="our checkpoint to load")
    src.add_argument("--train", action="store_true", help="train the demo SR3 first (see --train-steps)")
    ap.add_argument("--train-steps", type=int, default=1200, help="training budget in optimizer steps")
    ap.add_argument(
        "--train-time", default=None, help="also stop training after this wall time (DD:HH:MM:SS)"
    )
    ap.add_argument(
        "--data-dir", type=Path, default=Path("runs/sampling_bench/data"), help="demo data (--train)"
    )
    ap.add_argument(
        "--run-dir", type=Path, default=Path("runs/sampling_bench/run"), help="training run (--train)"
    )
    ap.add_argument(
        "--val",
        nargs="+",
        default=None,
        help="domain:SHARD_DIR ... (with --train: default the demo's val; with --ckpt: required)",
    )
    ap.add_argument("--num-images", type=int, default=8, help="val images per domain")
    ap.add_argument("--ks", type=int, nargs="+", default=[25, 50, 100, 250], help="respaced chain lengths K")
    ap.add_argument(
        "--starts", type=int, nargs="*", default=[50, 25], help="t_start on K=100 (start-from-step)"
    )
    ap.add_argument("--seeds", type=int, default=2, help="quality is averaged over this many seeds")
    ap.add_argument("--time-batches", type=int, nargs="*", default=[1, 64])
    ap.add_argument("--time-repeats", type=int, default=3)
    ap.add_argument("--time-cap", type=int, default=200, help="time at most this many steps per chain")
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile the sampling UNet (CUDA graphs on GPU)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--json", type=Path, default=None, help="default: benchmarks/results/sampling-DEVICE[_compile].json"
    )
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return ap


def model_and_val(args: argparse.Namespace, overrides: list[str], device: torch.device):
    """(checkpoint path, module ready to sample, val specs): trained first with ``--train``."""
    bad = [s for s in args.val or [] if ":" not in s or not s.split(":", 1)[0]]
    if bad:  # before any training
        raise SystemExit(f"--val {' '.join(bad)}: give domain:SHARD_DIR, e.g. photos:data/shards/photos_val")
    if args.train:
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        ckpt = train_demo_model(
            args.data_dir, args.run_dir, args.train_steps, accelerator, args.train_time, tuple(overrides)
        )
        val_specs = args.val or [f"{d}:{args.data_dir / 'shards/val'}" for d in ("photos", "science")]
    else:
        ckpt, val_specs = args.ckpt, args.val
        if not val_specs:
            raise SystemExit("--ckpt needs --val domain:SHARD_DIR ... (the images to super-resolve)")
    module = SR3Module.load_from_checkpoint(ckpt, map_location=device).eval()
    hp = module.hparams
    paths = FastPaths.resolve(device, hp.get("channels_last"), False, hp.get("fused_attention", True))
    paths.apply(module.sampling_unet)
    if args.compile:
        compile_for_sampling(module.sampling_unet)
    return ckpt, module, val_specs


def measure(module: SR3Module, row: dict, val: dict, full: dict, args: argparse.Namespace) -> dict:
    """One sampler row: quality averaged over the seeds (the full chain's samples kept in ``full``), then
    seconds per image at each timing batch."""
    device = torch.device(args.device)
    scores, nfe = [], 0
    for seed in range(args.seeds):
        sr, nfe, s = quality(module, row, val, device, seed)
        if row["steps"] is None:
            full[seed], s["psnr_vs_full"] = sr, None
        else:
            s["psnr_vs_full"] = psnr(to_uint8(sr), to_uint8(full[seed])).mean().item()
        scores.append(s)
    out = {**row, "nfe": nfe}
    for k, v in scores[0].items():
        out[k] = statistics.mean(s[k] for s in scores) if v is not None else None
    for b in args.time_batches:
        sec, scaled = seconds_per_image(
            module, row, val["lr_up"].to(device), b, args.time_repeats, args.time_cap
        )
        out[f"s_per_image_b{b}"], out[f"s_per_image_b{b}_extrapolated"] = sec, scaled
    return out


def verdict(rows: list[dict], num_timesteps: int) -> str:
    """The target: the fewest evaluations (<= 100) within 0.2 dB / 0.01 SSIM of the full chain."""
    ref = rows[0]
    ok = [  # respaced chains from pure noise only: start-from-step rows begin at the bicubic image
        r
        for r in rows[1:]
        if r["t_start"] is None and r["nfe"] <= 100
        if r["psnr"] >= ref["psnr"] - 0.2 and r["ssim"] >= ref["ssim"] - 0.01
    ]
    best = min(ok, key=lambda r: r["nfe"]) if ok else None
    found = f"{best['name']} ({num_timesteps / best['nfe']:.0f}x fewer)" if best else "none"
    target = f"within 0.2 dB PSNR and 0.01 SSIM of the full {num_timesteps}-step chain"
    return f"fewest evaluations (<= 100) {target}: {found}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser().parse_args(own)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ckpt, module, val_specs = model_and_val(args, overrides, device)
    val = load_val(val_specs, module, args.num_images)
    T = module.schedule.num_timesteps
    if skipped := [k for k in args.ks if k >= T]:
        print(f"--ks {' '.join(map(str, skipped))}: not fewer steps than the model's T={T}, left out")
    step = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True).get("global_step")
    print(f"model {ckpt} (T={T}, {step} steps), {len(val['hr'])} val images, device {device_name(device)}")
    meta = {
        "device": device_name(device),
        "torch": torch.__version__,
        "argv": sys.argv[1:],
        "ckpt": str(ckpt),
    }
    meta |= {"trained_steps": step, "val": val_specs, "num_images": len(val["hr"]), "seeds": args.seeds}
    meta |= {"compile": args.compile, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out_path = args.json or results_file("sampling", device, "compile" if args.compile else "")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows, full = [], {}
    for row in rows_to_run(args.ks, args.starts, T):
        rows.append(measure(module, row, val, full, args))
        print_row(rows[-1], args.time_batches)
        out_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))  # partial results survive
    print_table(rows, args.time_batches, device_name(device))
    meta["verdict"] = verdict(rows, T)
    print(meta["verdict"])
    out_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {out_path}")


def print_row(r: dict, batches: list[int]) -> None:
    times = " ".join(
        f"{('~' if r[f's_per_image_b{b}_extrapolated'] else '') + format(r[f's_per_image_b{b}'], '.4f'):>11}"
        for b in batches
    )
    print(
        f"{r['name']:<24} {r['nfe']:>5} {r['psnr']:>7.2f} {r['ssim']:>7.4f} {r['consistency']:>7.2f} "
        f"{format(r['psnr_vs_full'], '.2f') if r['psnr_vs_full'] is not None else '-':>9} {times}"
    )


def print_table(rows: list[dict], batches: list[int], device: str) -> None:
    print(f"\ndevice: {device}, torch {torch.__version__}")
    heads = " ".join(f"{f's/img b{b}':>11}" for b in batches)
    print(f"{'sampler':<24} {'NFE':>5} {'PSNR':>7} {'SSIM':>7} {'consis':>7} {'PSNR/full':>9} {heads}")
    for r in rows:
        print_row(r, batches)


if __name__ == "__main__":
    main()
