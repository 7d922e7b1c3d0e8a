"""``diffsr-calibrate``: find Diff-SR's Perceptual Recoverable Field (PRF) per scale on HR images.

Each HR image (at the model's size) is downsampled by each scale (PIL bicubic, as the dataset tool) and
bicubic-upsampled back; for every noise level of a grid Diff-SR runs from that level, and the signature
loss, the fidelity loss (definitions in ``diffsr/noise_level.py`` and ``docs/diffsr.md``), PSNR, SSIM,
LPIPS and LR consistency are averaged over the images. Per scale the table records the PRF and the chosen
level; ``upscale --noise-level auto --prf TABLE`` interpolates it. One plot per scale (PNG, and to W&B
when a run is active) shows both losses and the metrics against the level with the PRF shaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from jsonargparse import ArgumentParser, Namespace
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from sr3_lightning.commands import command_parser
from sr3_lightning.commands.sample import check_sampler_flags
from sr3_lightning.commands.upscale import load_diffsr_model, schedule_of
from sr3_lightning.data.degradations import resize_and_crop
from sr3_lightning.data.shards import INDEX_NAME, SampleReader, ShardIndex, locate_samples
from sr3_lightning.diffsr.noise_level import (
    OMEGA,
    TABLE_FORMAT,
    TAU_FIDELITY,
    TAU_SIGNATURE,
    ScaleSweep,
    check_level,
    fidelity_loss,
    find_prf,
    signature_loss,
)
from sr3_lightning.diffsr.upscale import SAMPLERS, check_scale, diffsr, is_conditional
from sr3_lightning.diffusion.sampling import image_generator
from sr3_lightning.images import to_tensor
from sr3_lightning.metrics import (
    LpipsWeightsMissing,
    build_lpips,
    consistency,
    lpips_distance,
    psnr,
    ssim,
    to_uint8,
)
from sr3_lightning.module import SR3Module

log = logging.getLogger(__name__)


def parser() -> ArgumentParser:
    p = command_parser("diffsr-calibrate", __doc__)
    p.add_argument("--ckpt", type=Path, required=True, help="our checkpoint (.ckpt), SR3 or unconditional")
    p.add_argument(
        "--data", type=Path, required=True, help="a domain's shard directory, or a parent of several"
    )
    p.add_argument("--domains", type=str | None, default=None, help="comma list of domains (default: all)")
    p.add_argument("--limit", type=int, default=8, help="HR images per domain (the first in index order)")
    p.add_argument("--scales", type=str, default="2,2.7,4,8", help="comma list of factors > 1")
    p.add_argument("--levels", type=str, default="0:1:0.05", help="grid START:STOP:STEP or a comma list")
    p.add_argument("--out", type=Path, required=True, help="the PRF table (JSON)")
    p.add_argument("--plots", type=Path | None, default=None, help="plot folder (default: beside --out)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm")
    p.add_argument("--steps", type=int | None, default=None, help="respaced steps K (default: all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--omega", type=float, default=OMEGA, help="weight of the signature loss in J")
    p.add_argument("--tau-signature", type=float, default=TAU_SIGNATURE, help="PRF bound on L_sig")
    p.add_argument("--tau-fidelity", type=float, default=TAU_FIDELITY, help="PRF bound on L_fid")
    p.add_argument(
        "--lpips", type=bool, default=True, help="measure LPIPS (skipped with a note if no weights)"
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--scales {text!r}: use a comma list of factors > 1, e.g. 2,2.7,4,8") from None
    if not scales:
        raise ValueError(f"--scales {text!r}: give at least one factor > 1")
    return [check_scale(s) for s in scales]


def parse_levels(text: str) -> list[float]:
    """'START:STOP:STEP' (STOP included) or 'a,b,c'; each a noise level in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if step <= 0:
                raise ValueError
            levels = list(np.round(np.arange(start, stop + step / 2, step), 6))
        else:
            levels = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--levels {text!r}: use START:STOP:STEP (e.g. 0:1:0.05) or a comma list") from None
    if not levels:
        raise ValueError(f"--levels {text!r}: the grid is empty")
    return sorted({check_level(float(v)) for v in levels})


