"""Reverse-diffusion samplers over a denoiser callable: ancestral DDPM, DDIM, and start-from-image.

Every sampler is a no-grad function of (denoiser, start tensor, schedule). A respaced schedule
(``schedule.respace``) gives respaced DDPM/DDIM with no other change, because SR3 conditions on the
continuous noise level. Each returns the images, the number of network evaluations (NFE) and any
recorded intermediate states.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sr3_lightning.diffusion.losses import q_sample
from sr3_lightning.diffusion.schedule import Schedule

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x_t, sqrt_gamma[B]) -> eps; the LR image is already bound
NoiseFn = Callable[[int, Tensor], Tensor]  # (0-based step, x) -> the noise that step adds
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per image


@dataclass
class SampleResult:
    """Final images ``[B, C, H, W]``, network evaluations, and states recorded after chosen steps."""

    images: Tensor
    nfe: int
    intermediates: list[Tensor] = field(default_factory=list)
    recorded_steps: list[int] = field(default_factory=list)


def conditional_denoiser(unet: Callable[[Tensor, Tensor], Tensor], cond: Tensor) -> Denoiser:
    """Bind the bicubic-upsampled LR image: the SR3 UNet sees ``cat[cond, x_t]``."""
    return lambda x_t, sqrt_gamma: unet(torch.cat([cond, x_t], dim=1), sqrt_gamma)


def predict_x0(schedule: Schedule, i: int, x_t: Tensor, eps: Tensor) -> Tensor:
    """x0 = x_t / sqrt(gamma_i) - sqrt(1 / gamma_i - 1) * eps (0-based step ``i``)."""
    return schedule.sqrt_recip_alphas_cumprod[i] * x_t - schedule.sqrt_recipm1_alphas_cumprod[i] * eps


def p_mean_variance(
    denoise: Denoiser, schedule: Schedule, x_t: Tensor, i: int, clip_denoised: bool = True
) -> tuple[Tensor, Tensor]:
    """Mean and clipped log-variance of p(x_{i-1} | x_i), x0 clipped to [-1, 1] as in the reference."""
    eps = denoise(x_t, schedule.noise_level(i, x_t.shape[0]))
    x0 = predict_x0(schedule, i, x_t, eps)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    mean = schedule.posterior_mean_coef1[i] * x0 + schedule.posterior_mean_coef2[i] * x_t
    return mean, schedule.posterior_log_variance_clipped[i]


def gaussian_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like ``x``. One generator per image gives each image its own stream,
    so an image's sample does not depend on the batch it was drawn in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(
            f"{len(generator)} generators for a batch of {x.shape[0]} images: give one per image"
        )
    return torch.stack(
        [torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator]
    )


def image_generator(seed: int, name: str, device: str | torch.device) -> torch.Generator:
    """Noise for one image from a seed and its name (file name, shard key): its result does not depend on
    the batch size or on which other images are sampled beside it."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def _gaussian(generator: Generators) -> NoiseFn:
    return lambda i, x: gaussian_like(x, generator)


def _start_index(schedule: Schedule, t_start: int | None) -> int:
    t_start = schedule.num_timesteps if t_start is None else t_start
    if not 0 <= t_start <= schedule.num_timesteps:
        raise ValueError(
            f"t_start={t_start}: choose a step in 0..{schedule.num_timesteps} (0 = no denoising)"
        )
    return t_start


