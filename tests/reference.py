"""Paths and loaders of the reference SR3 fixtures (made by the reference code; see their README)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from sr3_lightning.diffusion import make_schedule
from sr3_lightning.models.unet import UNet, UNetConfig

REF = Path(__file__).parent / "fixtures" / "reference"
TINY = UNetConfig(
    inner_channel=8,
    norm_groups=4,
    channel_multiplier=(1, 2, 2),
    attn_res=(8,),
    res_blocks=1,
    dropout=0.0,
    image_size=32,
)
TINY_T = 100


@functools.cache
def tiny_io() -> dict[str, torch.Tensor]:
    return torch.load(REF / "tiny_io.pt", weights_only=True)


def tiny_gen() -> dict[str, torch.Tensor]:
    return torch.load(REF / "tiny_gen.pth", weights_only=True)


def tiny_unet(gen_file: str = "tiny_gen.pth") -> UNet:
    """The tiny reference UNet with the reference's weights, in eval mode."""
    state = torch.load(REF / gen_file, weights_only=True)
    unet = UNet(TINY)
    unet.load_state_dict({k.removeprefix("denoise_fn."): v for k, v in state.items() if "denoise_fn." in k})
    return unet.eval()


def tiny_schedule():
    return make_schedule("linear", TINY_T, 1e-6, 1e-2)
