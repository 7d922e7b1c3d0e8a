"""Diff-SR evaluation: bicubic vs Diff-SR at the calibrated level vs the full SR3 chain, per scale and domain.

Each validation HR image (at the model's size) is downsampled by each scale and bicubic-upsampled back, as
in ``diffsr-calibrate``; Diff-SR starts from the level ``--noise-level auto`` would pick from the PRF table;
the SR3 chain starts from pure noise, conditioned on the same bicubic upsample, with the sampler and
steps the table was calibrated with (all T steps: "SR3 full chain"; its native scale is
the one it was trained for; other scales are shown too, marked). Prints a Markdown table (PSNR / SSIM per
domain, LPIPS, LR consistency, the fidelity loss, network evaluations and seconds per image) and writes it,
the raw numbers and one example sheet per scale to ``--out``.

    python benchmarks/diffsr_eval.py --ckpt RUN/checkpoints/last.ckpt --data SHARDS/val --prf prf.json \\
        --scales 2,2.7,4,8 --native-scale 4 --out docs/diffsr
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from jsonargparse import ArgumentParser
from PIL import Image

from sr3_lightning.commands.diffsr_calibrate import degrade, load_hr_images, make_lpips, parse_scales
from sr3_lightning.commands.sample import load_model
from sr3_lightning.diffsr import TileGrid, bicubic_to, choose_level, diffsr, fidelity_loss, load_prf_table
from sr3_lightning.diffsr.tiling import seam_profile
from sr3_lightning.images import from_tensor, list_images, open_rgb, save_sheet, to_tensor
from sr3_lightning.metrics import consistency, lpips_distance, psnr, ssim, to_uint8

log = logging.getLogger("diffsr_eval")


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="diffsr_eval", description=__doc__)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="parent of the validation domains' shards")
    p.add_argument("--domains", type=str, default="photos,science")
    p.add_argument("--limit", type=int, default=16, help="images per domain")
    p.add_argument("--prf", type=Path, required=True, help="PRF table from diffsr-calibrate")
    p.add_argument("--scales", type=str, default="2,2.7,4,8")
    p.add_argument("--native-scale", type=float, default=4.0, help="the scale the checkpoint was trained for")
    p.add_argument("--lpips", type=bool, default=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiled-input", type=Path | None, default=None, help="images larger than the model")
    p.add_argument("--tiled-scale", type=float, default=4.0, help="their downsampling factor")
    p.add_argument("--tiled-limit", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("docs/diffsr"))
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def small(x: torch.Tensor) -> Image.Image:
    return from_tensor(x).resize((96, 96), Image.NEAREST)


def run(
    model, kind: str, up: torch.Tensor, level: float, table: dict, args
) -> tuple[torch.Tensor, int, float]:
    """(images, network evaluations per image, seconds) of one method on a batch of bicubic upsamples."""
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    up, eta = up.to(args.device), table.get("eta", 0.0)  # the sampler the table was calibrated with
    start = time.perf_counter()
    if kind == "bicubic":
        images, nfe = up, 0
    elif kind == "diffsr":
        res = diffsr(model, up, level, sampler=table["sampler"], steps=table["steps"], eta=eta, generator=gen)
        images, nfe = res.images, res.nfe
    else:
        res = model.super_resolve(up, table["sampler"], table["steps"], eta=eta, generator=gen)
        images, nfe = res.images, res.nfe
    return images.cpu(), nfe, time.perf_counter() - start


def chain_name(table: dict, num_timesteps: int) -> str:
    """The from-noise row runs the table's sampler: all T steps only when it was calibrated with them."""
    steps, sampler = table["steps"], table["sampler"]
    return "SR3 full chain" if steps in (None, num_timesteps) else f"SR3 from noise, {sampler} {steps}"


def evaluate(args) -> tuple[list[dict], dict[float, list[list[Image.Image]]]]:
    model = load_model(args.ckpt, args.device)
    table = load_prf_table(args.prf)
    domains = [d.strip() for d in args.domains.split(",")]
    names, hr = load_hr_images(args.data, domains, args.limit, model.sampling_unet.config.image_size)
    lpips_model, lpips_note = make_lpips(args.lpips, args.device)
    of_domain = {d: torch.tensor([n.startswith(d + "/") for n in names]) for d in domains}
    rows, sheets = [], {}
    for scale in parse_scales(args.scales):
        lr, up, effective = degrade(hr, scale)
        choice = choose_level(table, effective)
        prf = f"PRF {choice.prf[0]:.2f}-{choice.prf[1]:.2f}" if choice.prf else "no PRF"
        native = abs(scale - args.native_scale) < 1e-6
        methods = {
            "bicubic": "bicubic",
            f"Diff-SR, level {choice.level:.2f} ({prf})": "diffsr",
            chain_name(table, model.hparams.num_timesteps) + ("" if native else " (not its scale)"): "full",
        }
        outputs = {}
        for method, kind in methods.items():
            images, nfe, seconds = run(model, kind, up, choice.level, table, args)
            outputs[method] = images
            row = {"scale": scale, "effective_scale": effective, "lr_size": lr.shape[-1], "method": method}
            row.update(nfe=nfe, seconds_per_image=seconds / len(hr), lpips_note=lpips_note)
            for domain, mask in of_domain.items():
                sr8, hr8 = to_uint8(images[mask]), to_uint8(hr[mask])
                row[f"{domain}/psnr"] = psnr(sr8, hr8).mean().item()
                row[f"{domain}/ssim"] = ssim(sr8, hr8).mean().item()
            row["consistency"] = consistency(images, lr).clamp(max=100.0).mean().item()
            row["fidelity_loss"] = fidelity_loss(images, hr).mean().item()
            if lpips_model is not None:
                row["lpips"] = lpips_distance(lpips_model, images, hr).mean().item()
            rows.append(row)
            log.info("x%g %s: %s", scale, method, {k: v for k, v in row.items() if "/" in k})
        picks = [i for d in domains for i in torch.nonzero(of_domain[d]).flatten()[:2].tolist()]
        sheets[scale] = [
            [small(lr[i]), *(small(o[i]) for o in outputs.values()), small(hr[i])] for i in picks
        ]
    return rows, sheets