def _run(
    step: Callable[[Tensor, int], Tensor],
    x: Tensor,
    t_start: int,
    record: Sequence[int] | None,
    progress: bool,
) -> SampleResult:
    record_set = set(record or ())
    result = SampleResult(images=x, nfe=0)
    for i in tqdm(range(t_start - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
        x = step(x, i)
        result.nfe += 1
        if i in record_set:
            result.intermediates.append(x)
            result.recorded_steps.append(i)
    result.images = x
    return result


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    x_t: Tensor,
    schedule: Schedule,
    *,
    t_start: int | None = None,
    clip_denoised: bool = True,
    generator: Generators = None,
    noise_fn: NoiseFn | None = None,
    record: Sequence[int] | None = None,
    progress: bool = False,
) -> SampleResult:
    """Ancestral sampling (the reference ``p_sample_loop``): x_{i-1} = mean + exp(logvar / 2) * z.

    ``x_t`` is the state at 1-based step ``t_start`` (default T: pure noise); steps t_start-1..0 run.
    No noise is added at the last step. ``noise_fn`` replaces the Gaussian draws (replaying a chain);
    ``record`` lists 0-based steps after which the state is kept.
    """
    t_start = _start_index(schedule, t_start)
    draw = noise_fn or _gaussian(generator)

    def step(x: Tensor, i: int) -> Tensor:
        mean, log_var = p_mean_variance(denoise, schedule, x, i, clip_denoised)
        noise = draw(i, x) if i > 0 else torch.zeros_like(x)
        return mean + noise * (0.5 * log_var).exp()

    return _run(step, x_t, t_start, record, progress)


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    x_t: Tensor,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    t_start: int | None = None,
    clip_denoised: bool = True,
    generator: Generators = None,
    noise_fn: NoiseFn | None = None,
    record: Sequence[int] | None = None,
    progress: bool = False,
) -> SampleResult:
    """DDIM (Song et al. 2021, eq. 12): deterministic at ``eta=0``, ancestral-like at ``eta=1``.

    x0 is predicted (and clipped), eps re-derived from it, then
    x_{prev} = sqrt(g_prev) x0 + sqrt(1 - g_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - g_prev) / (1 - g)) sqrt(1 - g / g_prev). Use with a respaced schedule.
    """
    if eta < 0:
        raise ValueError(f"eta={eta}: DDIM's eta must be >= 0 (0 = deterministic, 1 = DDPM-like)")
    t_start = _start_index(schedule, t_start)
    draw = noise_fn or _gaussian(generator)

    def step(x: Tensor, i: int) -> Tensor:
        eps = denoise(x, schedule.noise_level(i, x.shape[0]))
        x0 = predict_x0(schedule, i, x, eps)
        if clip_denoised:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (schedule.sqrt_recip_alphas_cumprod[i] * x - x0) / schedule.sqrt_recipm1_alphas_cumprod[i]
        g, g_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
        sigma = eta * ((1 - g_prev) / (1 - g)).sqrt() * (1 - g / g_prev).sqrt()
        x_prev = g_prev.sqrt() * x0 + (1 - g_prev - sigma**2).clamp(min=0).sqrt() * eps
        if i > 0 and eta > 0:
            x_prev = x_prev + sigma * draw(i, x)
        return x_prev

    return _run(step, x_t, t_start, record, progress)


@torch.no_grad()
def sample_from_image(
    denoise: Denoiser,
    image: Tensor,
    schedule: Schedule,
    t_start: int,
    *,
    sampler: str = "ddpm",
    eta: float = 0.0,
    generator: Generators = None,
    record: Sequence[int] | None = None,
    progress: bool = False,
) -> SampleResult:
    """Noise ``image`` to 1-based step ``t_start`` and run the reverse chain from there (Diff-SR, SDEdit).

    x_t = sqrt(gamma_t) image + sqrt(1 - gamma_t) eps. ``t_start=0`` returns the image unchanged.
    """
    t_start = _start_index(schedule, t_start)
    if t_start == 0:
        return SampleResult(images=image.clone(), nfe=0)
    sqrt_gamma = schedule.noise_level(t_start - 1, image.shape[0]).to(image.dtype)
    x_t = q_sample(image, sqrt_gamma, gaussian_like(image, generator))
    common = dict(t_start=t_start, generator=generator, record=record, progress=progress)
    if sampler == "ddpm":
        return sample_ddpm(denoise, x_t, schedule, **common)
    if sampler == "ddim":
        return sample_ddim(denoise, x_t, schedule, eta=eta, **common)
    raise ValueError(f"sampler {sampler!r}: choose 'ddpm' or 'ddim'")
