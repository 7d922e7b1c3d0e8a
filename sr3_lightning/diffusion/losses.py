"""The training objectives: SR3's continuous noise levels, q_sample and L1/L2 noise-prediction loss, and
the one-step regression baseline that trains the same UNet to map the upsample straight to HR."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from sr3_lightning.diffusion.schedule import Schedule

LossKind = Literal["l1", "l2"]
TSampling = Literal["batch", "sample"]
# The regression baseline feeds the UNet's noisy-image channels zeros and its noise level this value.
REGRESSION_NOISE_LEVEL = 1.0


def check_t_range(t_min: int, t_max: int, num_timesteps: int) -> None:
    """Reject a timestep range that is empty or leaves 1..T, naming the fix."""
    if t_min < 1:
        raise ValueError(f"t range ({t_min}, {t_max}): t starts at 1; use ({max(t_min, 1)}, {t_max})")
    if t_max > num_timesteps:
        raise ValueError(
            f"t range ({t_min}, {t_max}): the schedule has {num_timesteps} steps; "
            f"use t_max <= {num_timesteps}"
        )
    if t_min > t_max:
        raise ValueError(f"t range ({t_min}, {t_max}): t_min must not exceed t_max; use ({t_max}, {t_min})")


def sample_noise_level(
    schedule: Schedule,
    batch: int,
    t_min: int = 1,
    t_max: int | None = None,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Draw steps t in {t_min..t_max} (1-based) and sqrt(gamma) ~ U(sqrt_gamma_{t-1}, sqrt_gamma_t).

    The reference draws one t per batch (``per_sample=False``); restricting the range is how the
    timestep-range fine-tuning study trains on, e.g., t in 1..500 of 2000 only.
    Returns ``t`` int64 ``[B]`` and ``sqrt_gamma`` float32 ``[B]`` on the schedule's device.
    """
    t_max = schedule.num_timesteps if t_max is None else t_max
    check_t_range(t_min, t_max, schedule.num_timesteps)
    device = schedule.device
    n_t = batch if per_sample else 1
    t = torch.randint(t_min, t_max + 1, (n_t,), generator=generator, device=device).expand(batch)
    u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
    hi = schedule.sqrt_alphas_cumprod_prev[t - 1]
    lo = schedule.sqrt_alphas_cumprod_prev[t]
    return t, (hi + (lo - hi) * u).float()


def q_sample(x0: Tensor, sqrt_gamma: Tensor, noise: Tensor) -> Tensor:
    """Noise clean images to level gamma: sqrt(gamma) * x0 + sqrt(1 - gamma) * noise.

    Takes sqrt(gamma), not t: SR3 trains on a continuous level. x0, noise: ``[B, C, H, W]``;
    sqrt_gamma: ``[B]``. Same operation order as the reference, so results match it bit for bit.
    """
    g = sqrt_gamma.reshape(-1, 1, 1, 1)
    return g * x0 + (1 - g**2).sqrt() * noise


def denoising_loss(
    unet: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    cond: Tensor,
    sqrt_gamma: Tensor,
    noise: Tensor,
    kind: LossKind = "l1",
) -> Tensor:
    """Per-sample noise-prediction loss ``[B]``: mean over C, H, W of |eps - eps_hat| or its square.

    ``.mean()`` of the result is the reference's ``sum / (b * c * h * w)``; one value per sample makes
    per-t logging possible. ``unet(cat[cond, x_t], sqrt_gamma)`` predicts eps.
    """
    x_t = q_sample(x0, sqrt_gamma, noise)
    return per_sample_error(noise, unet(torch.cat([cond, x_t], dim=1), sqrt_gamma), kind)


def regression_predict(unet: Callable[[Tensor, Tensor], Tensor], cond: Tensor) -> Tensor:
    """The regression baseline's HR estimate in one pass: the same UNet, its x_t channels zero and its
    noise level fixed, so a diffusion and a regression model differ only in what they were trained on."""
    x = torch.cat([cond, torch.zeros_like(cond)], dim=1)
    return unet(x, torch.full((cond.shape[0],), REGRESSION_NOISE_LEVEL, device=cond.device, dtype=cond.dtype))


def regression_loss(
    unet: Callable[[Tensor, Tensor], Tensor], x0: Tensor, cond: Tensor, kind: LossKind = "l1"
) -> Tensor:
    """Per-sample L1/L2 error ``[B]`` of the regression baseline's estimate against the HR image."""
    return per_sample_error(x0, regression_predict(unet, cond), kind)


def per_sample_error(target: Tensor, pred: Tensor, kind: LossKind) -> Tensor:
    """Mean over C, H, W of |target - pred| (``l1``) or its square (``l2``): one value per sample."""
    if kind not in ("l1", "l2"):
        raise ValueError(f"loss kind {kind!r}: choose 'l1' or 'l2'")
    diff = target - pred
    err = diff.abs() if kind == "l1" else diff.square()
    return err.flatten(1).mean(dim=1)