def tiled(args) -> tuple[str, list[list[Image.Image]]]:
    """Targets larger than the model: each image is downsampled by ``--tiled-scale`` and brought back to its
    size by Diff-SR in tiles, blended (overlap = model size / 4) and, for contrast, only abutting (overlap 0).
    Seams: mean |neighbour difference| across tile edges / elsewhere (``tiling.seam_profile``)."""
    model = load_model(args.ckpt, args.device)
    table = load_prf_table(args.prf)
    size = model.sampling_unet.config.image_size
    level = choose_level(table, args.tiled_scale).level
    stats: dict[int, list[tuple[float, ...]]] = {size // 4: [], 0: []}
    sheet = []
    files = list_images(args.tiled_input)[: args.tiled_limit]
    for path in files:
        with Image.open(path) as img:
            if min(img.size) <= size:
                raise ValueError(
                    f"{path}: {img.size[0]}x{img.size[1]} px fits in one {size} px tile; --tiled-input "
                    "needs images larger than the model on both sides"
                )
    for path in files:
        hr_img = open_rgb(path)
        w, h = hr_img.size
        lr_img = hr_img.resize((round(w / args.tiled_scale), round(h / args.tiled_scale)), Image.BICUBIC)
        up, hr = to_tensor(bicubic_to(lr_img, (w, h)))[None], to_tensor(hr_img)[None]
        row = [lr_img.resize((w, h), Image.NEAREST), from_tensor(up[0])]
        for overlap in stats:
            gen = torch.Generator(device=args.device).manual_seed(args.seed)
            res = diffsr(
                model,
                up.to(args.device),
                level,
                sampler=table["sampler"],
                steps=table["steps"],
                eta=table.get("eta", 0.0),
                overlap=overlap,
                generator=gen,
            )
            grid = TileGrid.plan(h, w, size, overlap)
            border, inside = seam_profile(res.images.cpu(), grid)
            hr_border, hr_inside = seam_profile(hr, grid)  # the same positions in the HR image: no tiles
            quality = psnr(to_uint8(res.images.cpu()), to_uint8(hr)).item()
            ratio, hr_ratio = border.mean() / inside.mean(), hr_border.mean() / hr_inside.mean()
            below_max = float(border.max() <= inside.max())
            stats[overlap].append((ratio.item(), hr_ratio.item(), below_max, quality, res.nfe))
            row.append(from_tensor(res.images[0]))
        sheet.append([*row, hr_img])
    lines = [
        f"x{args.tiled_scale:g} to {w}x{h} px, {size} px tiles, level {level:.2f}, {len(sheet)} images:\n",
        "| tiles | seam ratio: edge / elsewhere | same in HR | max edge <= max elsewhere | PSNR | NFE |",
        "|---|---|---|---|---|---|",
    ]
    for overlap, values in stats.items():
        ratio, hr_ratio, below_max, quality, nfe = (sum(v[i] for v in values) / len(values) for i in range(5))
        name = f"blended, overlap >= {overlap} px" if overlap else "abutting, no blending (contrast)"
        passed = f"{round(below_max * len(values))} / {len(values)} images"
        lines.append(f"| {name} | {ratio:.3f} | {hr_ratio:.3f} | {passed} | {quality:.2f} | {nfe:.0f} |")
    return "\n".join(lines), sheet


def markdown(rows: list[dict], domains: list[str]) -> str:
    lpips = "lpips" in rows[0]
    head = ["scale (LR px)", "method"]
    head += [f"PSNR {d}" for d in domains] + [f"SSIM {d}" for d in domains]
    head += ["LPIPS", "LR consistency (dB)", "L_fid", "NFE", "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"x{r['scale']:g} ({r['lr_size']})", r["method"]]
        cells += [f"{r[f'{d}/psnr']:.2f}" for d in domains] + [f"{r[f'{d}/ssim']:.3f}" for d in domains]
        cells += [
            f"{r['lpips']:.3f}" if lpips else "n/a",
            f"{r['consistency']:.1f}",
            f"{r['fidelity_loss']:.2f}",
        ]
        cells += [str(r["nfe"]), f"{r['seconds_per_image']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if not lpips:
        lines.append(f"\nLPIPS: {rows[0]['lpips_note']}.")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args()
    rows, sheets = evaluate(args)
    domains = [d.strip() for d in args.domains.split(",")]
    table = markdown(rows, domains)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.md").write_text(table + "\n")
    (args.out / "eval.json").write_text(json.dumps(rows, indent=1))
    titles = ["LR", "bicubic", "Diff-SR", "SR3 full", "HR"]
    for scale, sheet in sheets.items():
        save_sheet(sheet, titles, args.out / f"examples_x{scale:g}.png")
    if args.tiled_input is not None:
        text, sheet = tiled(args)
        print(text)
        (args.out / "tiling.md").write_text(text + "\n")
        save_sheet(
            sheet, ["LR", "bicubic", "Diff-SR tiled", "abutting", "HR"], args.out / "tiled_example.png"
        )


if __name__ == "__main__":
    main()
