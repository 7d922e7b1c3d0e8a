"""The SR3 UNet, key- and numerics-compatible with the reference implementation.

Attribute names (``noise_level_mlp``, ``downs``, ``mid``, ``ups``, ``final_conv``, ``res_block``,
``noise_func``, ``block1`` ...) and their creation order are the reference's, so a reference
``*_gen.pth`` loads with ``strict=True`` after stripping ``denoise_fn.`` and setting aside the 12
schedule buffers. The input is ``cat[cond, x_t]`` (6 channels), the noise input is sqrt(gamma).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class UNetConfig:
    """Shape knobs; defaults are the reference 16->128 face model (``config/sr_sr3_16_128.json``)."""

    in_channel: int = 6  # cond (3) + x_t (3)
    out_channel: int = 3
    inner_channel: int = 64
    norm_groups: int = 32  # GroupNorm groups; the reference's define_G default
    channel_multiplier: Sequence[int] = field(default_factory=lambda: (1, 2, 4, 8, 8))
    attn_res: Sequence[int] = field(default_factory=lambda: (16,))  # resolutions with self-attention
    res_blocks: int = 2
    dropout: float = 0.2
    image_size: int = 128  # only decides where attn_res falls; the network is fully convolutional

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_multiplier"], d["attn_res"] = list(self.channel_multiplier), list(self.attn_res)
        return d


class PositionalEncoding(nn.Module):
    """Sinusoidal encoding of the continuous noise level (no parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, noise_level: Tensor) -> Tensor:
        count = self.dim // 2
        step = torch.arange(count, dtype=noise_level.dtype, device=noise_level.device) / count
        encoding = noise_level.unsqueeze(1) * torch.exp(-math.log(1e4) * step.unsqueeze(0))
        return torch.cat([torch.sin(encoding), torch.cos(encoding)], dim=-1)


class Swish(nn.Module):
    """x * sigmoid(x), as the reference writes it, computed by the one fused SiLU kernel: one pass over
    memory and one dispatched op each way instead of two forward and four backward (equal to 1 ulp)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x)


class FeatureWiseAffine(nn.Module):
    """Adds a per-channel projection of the noise embedding (FiLM without the scale, as in SR3)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.noise_func = nn.Sequential(nn.Linear(in_channels, out_channels))

    def forward(self, x: Tensor, noise_embed: Tensor) -> Tensor:
        return x + self.noise_func(noise_embed).view(x.shape[0], -1, 1, 1)


class Upsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


