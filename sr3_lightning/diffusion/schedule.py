"""Noise schedules: betas by name, every derived coefficient, and respacing to fewer steps.

Coefficients are derived once in float64 and cast to float32, exactly as the reference SR3
``GaussianDiffusion.set_new_noise_schedule`` does, so the 12 float32 buffers equal the ones stored in
reference checkpoints and per-step code only gathers by ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

BetaSchedule = Literal["linear", "quad", "cosine", "warmup10", "warmup50", "const", "jsd", "sigmoid"]
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
# The reference 16->128 model's schedule (make_schedule's keyword arguments): the defaults everywhere.
REFERENCE_SCHEDULE = {"kind": "linear", "num_timesteps": 2000, "start": 1e-6, "end": 1e-2}

# The reference's buffer names, in the order its checkpoints store them.
BUFFER_NAMES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def _warmup(start: float, end: float, n: int, frac: float) -> np.ndarray:
    betas = end * np.ones(n, dtype=np.float64)
    warm = int(n * frac)
    betas[:warm] = np.linspace(start, end, warm, dtype=np.float64)
    return betas


def make_betas(
    kind: str, num_timesteps: int, start: float = 1e-6, end: float = 1e-2, cosine_s: float = 8e-3
) -> np.ndarray:
    """Betas (float64, ``[T]``) of a named schedule; the names and formulas are the reference's.

    ``sigmoid`` (not in the reference) is ``sigmoid(linspace(-6, 6, T)) * (end - start) + start``.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps}: a schedule needs at least 1 step")
    n = num_timesteps
    if kind == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if kind == "quad":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    if kind == "warmup10":
        return _warmup(start, end, n, 0.1)
    if kind == "warmup50":
        return _warmup(start, end, n, 0.5)
    if kind == "const":
        return end * np.ones(n, dtype=np.float64)
    if kind == "jsd":  # 1/T, 1/(T-1), ..., 1
        return 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    if kind == "cosine":
        steps = torch.arange(n + 1, dtype=torch.float64) / n + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        return (1 - alphas[1:] / alphas[:-1]).clamp(max=0.999).numpy()
    if kind == "sigmoid":
        x = np.linspace(-6, 6, n, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-x)) * (end - start) + start
    raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True)
class Schedule:
    """Precomputed coefficients of a diffusion schedule (float32 ``[T]`` unless noted).

    The names are the reference's buffer names (``alphas_cumprod`` is gamma). ``timesteps`` maps each
    step to the step of the training schedule it came from (``arange(T)`` unless respaced).
    """

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    sqrt_alphas_cumprod_prev: Tensor  # float64 [T + 1]: sqrt(append(1, gamma)), bounds of the level draw
    alphas_cumprod_f64: Tensor  # float64 [T]: gamma before the cast, kept for exact respacing
    timesteps: Tensor  # int64 [T]

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> Schedule:
        """The same schedule with every tensor on ``device`` (no copy when already there)."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def buffers(self) -> dict[str, Tensor]:
        """The 12 float32 buffers under the reference's names and in its checkpoint order."""
        return {name: getattr(self, name) for name in BUFFER_NAMES}

    def noise_level(self, index: int, batch: int) -> Tensor:
        """sqrt(gamma) at 0-based step ``index`` for a batch, ``[B]`` float32: the UNet's noise input."""
        return self.sqrt_alphas_cumprod[index].expand(batch).contiguous()

    @classmethod
    def from_betas(cls, betas: np.ndarray | Tensor, timesteps: np.ndarray | None = None) -> Schedule:
        """Derive every coefficient from float64 betas, as the reference does."""
        betas = np.asarray(betas.cpu().numpy() if isinstance(betas, Tensor) else betas, dtype=np.float64)
        return cls._derive(betas, np.cumprod(1.0 - betas, axis=0), timesteps)

    @classmethod
    def _derive(cls, betas: np.ndarray, gamma: np.ndarray, timesteps: np.ndarray | None) -> Schedule:
        with np.errstate(divide="ignore"):  # jsd ends at gamma = 0, where the reference also gets inf
            return cls._derive_unchecked(betas, gamma, timesteps)

    @classmethod
    def _derive_unchecked(
        cls, betas: np.ndarray, gamma: np.ndarray, timesteps: np.ndarray | None
    ) -> Schedule:
        alphas = 1.0 - betas
        gamma_prev = np.append(1.0, gamma[:-1])
        post_var = betas * (1.0 - gamma_prev) / (1.0 - gamma)
        f32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
        if timesteps is None:
            timesteps = np.arange(len(betas))
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(gamma),
            alphas_cumprod_prev=f32(gamma_prev),
            sqrt_alphas_cumprod=f32(np.sqrt(gamma)),
            sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - gamma)),
            log_one_minus_alphas_cumprod=f32(np.log(1.0 - gamma)),
            sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / gamma)),
            sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / gamma - 1)),
            posterior_variance=f32(post_var),
            posterior_log_variance_clipped=f32(np.log(np.maximum(post_var, 1e-20))),
            posterior_mean_coef1=f32(betas * np.sqrt(gamma_prev) / (1.0 - gamma)),
            posterior_mean_coef2=f32((1.0 - gamma_prev) * np.sqrt(alphas) / (1.0 - gamma)),
            sqrt_alphas_cumprod_prev=torch.tensor(np.sqrt(np.append(1.0, gamma)), dtype=torch.float64),
            alphas_cumprod_f64=torch.tensor(gamma, dtype=torch.float64),
            timesteps=torch.as_tensor(np.asarray(timesteps), dtype=torch.int64),
        )

    @classmethod
    def from_buffers(cls, buffers: dict[str, Tensor]) -> Schedule:
        """Rebuild from stored float32 buffers when no named schedule reproduces them (lossy in float64)."""
        stored = {k: v.detach().cpu().float() for k, v in buffers.items()}
        gamma64 = stored["alphas_cumprod"].double()
        return cls(
            **stored,
            sqrt_alphas_cumprod_prev=torch.cat([torch.ones(1, dtype=torch.float64), gamma64.sqrt()]),
            alphas_cumprod_f64=gamma64,
            timesteps=torch.arange(len(gamma64)),
        )