def load_hr_images(data: Path, domains: list[str] | None, limit: int, size: int) -> tuple[list[str], Tensor]:
    """The first ``limit`` HR images per domain at ``size`` px: (names ``domain/key``, ``[N, 3, S, S]``)."""
    if not data.is_dir():
        raise FileNotFoundError(f"--data {data} does not exist; pass a shard directory made by make_shards")
    paths = [data / INDEX_NAME] if (data / INDEX_NAME).is_file() else sorted(data.glob(f"*/{INDEX_NAME}"))
    indexes = [ShardIndex.read(p) for p in paths]
    if domains is not None:
        missing = sorted(set(domains) - {i.domain for i in indexes})
        if missing:
            raise FileNotFoundError(f"--data {data} has no shards for domain(s) {missing}")
        indexes = [i for i in indexes if i.domain in domains]
    if not indexes:
        raise FileNotFoundError(f"--data {data} holds no {INDEX_NAME} (itself or one level down)")
    small = [f"{i.domain} ({i.hr_size} px)" for i in indexes if i.hr_size < size]
    if small:
        raise ValueError(
            f"--data {data}: the HR images of {', '.join(small)} are smaller than the model's {size} px; "
            "calibrating on enlarged images measures nothing. Make shards at the model's size "
            f"(make_shards --hr {size}) or leave these domains out (--domains)"
        )
    names, images = [], []
    for index in indexes:
        hint = "leave the bad samples out: drop the domain from --domains or lower --limit"
        reader = SampleReader(locate_samples(index, index.keys[:limit], skip_hint=hint))
        for i, key in enumerate(reader.table.keys):
            hr = Image.fromarray(reader.read(i)["hr"].transpose(1, 2, 0))
            images.append(to_tensor(resize_and_crop(hr, size) if hr.size != (size, size) else hr))
            names.append(f"{index.domain}/{key}")
    return names, torch.stack(images)


def degrade(hr: Tensor, scale: float) -> tuple[Tensor, Tensor, float]:
    """HR ``[N, 3, S, S]`` -> (LR of round(S / scale) px, its bicubic upsample to S, effective scale)."""
    size = hr.shape[-1]
    lr_size = max(1, round(size / scale))
    lrs, ups = [], []
    for x in hr:
        img = Image.fromarray(to_uint8(x[None])[0].permute(1, 2, 0).numpy())
        lr = resize_and_crop(img, lr_size)
        lrs.append(to_tensor(lr))
        ups.append(to_tensor(resize_and_crop(lr, size)))
    return torch.stack(lrs), torch.stack(ups), size / lr_size


def sweep_scale(
    model: SR3Module,
    hr: Tensor,
    names: list[str],
    scale: float,
    levels: list[float],
    args: Namespace,
    lpips_model: torch.nn.Module | None,
) -> ScaleSweep:
    """Diff-SR from every level on all images; the mean of each loss and metric per level. Each image's
    noise comes from --seed and its name, the same at every level and for any --batch-size."""
    lr, up, effective = degrade(hr, scale)
    rows: dict[str, list[float]] = {k: [] for k in ("sig", "fid", "psnr", "ssim", "lpips", "cons")}
    steps = []
    for level in tqdm(levels, desc=f"x{scale:g}", unit="level"):
        out = []
        for start in range(0, len(hr), args.batch_size):
            gen = [image_generator(args.seed, n, args.device) for n in names[start : start + args.batch_size]]
            chunk = up[start : start + args.batch_size].to(args.device)
            res = diffsr(
                model, chunk, level, sampler=args.sampler, steps=args.steps, eta=args.eta, generator=gen
            )
            out.append(res.images.cpu())
        steps.append(res.t_start)
        sr = torch.cat(out)
        rows["sig"].append(signature_loss(sr, lr).mean().item())
        rows["fid"].append(fidelity_loss(sr, hr).mean().item())
        rows["psnr"].append(psnr(to_uint8(sr), to_uint8(hr)).mean().item())
        rows["ssim"].append(ssim(to_uint8(sr), to_uint8(hr)).mean().item())
        rows["cons"].append(consistency(sr, lr).clamp(max=100.0).mean().item())
        if lpips_model is not None:
            rows["lpips"].append(lpips_distance(lpips_model, sr, hr).mean().item())
    prf = find_prf(levels, rows["sig"], rows["fid"], args.omega, args.tau_signature, args.tau_fidelity)
    return ScaleSweep(
        scale=scale,
        effective_scale=effective,
        lr_size=lr.shape[-1],
        levels=levels,
        steps=steps,
        signature=rows["sig"],
        fidelity=rows["fid"],
        objective=[f + args.omega * s for f, s in zip(rows["fid"], rows["sig"])],
        psnr=rows["psnr"],
        ssim=rows["ssim"],
        lpips=rows["lpips"] if lpips_model is not None else None,
        consistency=rows["cons"],
        prf=prf.range,
        admissible=prf.admissible,
        level=prf.level,
    )


