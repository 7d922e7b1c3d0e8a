"""``upscale``: Diff-SR, any image to any scale > 1 (non-integer too) with a pre-trained diffusion model.

Each input is bicubic-upsampled to the target, noised to the chosen level and denoised from there.
Targets up to the model's size run in one pass; larger ones in overlapping tiles of the model's size,
blended at every step so tiles leave no seams. ``--noise-level auto`` interpolates a PRF table written by
``diffsr-calibrate`` for the input's scale and says when that scale has no PRF.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace
from PIL import Image
from tqdm.auto import tqdm

from sr3_lightning.commands import command_parser
from sr3_lightning.commands.sample import check_sampler_flags, check_steps, load_model
from sr3_lightning.diffsr.noise_level import choose_level, load_prf_table, parse_noise_level
from sr3_lightning.diffsr.upscale import (
    SAMPLERS,
    bicubic_to,
    check_model,
    check_scale,
    diffsr,
    is_conditional,
    parse_size,
    target_size,
)
from sr3_lightning.diffusion.sampling import image_generator
from sr3_lightning.images import (
    check_out_folder,
    check_output_names,
    check_readable,
    from_tensor,
    list_images,
    open_rgb,
    shown_size,
    to_tensor,
)
from sr3_lightning.module import SR3Module

log = logging.getLogger(__name__)
LEVEL_TOLERANCE = 0.05  # a start level this far from the requested one is worth a warning


def parser() -> ArgumentParser:
    p = command_parser("upscale", __doc__)
    p.add_argument("--ckpt", type=Path, required=True, help="our checkpoint (.ckpt), SR3 or unconditional")
    p.add_argument("--input", type=Path, required=True, help="an image or a folder of images, any size")
    p.add_argument("--out", type=Path, required=True, help="output folder: <name>_diffsr.png + upscale.json")
    p.add_argument("--scale", type=float | None, default=None, help="upscaling factor > 1, e.g. 2.7")
    p.add_argument("--size", type=str | None, default=None, help="target WIDTHxHEIGHT instead of --scale")
    p.add_argument(
        "--noise-level", type=str, default="auto", help="'auto' (needs --prf) or a level in [0, 1]"
    )
    p.add_argument("--prf", type=Path | None, default=None, help="PRF table from diffsr-calibrate (for auto)")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="ddpm")
    p.add_argument("--steps", type=int | None, default=None, help="respaced steps K (default: all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--tile-overlap", type=int | None, default=None, help="px (default: model size / 4)")
    p.add_argument("--seed", type=int, default=0, help="with the file name, seeds each image's noise")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_args(args: Namespace) -> tuple[float | str, tuple[int, int] | None, dict | None]:
    """Validate everything before the model is loaded: (level or 'auto', size or None, PRF table or None)."""
    level = parse_noise_level(args.noise_level)
    if (args.scale is None) == (args.size is None):
        raise ValueError("give exactly one of --scale S (e.g. 2.7) or --size WxH (e.g. 128x96)")
    size = parse_size(args.size) if args.size is not None else None
    if args.scale is not None:
        check_scale(args.scale)
    check_sampler_flags(args.sampler, args.steps, args.eta)
    if args.tile_overlap is not None and args.tile_overlap < 0:
        raise ValueError(f"--tile-overlap {args.tile_overlap}: use 0 or more px, or leave it out (size / 4)")
    check_out_folder(args.out)
    table = None
    if level == "auto":
        if args.prf is None:
            raise ValueError(
                "--noise-level auto needs a PRF table: run `diffsr-calibrate --ckpt X --data SHARDS --out "
                "prf.json` and pass --prf prf.json, or give a level in [0, 1], e.g. --noise-level 0.3"
            )
        table = load_prf_table(args.prf)
    elif args.prf is not None:
        log.warning("--prf %s is not used: --noise-level %s is given; only 'auto' reads it", args.prf, level)
    return level, size, table


def load_diffsr_model(ckpt: Path, device: str, steps: int | None) -> SR3Module:
    """A checkpoint Diff-SR can run, refused with its path and the fix before any image is made."""
    model = load_model(ckpt, device)
    try:
        check_model(model)
    except ValueError as err:
        raise ValueError(
            f"--ckpt {ckpt}: {err}; use a checkpoint of a `fit` run with model.objective diffusion (the "
            "default) or one converted with `import-reference`"
        ) from None
    check_steps(steps, model)
    return model


def schedule_of(model: SR3Module) -> dict[str, Any]:
    """What a noise level means for this model: a PRF table holds it, and is compared on use."""
    return {k: model.hparams[k] for k in ("beta_schedule", "num_timesteps", "beta_start", "beta_end")}


def warn_if_table_differs(
    table: dict, prf: Path, model: SR3Module, sampler: str, steps: int | None, eta: float
) -> None:
    """A table calibrated elsewhere still runs, with a warning naming what differs."""
    size = model.sampling_unet.config.image_size
    if table.get("image_size") != size:
        log.warning(
            "%s was calibrated for a %s px model; this one is %d px", prf, table.get("image_size"), size
        )
    if "schedule" in table and table["schedule"] != schedule_of(model):
        log.warning(
            "%s was calibrated on a model with the noise schedule %s; this one has %s, so a level means "
            "other noise here and the table's levels do not carry over: run diffsr-calibrate on this model",
            *(prf, table["schedule"], schedule_of(model)),
        )
    if (table.get("sampler"), table.get("steps"), table.get("eta", 0.0)) != (sampler, steps, eta):
        log.warning(
            "%s was calibrated with --sampler %s --steps %s --eta %s; levels are fractions of the chain and "
            "carry over, but the PRF may shift a little",
            *(prf, table.get("sampler"), table.get("steps"), table.get("eta", 0.0)),
        )


def check_targets(files: list[Path], scale: float | None, size: tuple[int, int] | None) -> None:
    """A target that does not enlarge some input fails now, not after the earlier outputs were made."""
    for path in files:
        with Image.open(path) as img:
            try:
                target_size(shown_size(img), scale, size)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None


def earlier_records(out: Path) -> list[dict]:
    """Records of earlier runs into ``out`` whose images are still there, each with the settings it was
    made with (an image made again replaces its record as it is written)."""
    path = out / "upscale.json"
    if not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
        settings = {k: v for k, v in saved.items() if k != "images"}
        records = [{**settings, **r} for r in saved["images"]]
        names = [Path(r["output"]).name for r in records]
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"{path} cannot be read ({type(err).__name__}: {err}); move it away or choose another --out"
        ) from None
    return [r for r, name in zip(records, names) if (out / name).is_file()]


def merged(earlier: list[dict], records: list[dict]) -> list[dict]:
    """The earlier records whose image was not made again (by file name), then this run's."""
    done = {Path(r["output"]).name for r in records}
    return [r for r in earlier if Path(r["output"]).name not in done] + records