def make_schedule(
    kind: str = "linear",
    num_timesteps: int = 2000,
    start: float = 1e-6,
    end: float = 1e-2,
    cosine_s: float = 8e-3,
) -> Schedule:
    """A named schedule; the defaults are the reference 16->128 model's (linear, T=2000, 1e-6..1e-2)."""
    betas = make_betas(kind, num_timesteps, start, end, cosine_s)
    top = 1.0 if kind == "jsd" else np.nextafter(1.0, 0.0)  # jsd ends at beta = 1 by definition
    if not ((betas > 0) & (betas <= top)).all():
        raise ValueError(
            f"beta schedule {kind} from {start} to {end} gives betas in "
            f"[{betas.min():.3g}, {betas.max():.3g}]; "
            "each must lie in (0, 1): set beta_start and beta_end between 0 and 1 (the reference: 1e-6, 1e-2)"
        )
    return Schedule.from_betas(betas)


def respace(schedule: Schedule, steps: int | Sequence[int]) -> Schedule:
    """Keep a subsequence of the steps and recompute betas so gamma is unchanged at the kept steps.

    ``steps`` is a count K (evenly spaced, first and last step kept; K = 1 keeps the last, the one a
    chain from pure noise must start at) or explicit 0-based step indices.
    SR3 conditions on the continuous noise level, so the network needs no change for any subsequence.
    """
    total = schedule.num_timesteps
    if isinstance(steps, int):
        if not 1 <= steps <= total:
            raise ValueError(f"steps={steps}: choose between 1 and the schedule's {total} steps")
        first = 0 if steps > 1 else total - 1
        kept = np.unique(np.round(np.linspace(first, total - 1, steps)).astype(np.int64))
    else:
        kept = np.unique(np.asarray(list(steps), dtype=np.int64))
        if len(kept) == 0 or kept[0] < 0 or kept[-1] >= total:
            raise ValueError(f"respace steps must be 0-based indices in 0..{total - 1}, got {list(steps)}")
    gamma_all = schedule.alphas_cumprod_f64.cpu().numpy()
    gamma = gamma_all[kept]
    betas = 1.0 - gamma / np.append(1.0, gamma[:-1])
    original = schedule.timesteps.cpu().numpy()[kept]
    return Schedule._derive(betas, gamma, original).to(schedule.device)
