"""Our training and reverse steps against the public reference SR3: same config, batch, device; one process.

Run by hand (never a test); prints a table and writes JSON (default ``benchmarks/results/``):

    python benchmarks/compare_reference.py --reference ~/src/Image-Super-Resolution-via-Iterative-Refinement
    python benchmarks/compare_reference.py --reference DIR --precision bf16-mixed    # our fastest, on a GPU

``DIR`` is a checkout of Janspiry/Image-Super-Resolution-via-Iterative-Refinement. Its
``model/sr3_modules/unet.py`` and ``diffusion.py`` are imported from there at run time (their imports:
torch, numpy, tqdm); none of its code is copied into this project. Both models start from the same
weights, checked by comparing one forward pass.

- Reference training step, as published (``model/model.py: DDPM.optimize_parameters`` after
  ``feed_data``; ``sr.py`` sets ``cudnn.benchmark``): batch to the device, ``zero_grad``, ``p_losses``
  (numpy draws of t and the level), ``sum / (b*c*h*w)``, ``backward``, ``Adam.step``, ``l_pix.item()``;
  fp32, einsum attention, contiguous layout, plain Adam.
- Ours: ``SR3Module.training_step`` under a Lightning ``Trainer`` with the module's default fast paths for
  the device (channels_last, fused Adam, and torch.compile on CUDA) at ``--precision``.
- Reverse step: the reference's ``GaussianDiffusion.p_sample`` loop vs our ``SR3Module.super_resolve``
  (ancestral DDPM), over ``--reverse-steps`` steps per block, in eval mode without gradients.

Rounds alternate reference and ours (and which of them goes first), so a machine that throttles or is
shared slows both alike; the table gives the median step time of each and the median of the per-round
ratios (reference / ours: > 1 means we are faster).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from device_info import device_name, synchronize
from step_harness import CONFIGS, THREADS_HELP, fit_blocks, make_batch, results_file

from sr3_lightning.fast_paths import COMPILE_MODES
from sr3_lightning.module import SR3Module

REFERENCE_FILES = ("model/sr3_modules/unet.py", "model/sr3_modules/diffusion.py")


def import_reference(checkout: Path) -> tuple[ModuleType, ModuleType]:
    """The reference's unet and diffusion modules, loaded from the user's checkout by file path."""
    missing = [f for f in REFERENCE_FILES if not (checkout / f).is_file()]
    if missing:
        raise SystemExit(
            f"--reference {checkout}: {', '.join(missing)} not found; pass the root of a checkout of "
            "https://github.com/Janspiry/Image-Super-Resolution-via-Iterative-Refinement"
        )
    modules = []
    for name, rel in zip(("sr3_reference_unet", "sr3_reference_diffusion"), REFERENCE_FILES):
        spec = importlib.util.spec_from_file_location(name, checkout / rel)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def build_reference(checkout: Path, config: str, weights: dict, device: torch.device):
    """The reference GaussianDiffusion + UNet as its define_G builds them, with our weights, and its Adam."""
    ref_unet, ref_diffusion = import_reference(checkout)
    cfg, num_timesteps = CONFIGS[config]
    unet = ref_unet.UNet(
        in_channel=cfg.in_channel,
        out_channel=cfg.out_channel,
        norm_groups=cfg.norm_groups,
        inner_channel=cfg.inner_channel,
        channel_mults=tuple(cfg.channel_multiplier),
        attn_res=list(cfg.attn_res),
        res_blocks=cfg.res_blocks,
        dropout=cfg.dropout,
        image_size=cfg.image_size,
    )
    schedule = {"schedule": "linear", "n_timestep": num_timesteps, "linear_start": 1e-6, "linear_end": 1e-2}
    net = ref_diffusion.GaussianDiffusion(
        unet, image_size=cfg.image_size, channels=3, loss_type="l1", conditional=True, schedule_opt=schedule
    )
    net.denoise_fn.load_state_dict(weights)
    net.to(device)
    net.set_loss(device)
    net.set_new_noise_schedule(schedule, device)
    return net, torch.optim.Adam(net.parameters(), lr=1e-4)


def forward_difference(net, module, device: torch.device) -> float:
    """Max abs difference of one fp32 eval forward of the two UNets on the same input (same weights)."""
    cfg = module.unet.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channel, cfg.image_size, cfg.image_size, generator=g).to(device)
    level = torch.rand(2, 1, generator=g).to(device)
    with torch.no_grad():
        ours = module.unet.eval()(x, level)
        theirs = net.denoise_fn.eval()(x, level)
    module.unet.train()
    return float((ours - theirs).abs().max())


def reference_train_block(net, opt, batch: dict, device: torch.device, warmup: int, steps: int) -> float:
    """Mean time of ``steps`` reference training steps after ``warmup``, one synchronisation at each end."""
    net.train()
    b, c, h, w = batch["hr"].shape

    def step() -> float:
        data = {"HR": batch["hr"].to(device), "SR": batch["lr_up"].to(device)}  # feed_data
        opt.zero_grad()
        l_pix = net(data)
        l_pix = l_pix.sum() / int(b * c * h * w)
        l_pix.backward()
        opt.step()
        return l_pix.item()

    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def reference_reverse_block(net, cond: torch.Tensor, k: int, device: torch.device) -> float:
    """Mean time of one ``p_sample`` over k reverse steps (t = k-1 .. 0), as ``p_sample_loop`` runs them."""
    net.eval()
    net.p_sample(torch.randn(cond.shape, device=device), 0, condition_x=cond)  # untimed, as ours
    synchronize(device)
    start = time.perf_counter()
    img = torch.randn(cond.shape, device=device)
    for i in reversed(range(k)):
        img = net.p_sample(img, i, condition_x=cond)
    synchronize(device)
    return (time.perf_counter() - start) / k


def our_reverse_block(module, cond: torch.Tensor, k: int, device: torch.device, bf16: bool) -> float:
    """Mean time of one reverse step of ``super_resolve`` over k ancestral steps from step k, after one
    untimed step (the Trainer's teardown moved the model: CUDA graphs, if any, are recorded again)."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        module.super_resolve(cond, sampler="ddpm", t_start=1)
        synchronize(device)
        start = time.perf_counter()
        module.super_resolve(cond, sampler="ddpm", t_start=k)
    synchronize(device)
    return (time.perf_counter() - start) / k


def summarise(what: str, batch: int, ref: list[float], ours: list[float], unit: int) -> dict:
    ratios = [r / o for r, o in zip(ref, ours)]
    return {
        "what": what,
        "batch": batch,
        "reference_s": statistics.median(ref),
        "ours_s": statistics.median(ours),
        "reference_images_per_s": unit / statistics.median(ref),
        "ours_images_per_s": unit / statistics.median(ours),
        "ratio_reference_over_ours": statistics.median(ratios),
        "rounds_reference_s": ref,
        "rounds_ours_s": ours,
    }


def write_results(out: Path, meta: dict, batch: int, train: dict, reverse: dict) -> list[dict]:
    rows = [
        summarise("train_step", batch, train["reference"], train["ours"], batch),
        summarise("reverse_step", batch, reverse["reference"], reverse["ours"], batch),
    ]
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return rows


def positive(text: str) -> int:
    """argparse type: a count of 1 or more (0 rounds or steps has no median to report)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: use a positive whole number")
    return int(text)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="root of a reference SR3 checkout")
    ap.add_argument("--config", choices=list(CONFIGS), default="real")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--precision", choices=["32-true", "bf16-mixed"], default="32-true", help="ours only")
    ap.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        default="default",
        help="ours: torch.compile mode (reduce-overhead: CUDA graphs)",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=positive, default=5, help="N: alternating rounds; medians over them")
    ap.add_argument("--steps", type=positive, default=None, help="training steps per block (20 GPU, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per block (5 GPU, 1 CPU)")
    ap.add_argument(
        "--reverse-steps", type=positive, default=None, help="reverse steps per block (50 GPU, 4 CPU)"
    )
    ap.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/compare_reference-…")
    ap.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    return ap


def alternate(args: argparse.Namespace, net, ref_opt, module: SR3Module, batch: dict, meta: dict, out: Path):
    """N rounds, each timing both implementations with the order alternating; round 0 is a warm-up
    (compilation, cuDNN autotuning) and dropped. Returns the per-round seconds of training and reverse."""
    device, bf16 = torch.device(args.device), args.precision == "bf16-mixed"
    warmup, steps, k = meta["warmup"], meta["steps"], meta["reverse_steps"]
    cond = batch["lr_up"].to(device)
    train: dict[str, list[float]] = {"reference": [], "ours": []}
    reverse: dict[str, list[float]] = {"reference": [], "ours": []}
    for r in range(args.rounds + 1):
        for who in ("ours", "reference") if r % 2 else ("reference", "ours"):
            if who == "reference":
                t_ref = reference_train_block(net, ref_opt, batch, device, warmup, steps)
                rv_ref = reference_reverse_block(net, cond, k, device)
            else:
                t_ours = fit_blocks(module, args.precision, batch, device, warmup, steps, 1)[0]
                module.to(device)  # the Trainer's teardown may have moved it to the CPU
                rv_ours = our_reverse_block(module, cond, k, device, bf16)
        if r == 0:
            meta["ours_fast_paths"] = str(module.unet._fast_paths)
            continue
        for times, ref, ours in ((train, t_ref, t_ours), (reverse, rv_ref, rv_ours)):
            times["reference"].append(ref)
            times["ours"].append(ours)
        print(
            f"round {r}: train step ref {t_ref:.4f} s, ours {t_ours:.4f} s; "
            f"reverse step ref {rv_ref:.4f} s, ours {rv_ours:.4f} s"
        )
        write_results(out, meta, args.batch, train, reverse)  # partial results survive an interruption
    return train, reverse


def print_summary(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    print(f"\ndevice: {meta['device']}, torch {torch.__version__}, config {args.config}, batch {args.batch}")
    print(f"ours: precision {args.precision}, {meta['ours_fast_paths']}")
    print(f"{'':<13} {'reference s':>12} {'ours s':>10} {'ref img/s':>10} {'ours img/s':>11} {'ref/ours':>9}")
    for row in rows:
        print(
            f"{row['what']:<13} {row['reference_s']:>12.4f} {row['ours_s']:>10.4f} "
            f"{row['reference_images_per_s']:>10.2f} {row['ours_images_per_s']:>11.2f} "
            f"{row['ratio_reference_over_ours']:>8.2f}x"
        )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True  # the reference's sr.py setting; our Trainer sets it too
    elif args.compile_mode != "default":
        print(f"--compile-mode {args.compile_mode}: ours does not compile on the CPU (model.compile auto)")
    torch.manual_seed(0)
    np.random.seed(0)
    cfg, num_timesteps = CONFIGS[args.config]
    # our defaults: the fast paths for the device
    module = SR3Module(unet=cfg, num_timesteps=num_timesteps, compile_mode=args.compile_mode)
    net, ref_opt = build_reference(args.reference, args.config, module.unet.state_dict(), device)
    module.to(device)
    diff = forward_difference(net, module, device)
    print(f"same weights: max |ours - reference| of one fp32 forward = {diff:.2e}")
    meta = {"device": device_name(device), "torch": torch.__version__, "argv": sys.argv[1:]}
    meta |= {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "forward_max_abs_diff": diff}
    meta |= {"precision": args.precision, "steps": args.steps or (20 if gpu else 2)}
    meta |= {"warmup": args.warmup if args.warmup is not None else (5 if gpu else 1)}
    meta |= {"reverse_steps": args.reverse_steps or (50 if gpu else 4)}
    out = args.json or results_file(
        "compare_reference", device, args.config, args.precision, args.compile_mode
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    train, reverse = alternate(args, net, ref_opt, module, make_batch(cfg, args.batch), meta, out)
    print_summary(write_results(out, meta, args.batch, train, reverse), meta, args)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