def write_records(out: Path, settings: dict, records: list[dict]) -> None:
    """``upscale.json``, replaced whole after each image: a run stopped part-way keeps the records of the
    images it wrote, and a reader never sees half a file."""
    part = out / "upscale.json.part"
    part.write_text(json.dumps({**settings, "images": records}, indent=1))
    part.replace(out / "upscale.json")


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    level_arg, size, table = check_args(args)
    files = list_images(args.input)
    check_output_names(files, "_diffsr.png")
    check_readable(files)
    check_targets(files, args.scale, size)
    model = load_diffsr_model(args.ckpt, args.device, args.steps)
    if table is not None:
        warn_if_table_differs(table, args.prf, model, args.sampler, args.steps, args.eta)
    conditional = is_conditional(model)
    mode = "SR3, conditioned on the bicubic upsample" if conditional else "unconditional"
    outputs = {path: args.out / f"{path.stem}_diffsr.png" for path in files}
    earlier = earlier_records(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint": str(args.ckpt), "model": mode, "sampler": args.sampler, "steps": args.steps}
    settings |= {"eta": args.eta, "seed": args.seed}
    records = []
    for path in tqdm(files, desc="upscaling", unit="image", disable=len(files) == 1):
        img = open_rgb(path)
        target, scale = target_size(img.size, args.scale, size)
        level, note, no_prf = level_arg, "given", False
        if level_arg == "auto":
            choice = choose_level(table, scale)
            level, note, no_prf = choice.level, choice.note, choice.prf is None
        up = to_tensor(bicubic_to(img, target))[None].to(args.device)
        start = time.perf_counter()
        result = diffsr(
            model,
            up,
            level,
            sampler=args.sampler,
            steps=args.steps,
            eta=args.eta,
            overlap=args.tile_overlap,
            generator=image_generator(args.seed, path.name, args.device),
            progress=True,
        )
        seconds = time.perf_counter() - start
        out = outputs[path]
        from_tensor(result.images[0]).save(out)
        log.log(
            logging.WARNING if no_prf else logging.INFO,  # the note says there is no PRF and what that means
            "%s: %dx%d -> %dx%d (x%.3g), %s, noise level %.3f (%s) = step %d, %d network evaluations",
            *(path.name, *img.size, *target, scale, result.tiling, level, note, result.t_start, result.nfe),
        )
        if abs(result.level - level) > LEVEL_TOLERANCE:
            log.warning(
                "%s: the chain kept no step near noise level %.3f, so it started at level %.3f; "
                "more --steps put a kept step closer",
                *(path.name, level, result.level),
            )
        records.append(
            {
                **settings,
                "input": str(path),
                "output": str(out),
                "input_size": list(img.size),
                "target_size": list(target),
                "scale": scale,
                "noise_level": level,
                "level_note": note,
                "noise_level_used": result.level,
                "t_start": result.t_start,
                "nfe": result.nfe,
                "tiling": result.tiling,
                "seconds": seconds,
            }
        )
        write_records(args.out, settings, merged(earlier, records))
    kept = len(merged(earlier, records)) - len(records)
    kept_note = f", keeping the records of {kept} earlier images there" if kept else ""
    log.info("wrote %d images and upscale.json to %s (model: %s)%s", len(records), args.out, mode, kept_note)