class Downsample(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Block(nn.Module):
    """GroupNorm -> Swish -> (Dropout) -> 3x3 conv; indices 0 and 3 hold the weights, as in the reference."""

    def __init__(self, dim: int, dim_out: int, groups: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.GroupNorm(groups, dim),
            Swish(),
            nn.Dropout(dropout) if dropout != 0 else nn.Identity(),
            nn.Conv2d(dim, dim_out, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, emb_dim: int, dropout: float, norm_groups: int) -> None:
        super().__init__()
        self.noise_func = FeatureWiseAffine(emb_dim, dim_out)
        self.block1 = Block(dim, dim_out, groups=norm_groups)
        self.block2 = Block(dim_out, dim_out, groups=norm_groups, dropout=dropout)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.noise_func(self.block1(x), emb)
        return self.block2(h) + self.res_conv(x)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual, computed by fused SDPA (scale 1/sqrt(C))."""

    def __init__(self, in_channel: int, n_head: int = 1, norm_groups: int = 32) -> None:
        super().__init__()
        self.n_head = n_head
        self.norm = nn.GroupNorm(norm_groups, in_channel)
        self.qkv = nn.Conv2d(in_channel, in_channel * 3, 1, bias=False)
        self.out = nn.Conv2d(in_channel, in_channel, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.n_head
        qkv = self.qkv(self.norm(x)).view(b, self.n_head, head_dim * 3, h * w)
        q, k, v = (t.transpose(-1, -2) for t in qkv.chunk(3, dim=2))  # [b, n, hw, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(c))
        # [b, n, hw, d] -> [b, c, h, w] is a channels_last view; keep x's layout, or every later conv
        # would copy its weights to channels_last on each call (slow on CPU, where it is off)
        out = out.transpose(-1, -2).reshape(b, c, h, w).contiguous(memory_format=memory_format_of(x))
        return self.out(out) + x


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last when ``x`` is laid out that way (and not also plain contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class ResnetBlocWithAttn(nn.Module):
    def __init__(
        self, dim: int, dim_out: int, *, emb_dim: int, norm_groups: int, dropout: float, with_attn: bool
    ) -> None:
        super().__init__()
        self.with_attn = with_attn
        self.res_block = ResnetBlock(dim, dim_out, emb_dim, dropout=dropout, norm_groups=norm_groups)
        if with_attn:
            self.attn = SelfAttention(dim_out, norm_groups=norm_groups)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = self.res_block(x, emb)
        return self.attn(x) if self.with_attn else x


class UNet(nn.Module):
    """SR3 UNet: ``forward(x_cat [B, 6, H, W], sqrt_gamma [B] or [B, 1]) -> eps [B, 3, H, W]``."""

    def __init__(self, config: UNetConfig | None = None, **overrides) -> None:
        super().__init__()
        cfg = config or UNetConfig(**overrides)
        self.config = cfg
        ch, groups, drop = cfg.inner_channel, cfg.norm_groups, cfg.dropout
        self.noise_level_mlp = nn.Sequential(
            PositionalEncoding(ch), nn.Linear(ch, ch * 4), Swish(), nn.Linear(ch * 4, ch)
        )
        block = lambda i, o, attn: ResnetBlocWithAttn(  # noqa: E731
            i, o, emb_dim=ch, norm_groups=groups, dropout=drop, with_attn=attn
        )
        mults = list(cfg.channel_multiplier)
        pre, feats, res = ch, [ch], cfg.image_size
        downs: list[nn.Module] = [nn.Conv2d(cfg.in_channel, ch, kernel_size=3, padding=1)]
        for level, mult in enumerate(mults):
            for _ in range(cfg.res_blocks):
                downs.append(block(pre, ch * mult, res in cfg.attn_res))
                feats.append(ch * mult)
                pre = ch * mult
            if level != len(mults) - 1:
                downs.append(Downsample(pre))
                feats.append(pre)
                res //= 2
        self.downs = nn.ModuleList(downs)
        self.mid = nn.ModuleList([block(pre, pre, True), block(pre, pre, False)])
        ups: list[nn.Module] = []
        for level in reversed(range(len(mults))):
            for _ in range(cfg.res_blocks + 1):
                ups.append(block(pre + feats.pop(), ch * mults[level], res in cfg.attn_res))
                pre = ch * mults[level]
            if level > 0:
                ups.append(Upsample(pre))
                res *= 2
        self.ups = nn.ModuleList(ups)
        self.final_conv = Block(pre, cfg.out_channel, groups=groups)

    def forward(self, x: Tensor, noise_level: Tensor) -> Tensor:
        emb = self.noise_level_mlp(noise_level.reshape(-1).to(x.dtype))
        feats = []
        for layer in self.downs:
            x = layer(x, emb) if isinstance(layer, ResnetBlocWithAttn) else layer(x)
            feats.append(x)
        for layer in self.mid:
            x = layer(x, emb)
        for layer in self.ups:
            x = (
                layer(torch.cat((x, feats.pop()), dim=1), emb)
                if isinstance(layer, ResnetBlocWithAttn)
                else layer(x)
            )
        return self.final_conv(x)


def init_orthogonal(unet: nn.Module) -> None:
    """The reference's training init: orthogonal conv/linear weights (gain 1), zero biases."""
    for m in unet.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.orthogonal_(m.weight, gain=1)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
