"""The device a benchmark runs on: its name, its dense peak for MFU, the UNet's FLOPs, synchronisation.

Peaks are dense tensor-core figures: bf16 for ``bf16-mixed`` rows, TF32 for fp32 rows (cuDNN convolutions
run in TF32 by default); on CPU an estimate from the clock and the SIMD width.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from sr3_lightning.models.unet import UNet, UNetConfig

# Dense peaks in TFLOPS (bf16 tensor core, tf32 tensor core), matched against torch.cuda.get_device_name
# in this order. H100 "80GB HBM3" is the SXM part.
GPU_PEAKS = [
    ("H200", (989.4, 494.7)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100 NVL", (835.5, 417.8)),
    ("H100", (989.4, 494.7)),
    ("A100", (312.0, 156.0)),
    ("L40S", (362.1, 183.2)),
    ("L40", (181.0, 90.5)),
    ("L4", (121.0, 60.0)),
    ("A10G", (70.0, 35.0)),
    ("A10", (125.0, 62.5)),
    ("RTX 4090", (165.2, 82.6)),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "")
    return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """Dense peak of the device for ``precision`` (see the module docstring), or None when unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, tf32) in GPU_PEAKS:
            if key in name:
                return bf16 if precision == "bf16-mixed" else tf32
        return None
    info = _cpuinfo()
    mhz = next((float(ln.split(":")[1]) for ln in info if ln.startswith("cpu MHz")), None)
    flags = next((ln for ln in info if ln.startswith("flags")), "")
    if mhz is None:
        return None
    per_cycle = (
        64 if " avx512f" in flags else 32 if " fma" in flags else 8
    )  # fp32 FLOPs/cycle/core, 2 FMA units
    return torch.get_num_threads() * mhz * 1e6 * per_cycle / 1e12


def train_flops(cfg: UNetConfig, batch: int) -> int:
    """FLOPs of one UNet forward + backward at ``batch`` (FlopCounterMode on the meta device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = UNet(cfg)
        x = torch.randn(batch, cfg.in_channel, cfg.image_size, cfg.image_size)
        level = torch.rand(batch)
    with FlopCounterMode(display=False) as counter, sdpa_kernel([SDPBackend.MATH]):
        unet(x, level).abs().mean().backward()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
