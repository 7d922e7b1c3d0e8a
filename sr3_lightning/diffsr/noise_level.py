"""Diff-SR's noise level: level <-> step, the signature and fidelity losses, the PRF, the calibration table.

A *noise level* is a fraction of the training chain: ``t = round(level * T)`` (half up), ``level in [0, 1]``.
On a respaced K-step schedule the level goes to the kept step nearest to that ``t`` (0 = no noise).

The two losses (their reasoning is in ``docs/diffsr.md``), per image, on outputs quantised to uint8 as saved:

- signature loss ``L_sig = mean((D_s(x_sr) - y)^2)`` on the 0..255 scale: ``D_s`` is the bicubic (antialiased)
  downsampling to the LR size, ``y`` the LR input. It is the part of the observation the result no longer
  explains, ~0 at t = 0 and growing with t as the injected noise replaces content.
- fidelity loss ``L_fid = max(0, 1 - E(x_sr) / E(x_hr))`` with ``E`` the mean squared 3x3 Laplacian response:
  the share of the HR image's finest-scale detail energy the result lacks, ~1 - E(bicubic)/E(hr) at t = 0
  and shrinking with t as the chain synthesises detail.

The trade-off ``J = L_fid + omega * L_sig`` (omega = 0.004: the paper's number, applied to our own losses,
whose scales were chosen to suit it) is minimised inside the Perceptual Recoverable Field, the levels with
``L_sig <= tau_sig`` and ``L_fid <= tau_fid``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sr3_lightning.diffusion import Schedule
from sr3_lightning.metrics import consistency, to_uint8

OMEGA = 0.004  # the paper's weight, on our L_sig's 0..255 MSE scale (docs/diffsr.md)
TAU_SIGNATURE = 144.0  # MSE on 0..255: RMS 12 grey levels at the LR scale (LR consistency 26.5 dB)
TAU_FIDELITY = 0.5  # at least half of the HR detail energy restored
TABLE_FORMAT = "sr3-lightning-diffsr-prf"
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)


# ----------------------------------------------------------------------------------- level <-> step
def check_level(level: float) -> float:
    if not (isinstance(level, int | float) and math.isfinite(level) and 0.0 <= level <= 1.0):
        raise ValueError(f"noise level {level!r}: use a fraction of the diffusion chain in [0, 1], or 'auto'")
    return float(level)


def parse_noise_level(text: str | float) -> float | str:
    """'auto' or a float in [0, 1] (from the command line)."""
    if isinstance(text, str) and text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--noise-level {text!r}: use 'auto' or a number in [0, 1], e.g. 0.3") from None
    return check_level(value)


def level_to_step(level: float, schedule: Schedule, train_steps: int) -> int:
    """1-based step of ``schedule`` (respaced or not) for a noise level: the kept step nearest to
    ``round(level * train_steps)`` of the training chain; 0 means no noise (the input is returned)."""
    t = math.floor(check_level(level) * train_steps + 0.5)
    if t == 0:
        return 0
    kept = np.concatenate([[0], schedule.timesteps.cpu().numpy() + 1])  # 1-based training steps; 0 = none
    return int(np.argmin(np.abs(kept - t)))


def step_to_level(step: int, schedule: Schedule, train_steps: int) -> float:
    """The noise level of a 1-based step of ``schedule`` (inverse of ``level_to_step`` on kept steps)."""
    return 0.0 if step == 0 else float(schedule.timesteps[step - 1].item() + 1) / train_steps


# ----------------------------------------------------------------------------------------- losses
def signature_loss(sr: Tensor, lr: Tensor) -> Tensor:
    """``[B]`` MSE (0..255 scale) between ``sr`` downsampled to the LR size and ``lr``; both in [-1, 1].

    From ``metrics.consistency`` (the same downsampling and quantisation): MSE = 255^2 / 10^(PSNR / 10).
    """
    return 255.0**2 / torch.pow(10.0, consistency(sr, lr) / 10.0)


def detail_energy(x: Tensor) -> Tensor:
    """``[B]`` mean squared 3x3 Laplacian response of uint8-quantised images (0..255 scale, valid region)."""
    pixels = to_uint8(x).double()
    kernel = LAPLACIAN.to(pixels.device).expand(pixels.shape[1], 1, 3, 3)
    return F.conv2d(pixels, kernel, groups=pixels.shape[1]).square().flatten(1).mean(dim=1)


def fidelity_loss(sr: Tensor, hr: Tensor) -> Tensor:
    """``[B]`` share of the HR detail energy the result lacks: max(0, 1 - E(sr) / E(hr)); 0 for flat HR."""
    e_sr, e_hr = detail_energy(sr), detail_energy(hr)
    ratio = torch.where(e_hr > 0, e_sr / e_hr.clamp(min=1e-12), torch.ones_like(e_hr))
    return (1.0 - ratio).clamp(min=0.0)


# ---------------------------------------------------------------------------------------------- PRF
@dataclass
class PRF:
    """The admissible levels of one scale and the chosen one; ``range`` is None when there is none."""

    admissible: list[bool]
    range: tuple[float, float] | None
    level: float  # argmin of J inside the PRF, or over the whole grid when there is no PRF


def find_prf(
    levels: Sequence[float],
    signature: Sequence[float],
    fidelity: Sequence[float],
    omega: float = OMEGA,
    tau_signature: float = TAU_SIGNATURE,
    tau_fidelity: float = TAU_FIDELITY,
) -> PRF:
    """PRF = the longest run of consecutive grid levels with L_sig <= tau_sig and L_fid <= tau_fid; the
    chosen level minimises J = L_fid + omega * L_sig in it (over all levels when the PRF is empty)."""
    levels, sig, fid = (np.asarray(v, dtype=np.float64) for v in (levels, signature, fidelity))
    if not (len(levels) == len(sig) == len(fid)) or len(levels) == 0:
        raise ValueError("find_prf needs one signature and one fidelity value per level")
    order = np.argsort(levels)
    levels, sig, fid = levels[order], sig[order], fid[order]
    objective = fid + omega * sig
    ok = (sig <= tau_signature) & (fid <= tau_fidelity)
    best_run: tuple[int, int] | None = None
    start = None
    for i, good in enumerate([*ok, False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            if best_run is None or i - start > best_run[1] - best_run[0]:
                best_run = (start, i)
            start = None
    admissible = [bool(v) for v in ok[np.argsort(order)]]
    if best_run is None:
        return PRF(admissible, None, float(levels[int(np.argmin(objective))]))
    lo, hi = best_run
    chosen = lo + int(np.argmin(objective[lo:hi]))
    return PRF(admissible, (float(levels[lo]), float(levels[hi - 1])), float(levels[chosen]))


# ------------------------------------------------------------------------------- calibration table
@dataclass
class NoiseChoice:
    """What ``--noise-level auto`` uses for a scale: the level, the PRF (None: no PRF) and why."""

    level: float
    prf: tuple[float, float] | None
    note: str


def load_prf_table(path: Path) -> dict:
    """Read and check a table written by ``diffsr-calibrate``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"PRF table {path} does not exist; make one with `python -m sr3_lightning diffsr-calibrate "
            f"--ckpt X --data SHARDS --out {path}`"
        )
    try:
        table = json.loads(path.read_text())
        ok = table.get("format") == TABLE_FORMAT and all(
            {"scale", "level", "prf"} <= set(entry) for entry in table["scales"]
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok or not table["scales"]:
        raise ValueError(f"{path} is not a PRF table written by diffsr-calibrate; re-run diffsr-calibrate")
    for i, entry in enumerate(table["scales"]):
        problem = _entry_problem(entry)
        if problem:
            raise ValueError(
                f"{path}: scales[{i}] {problem} (the table was edited?); re-run diffsr-calibrate"
            )
    return table


def _is_level(x: object) -> bool:
    """A level as ``check_level`` defines it (bools, which Python counts as ints, are not)."""
    try:
        check_level(x)
    except ValueError:
        return False
    return not isinstance(x, bool)


def _entry_problem(entry: dict) -> str | None:
    """What makes a table entry unusable by `choose_level`, if anything."""
    for key in ("scale", "effective_scale"):
        value = entry.get(key)
        is_scale = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if key in entry and not (is_scale and value > 1):
            return f"has {key}={entry[key]!r}; a scale is a number > 1"
    if not _is_level(entry["level"]):
        return f"has level={entry['level']!r}; a level is a number in [0, 1]"
    prf = entry["prf"]
    if prf is not None and not (
        isinstance(prf, list) and len(prf) == 2 and all(map(_is_level, prf)) and prf[0] <= prf[1]
    ):
        return f"has prf={prf!r}; a PRF is null or [low, high] levels in [0, 1]"
    return None


def _entry_choice(entry: dict, note: str) -> NoiseChoice:
    prf = tuple(entry["prf"]) if entry["prf"] is not None else None
    if prf is None:
        note += f"; x{entry['scale']:g} has no PRF, so the best trade-off level is used (expect blur)"
    return NoiseChoice(float(entry["level"]), prf, note)


def choose_level(table: dict, scale: float) -> NoiseChoice:
    """Interpolate the table for ``scale``, linearly in log(scale) between the two calibrated neighbours
    (the paper's 2x ~ 20 %, 4x ~ 40 % is linear in log2 s), each at the scale it was really calibrated at
    (``effective_scale``); outside the calibrated range the nearest entry.
    The PRF's bounds are interpolated too, and only when both neighbours have one."""
    if not (math.isfinite(scale) and scale > 1.0):
        raise ValueError(f"scale {scale}: Diff-SR upscales, use a factor > 1")
    # the scale each entry was really calibrated at (LR sizes are whole pixels: x2.7 of 32 px is 32 / 12)
    entries = [{**e, "scale": float(e.get("effective_scale", e["scale"]))} for e in table["scales"]]
    entries.sort(key=lambda e: e["scale"])
    scales = [float(e["scale"]) for e in entries]
    for entry in entries:
        if math.isclose(entry["scale"], scale, rel_tol=1e-6):
            return _entry_choice(entry, f"x{scale:g}: calibrated")
    if scale < scales[0] or scale > scales[-1]:
        nearest = entries[0] if scale < scales[0] else entries[-1]
        return _entry_choice(
            nearest, f"x{scale:g} is outside the calibrated x{scales[0]:g}..x{scales[-1]:g}: nearest entry"
        )
    hi = next(i for i, s in enumerate(scales) if s > scale)
    a, b = entries[hi - 1], entries[hi]
    w = (math.log(scale) - math.log(a["scale"])) / (math.log(b["scale"]) - math.log(a["scale"]))
    level = (1 - w) * a["level"] + w * b["level"]
    note = f"x{scale:g}: interpolated between x{a['scale']:g} and x{b['scale']:g}"
    if a["prf"] is None or b["prf"] is None:
        missing = " and ".join(f"x{e['scale']:g}" for e in (a, b) if e["prf"] is None)
        return NoiseChoice(
            level, None, f"{note}; no PRF ({missing} has none), best trade-off used (expect blur)"
        )
    prf = tuple((1 - w) * pa + w * pb for pa, pb in zip(a["prf"], b["prf"]))
    return NoiseChoice(min(max(level, prf[0]), prf[1]), prf, note)


@dataclass
class ScaleSweep:
    """One scale's sweep: per level the step run, both losses, J and the metrics (LPIPS None when off)."""

    scale: float
    effective_scale: float
    lr_size: int
    levels: list[float]
    steps: list[int]
    signature: list[float]
    fidelity: list[float]
    objective: list[float]
    psnr: list[float]
    ssim: list[float]
    lpips: list[float] | None
    consistency: list[float]
    prf: tuple[float, float] | None = None
    admissible: list[bool] | None = None
    level: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)
