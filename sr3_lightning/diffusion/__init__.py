"""Diffusion math as pure functions of tensors.

Notation (the SR3 paper's, used everywhere in this package):

- ``x0``: the clean high-resolution image in [-1, 1]; ``x_t``: its noised version at step ``t``.
- ``eps``: the Gaussian noise the network predicts.
- ``t``: a diffusion step, 1-based in user-facing arguments (``t in 1..T``), 0-based as a tensor index.
- ``gamma_t``: alpha-bar, the cumulative product of ``1 - beta``; the reference calls it ``alphas_cumprod``.
- ``sqrt_gamma``: what the SR3 UNet receives as its noise level (a continuous value, not ``t``).
- ``cond``: the bicubic upsample of the low-resolution image (the batch key ``lr_up``; the reference's "SR").
"""

from sr3_lightning.diffusion.losses import denoising_loss, q_sample, sample_noise_level
from sr3_lightning.diffusion.sampling import (
    Denoiser,
    Generators,
    SampleResult,
    conditional_denoiser,
    gaussian_like,
    sample_ddim,
    sample_ddpm,
    sample_from_image,
)
from sr3_lightning.diffusion.schedule import BETA_SCHEDULES, Schedule, make_betas, make_schedule, respace

__all__ = [
    "BETA_SCHEDULES",
    "Denoiser",
    "Generators",
    "SampleResult",
    "Schedule",
    "conditional_denoiser",
    "denoising_loss",
    "gaussian_like",
    "make_betas",
    "make_schedule",
    "q_sample",
    "respace",
    "sample_ddim",
    "sample_ddpm",
    "sample_from_image",
    "sample_noise_level",
]
