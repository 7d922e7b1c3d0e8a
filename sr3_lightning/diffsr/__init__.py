"""Diff-SR: arbitrary-scale super-resolution with a pre-trained diffusion model, without fine-tuning.

Bicubic-upsample to the target size, inject noise up to a step t, run the reverse chain from t
(Li et al. 2023, "Dissecting arbitrary-scale super-resolution capability from pre-trained diffusion
generative models"). ``noise_level`` picks t (the PRF), ``tiling`` covers targets larger than the model,
``upscale`` is the pipeline. See ``docs/diffsr.md``.
"""

from sr3_lightning.diffsr.noise_level import (
    NoiseChoice,
    choose_level,
    fidelity_loss,
    find_prf,
    level_to_step,
    load_prf_table,
    signature_loss,
    step_to_level,
)
from sr3_lightning.diffsr.tiling import TileGrid, tiled_denoiser
from sr3_lightning.diffsr.upscale import DiffSRResult, bicubic_to, diffsr, target_size

__all__ = [
    "DiffSRResult",
    "NoiseChoice",
    "TileGrid",
    "bicubic_to",
    "choose_level",
    "diffsr",
    "fidelity_loss",
    "find_prf",
    "level_to_step",
    "load_prf_table",
    "signature_loss",
    "step_to_level",
    "target_size",
    "tiled_denoiser",
]
