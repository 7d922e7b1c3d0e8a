"""Diff-SR with our models: bicubic to the target size, noise to level t, reverse chain from t.

x_t = sqrt(gamma_t) x_up + sqrt(1 - gamma_t) eps, then t reverse steps (``diffusion.sample_from_image``).
An SR3 checkpoint (UNet ``in_channel == 6``) is conditioned on the same bicubic upsample ``x_up``, tile by
tile; an unconditional one (``in_channel == 3``) runs the plain denoiser ``unet(x_t, sqrt_gamma)``. Targets
up to the model's size run in one pass (replicate-padded to the model's size, cropped back); larger
targets run in overlapping tiles of the model's size blended at every step (``tiling.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from sr3_lightning.diffsr.noise_level import level_to_step, step_to_level
from sr3_lightning.diffsr.tiling import TileGrid, pad_to_tile, tiled_denoiser
from sr3_lightning.diffusion import Generators, respace, sample_from_image
from sr3_lightning.models.eval_mode import eval_mode
from sr3_lightning.module import SR3Module

SAMPLERS = ("ddpm", "ddim")


@dataclass
class DiffSRResult:
    """Images ``[B, 3, H, W]``, the 1-based start step, network evaluations per image, the tiling, and the
    noise level the chain started at (the requested one moved to the nearest step the chain keeps)."""

    images: Tensor
    t_start: int
    nfe: int
    tiling: str
    level: float


# ------------------------------------------------------------------------------------------ targets
def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H), positive integers."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"--size {text!r}: use WIDTHxHEIGHT in pixels, e.g. 128x96")
    return int(match[1]), int(match[2])


def check_scale(scale: float) -> float:
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 1.0):
        raise ValueError(
            f"scale {scale!r}: Diff-SR upscales, use a factor > 1 (non-integer is fine, e.g. 2.7)"
        )
    return float(scale)


def target_size(
    input_size: tuple[int, int], scale: float | None = None, size: tuple[int, int] | None = None
) -> tuple[tuple[int, int], float]:
    """((W, H), effective scale) for an input of ``input_size`` (w, h): ``round(w * s), round(h * s)`` for a
    scale, or the given size; exactly one of the two. The effective scale is ``max(W / w, H / h)`` either way
    (the bicubic resize covers the target, then is centre-cropped): whole pixels make it differ from a
    requested scale (x2.5 of 1 px is 2 px), and it is the scale the noise level must suit."""
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of --scale S or --size WxH")
    w, h = input_size
    if scale is not None:
        scale = check_scale(scale)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
    effective = max(size[0] / w, size[1] / h)
    if effective <= 1.0:
        asked = (
            f"--scale {scale:g} (to {size[0]}x{size[1]})"
            if scale is not None
            else f"--size {size[0]}x{size[1]}"
        )
        raise ValueError(f"{asked} does not enlarge the {w}x{h} input; Diff-SR upscales (factor > 1)")
    return size, effective


def bicubic_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL bicubic resize covering ``size`` (W, H), centre-cropped to it (``resize_and_crop``, any aspect)."""
    w, h = img.size
    factor = max(size[0] / w, size[1] / h)
    cover = (max(size[0], round(w * factor)), max(size[1], round(h * factor)))
    img = img.resize(cover, Image.Resampling.BICUBIC)
    left, top = round((cover[0] - size[0]) / 2), round((cover[1] - size[1]) / 2)
    return img.crop((left, top, left + size[0], top + size[1])) if cover != size else img


# --------------------------------------------------------------------------------------------- model
def check_model(module: SR3Module) -> None:
    """Diff-SR needs a diffusion UNet with 6 (SR3: cond + x_t) or 3 (unconditional) input channels."""
    if module.hparams.get("objective", "diffusion") != "diffusion":
        raise ValueError(
            "this checkpoint is the one-step regression baseline; Diff-SR needs a diffusion model"
        )
    channels = module.sampling_unet.config.in_channel
    if channels not in (3, 6):
        raise ValueError(
            f"UNet in_channel={channels}: Diff-SR supports 6 (SR3, conditional) or 3 (unconditional)"
        )


def is_conditional(module: SR3Module) -> bool:
    """An SR3 checkpoint sees the bicubic upsample beside x_t; an unconditional one sees x_t alone."""
    return module.sampling_unet.config.in_channel == 6


@torch.no_grad()
def diffsr(
    module: SR3Module,
    up: Tensor,
    level: float,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    overlap: int | None = None,
    generator: Generators = None,
    max_batch: int = 64,
    progress: bool = False,
) -> DiffSRResult:
    """Diff-SR on bicubic upsamples ``up`` ``[B, 3, H, W]`` in [-1, 1], any H, W, at a noise level in [0, 1].

    ``steps`` respaces the chain to K steps (the level then maps to the nearest kept step); ``overlap`` is
    the tile overlap in px (default a quarter of the model's size). Level 0 returns ``up`` unchanged.
    """
    check_model(module)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    tile = module.sampling_unet.config.image_size
    overlap = tile // 4 if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap}: use 0 <= overlap < the model's size {tile}")
    schedule = module.schedule.to(up.device)
    train_steps = schedule.num_timesteps
    if steps is not None and steps != train_steps:
        schedule = respace(schedule, steps)
    t_start = level_to_step(level, schedule, train_steps)
    height, width = up.shape[-2:]
    padded = pad_to_tile(up, tile)
    grid = TileGrid.plan(padded.shape[-2], padded.shape[-1], tile, overlap)
    tiling = grid.describe() + (
        f" (padded to {padded.shape[-1]}x{padded.shape[-2]})" if padded is not up else ""
    )
    with eval_mode(module.sampling_unet) as unet:
        denoise = tiled_denoiser(unet, padded if is_conditional(module) else None, grid, max_batch)
        result = sample_from_image(
            denoise,
            padded,
            schedule,
            t_start,
            sampler=sampler,
            eta=eta,
            generator=generator,
            progress=progress,
        )
    return DiffSRResult(
        result.images[..., :height, :width],
        t_start,
        result.nfe * grid.count,
        tiling,
        step_to_level(t_start, schedule, train_steps),
    )