def plot_sweep(sweep: ScaleSweep, args: Namespace, path: Path) -> Path:
    """Losses (left) and metrics (right) against the noise level; PRF shaded, chosen level dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(10, 3.6))
    sig = [args.omega * s for s in sweep.signature]
    ax_l.plot(sweep.levels, sweep.fidelity, "o-", ms=3, label="fidelity loss $L_{fid}$")
    ax_l.plot(sweep.levels, sig, "s-", ms=3, label=rf"$\omega L_{{sig}}$ ($\omega$={args.omega:g})")
    ax_l.plot(sweep.levels, sweep.objective, "k-", lw=1, label=r"$J = L_{fid} + \omega L_{sig}$")
    ax_l.axhline(args.tau_fidelity, color="C0", ls=":", lw=1, label=r"$\tau_{fid}$")
    ax_l.axhline(args.omega * args.tau_signature, color="C1", ls=":", lw=1, label=r"$\omega\,\tau_{sig}$")
    ax_l.set(xlabel="noise level (t / T)", ylabel="loss", ylim=(0, max(1.05, min(3.0, max(sig) * 1.05))))
    ax_l.legend(fontsize=7)
    ax_m.plot(sweep.levels, sweep.psnr, "o-", ms=3, color="C2", label="PSNR (dB)")
    ax_m.set(xlabel="noise level (t / T)", ylabel="PSNR (dB)")
    ax_s = ax_m.twinx()
    ax_s.plot(sweep.levels, sweep.ssim, "s-", ms=3, color="C3", label="SSIM")
    if sweep.lpips is not None:
        ax_s.plot(sweep.levels, sweep.lpips, "^-", ms=3, color="C4", label="LPIPS")
    ax_s.set(ylabel="SSIM" + (" / LPIPS" if sweep.lpips is not None else " (LPIPS off)"))
    lines = ax_m.get_legend_handles_labels()[0] + ax_s.get_legend_handles_labels()[0]
    ax_m.legend(lines, [ln.get_label() for ln in lines], fontsize=7, loc="lower left")
    for ax in (ax_l, ax_m):
        if sweep.prf is not None:
            ax.axvspan(*sweep.prf, color="green", alpha=0.12, lw=0)
        ax.axvline(sweep.level, color="k", ls="--", lw=1)
    prf = f"PRF {sweep.prf[0]:.2f}-{sweep.prf[1]:.2f}" if sweep.prf is not None else "no PRF"
    fig.suptitle(
        f"Diff-SR x{sweep.scale:g} ({sweep.lr_size} px -> {round(sweep.lr_size * sweep.effective_scale)} px)"
        f": {prf}, chosen level {sweep.level:.2f}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def log_plots_to_wandb(plots: dict[float, Path]) -> None:
    """Send the plots to the active W&B run, if any (never starts one)."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({f"diffsr/prf_x{scale:g}": wandb.Image(str(path)) for scale, path in plots.items()})


def make_lpips(enabled: bool, device: str) -> tuple[torch.nn.Module | None, str]:
    if not enabled:
        return None, "off (--lpips false)"
    try:
        return build_lpips(device), "on"
    except LpipsWeightsMissing as err:
        log.warning("LPIPS skipped: %s", err)
        return None, "skipped: AlexNet weights not available offline"


def check_args(args: Namespace) -> tuple[list[float], list[float], Path]:
    """Everything that can be wrong before the model loads: (scales, levels, plot folder)."""
    scales, levels = parse_scales(args.scales), parse_levels(args.levels)
    if args.limit < 1 or args.batch_size < 1:
        raise ValueError(f"--limit {args.limit} / --batch-size {args.batch_size}: use positive numbers")
    check_sampler_flags(args.sampler, args.steps, args.eta)
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; name the table's file, e.g. {args.out / 'prf.json'}")
    plots = args.plots or args.out.parent / f"{args.out.stem}_plots"
    if plots.exists() and not plots.is_dir():
        raise ValueError(f"the plot folder {plots} is a file; choose another with --plots")
    return scales, levels, plots


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    scales, levels, plots_dir = check_args(args)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] if args.domains else None
    model = load_diffsr_model(args.ckpt, args.device, args.steps)
    size = model.sampling_unet.config.image_size
    names, hr = load_hr_images(args.data, domains, args.limit, size)
    lpips_model, lpips_note = make_lpips(args.lpips, args.device)
    log.info(
        "calibrating on %d HR images of %d px, %d levels x %d scales",
        len(names),
        size,
        len(levels),
        len(scales),
    )
    sweeps, plots = [], {}
    for scale in scales:
        sweep = sweep_scale(model, hr, names, scale, levels, args, lpips_model)
        sweeps.append(sweep)
        plots[scale] = plot_sweep(sweep, args, plots_dir / f"prf_x{scale:g}.png")
        prf = f"PRF {sweep.prf[0]:.2f}..{sweep.prf[1]:.2f}" if sweep.prf else "NO PRF (best trade-off used)"
        log.info("x%g (LR %d px): %s, chosen level %.2f", scale, sweep.lr_size, prf, sweep.level)
    table = {
        "format": TABLE_FORMAT,
        "version": 1,
        "checkpoint": str(args.ckpt),
        "image_size": size,
        "num_timesteps": model.schedule.num_timesteps,
        "schedule": schedule_of(model),
        "conditional": is_conditional(model),
        "sampler": args.sampler,
        "steps": args.steps,
        "eta": args.eta,
        "seed": args.seed,
        "omega": args.omega,
        "tau_signature": args.tau_signature,
        "tau_fidelity": args.tau_fidelity,
        "lpips": lpips_note,
        "data": str(args.data),
        "images": names,
        "scales": [s.to_dict() for s in sweeps],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1))
    log_plots_to_wandb(plots)
    log.info("wrote %s and %d plots to %s", args.out, len(plots), plots_dir)
