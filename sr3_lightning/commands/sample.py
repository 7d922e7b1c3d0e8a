"""``sample``: super-resolve low-resolution images that have no high-resolution partner."""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch
from jsonargparse import ArgumentParser, Namespace
from PIL import Image
from tqdm.auto import tqdm

from sr3_lightning.commands import command_parser
from sr3_lightning.data.degradations import resize_and_crop
from sr3_lightning.diffusion.sampling import image_generator
from sr3_lightning.images import (
    check_out_folder,
    check_output_names,
    check_readable,
    from_tensor,
    list_images,
    open_rgb,
    save_sheet,
    shown_size,
    to_tensor,
)
from sr3_lightning.module import SR3Module

log = logging.getLogger(__name__)
SHEET_ROWS = 16  # sheet.png shows the first inputs; every result is its own PNG


def parser() -> ArgumentParser:
    p = command_parser("sample", __doc__)
    p.add_argument("--ckpt", type=Path, required=True, help="our checkpoint (.ckpt; see import-reference)")
    p.add_argument("--input", type=Path, required=True, help="an LR image or a folder of them")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--steps", type=int | None, default=None, help="respaced steps K (default: all T)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument(
        "--lr-size", type=int | None, default=None, help="first crop/resize inputs to this LR size"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="with the file name, seeds each image's noise")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def check_device(device: str) -> None:
    """A device this machine lacks is named as such (torch's error would blame the checkpoint)."""
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"--device {device}: {err}; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device; use --device cpu")


def load_model(ckpt: Path, device: str) -> SR3Module:
    """Our checkpoint, in eval mode, with a clear error for anything else (torch's own is misleading)."""
    check_device(device)
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"checkpoint {ckpt} does not exist; train one with `fit` or convert a reference "
            "checkpoint with `import-reference`."
        )
    if not zipfile.is_zipfile(ckpt):  # torch.save writes zip archives; a cut-off copy loses its directory
        raise ValueError(
            f"checkpoint {ckpt} is not a checkpoint sr3-lightning can read: it is not a PyTorch archive, "
            "so it is truncated (an interrupted copy or download) or another kind of file. Copy it again, or "
            "convert a reference *_gen.pth with `import-reference` first."
        )
    try:
        model = SR3Module.load_from_checkpoint(ckpt, map_location=device)
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, TypeError, AttributeError) as err:
        why = "its contents cannot be unpickled" if isinstance(err, pickle.UnpicklingError) else str(err)
        detail = " ".join(line.strip() for line in why.splitlines()[:2])[:400]  # state_dict: 1st mismatch
        raise ValueError(
            f"checkpoint {ckpt} is not an sr3-lightning checkpoint or is corrupt ({type(err).__name__}: "
            f"{detail or '-'}). Use a .ckpt written by `fit`, or convert "
            "reference *_gen.pth files with `import-reference` first."
        ) from None
    return model.eval()


def check_steps(steps: int | None, model: SR3Module) -> None:
    """Respacing can only keep steps the model's chain has."""
    total = model.hparams.num_timesteps
    if steps is not None and steps > total and model.hparams.objective == "diffusion":
        raise ValueError(f"--steps {steps}: this model's chain has {total} steps; use 1..{total}")


def check_args(args: Namespace) -> None:
    """Numbers that would fail late (or with a cryptic message) are refused before the model loads."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: use a positive number of images per batch, e.g. 8")
    if args.lr_size is not None and args.lr_size < 1:
        raise ValueError(f"--lr-size {args.lr_size}: use a positive size in px, or leave it out")
    check_sampler_flags(args.sampler, args.steps, args.eta)
    check_out_folder(args.out)


def check_sampler_flags(sampler: str, steps: int | None, eta: float) -> None:
    """``--steps`` / ``--eta`` of every sampling command, checked before the model loads."""
    if steps is not None and steps < 1:
        raise ValueError(f"--steps {steps}: use a positive number of steps, or leave it out for all T")
    if eta < 0:
        raise ValueError(f"--eta {eta}: DDIM's eta must be >= 0 (0 = deterministic, 1 = DDPM-like)")
    if eta and sampler != "ddim":
        log.warning("--eta %s is DDIM's; --sampler %s does not use it", eta, sampler)


def prepare_input(lr: Image.Image, hr_size: int, lr_size: int | None) -> tuple[Image.Image, Image.Image]:
    """(LR, bicubic upsample to the model's size) from an RGB input, made as the reference prepares data."""
    if lr_size is not None:
        lr = resize_and_crop(lr, lr_size)
    return lr, resize_and_crop(lr, hr_size)


def warn_about_shapes(files: list[Path], hr_size: int, lr_size: int | None) -> None:
    """SR3 works on squares of the model's size: what does not fit is cropped or shrunk, and said."""
    larger, cropped = [], []
    for path in files:
        with Image.open(path) as img:
            width, height = shown_size(img)
        name = f"{path.name} ({width}x{height})"
        if lr_size is None and min(width, height) > hr_size:
            larger.append(name)
        if width != height:
            cropped.append(name)
    if cropped:
        log.warning(
            "%d input(s) are not square; only their centre square is super-resolved: %s. "
            "`upscale` (Diff-SR) keeps the whole image",
            *(len(cropped), ", ".join(cropped[:5]) + (" ..." if len(cropped) > 5 else "")),
        )
    if larger:
        log.warning(
            "%d input(s) are larger than the model's %d px and are shrunk to it, not super-resolved: %s. "
            "For LR inputs pass --lr-size; to enlarge large images use `upscale` (Diff-SR, tiles)",
            *(len(larger), hr_size, ", ".join(larger[:5]) + (" ..." if len(larger) > 5 else "")),
        )


def check_conditional(model: SR3Module, ckpt: Path) -> None:
    """``sample`` conditions on the LR image; an unconditional model would fail inside its first step."""
    channels = model.sampling_unet.config.in_channel
    if channels != 6:
        raise ValueError(
            f"{ckpt} holds an unconditional model (its UNet takes {channels} channels, SR3 takes 6: "
            "the LR upsample and the noisy image); `sample` needs SR3. `upscale` (Diff-SR) runs it."
        )


def main(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    check_args(args)
    files = list_images(args.input)
    check_output_names(files, "_sr.png")
    check_readable(files)
    model = load_model(args.ckpt, args.device)
    check_conditional(model, args.ckpt)
    check_steps(args.steps, model)
    hr_size = model.unet.config.image_size
    warn_about_shapes(files, hr_size, args.lr_size)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, nfe = [], 0
    for start in tqdm(range(0, len(files), args.batch_size), desc="super-resolving", unit="batch"):
        batch = files[start : start + args.batch_size]
        pairs = [prepare_input(open_rgb(f), hr_size, args.lr_size) for f in batch]
        lr_up = torch.stack([to_tensor(up) for _, up in pairs]).to(args.device)
        gens = [image_generator(args.seed, f.name, args.device) for f in batch]
        result = model.super_resolve(lr_up, args.sampler, args.steps, args.eta, generator=gens, progress=True)
        nfe = result.nfe
        for path, (lr, up), sr in zip(batch, pairs, result.images):
            sr_img = from_tensor(sr)
            sr_img.save(args.out / f"{path.stem}_sr.png")
            if len(rows) < SHEET_ROWS:
                rows.append([lr.resize(up.size, Image.NEAREST), up, sr_img])
    save_sheet(rows, ["LR", "bicubic", "SR"], args.out / "sheet.png")
    shown = "" if len(files) <= SHEET_ROWS else f" (the sheet shows the first {SHEET_ROWS})"
    log.info(
        "wrote %d images and sheet.png%s to %s (%d network evaluations each)",
        len(files),
        shown,
        args.out,
        nfe,
    )
