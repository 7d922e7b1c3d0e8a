"""Overlapping tiles of the model's size, blended seamlessly at every reverse step.

Running each tile through its own reverse chain and blending the final images leaves seams: two tiles
invent different details in their overlap, and their average is a visible band. Instead the *noise
prediction* is tiled (as MultiDiffusion does): at each step every tile of ``x_t`` goes through the network
(one batched call), the predicted eps are blended with weights that ramp linearly to ~0 at each tile's
edge, and the step is taken on the whole image. The chain therefore runs once over the full image, each
tile sees its neighbours' latest state, and no pixel depends on a tile edge it is close to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sr3_lightning.diffusion import Denoiser

Network = Callable[[Tensor, Tensor], Tensor]  # (input [N, C, S, S], sqrt_gamma [N]) -> eps [N, 3, S, S]


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``length`` with at least ``overlap`` shared pixels, evenly spread,
    the first at 0 and the last ending at ``length``."""
    if length < tile:
        raise ValueError(f"length {length} < tile {tile}: pad the image to at least one tile first")
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap {overlap}: use 0 <= overlap < tile size {tile}")
    if length == tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def blend_window(tile: int, overlap: int) -> Tensor:
    """``[tile, tile]`` weights: 1 inside, a linear ramp over the ``overlap`` pixels at each edge, > 0."""
    if overlap == 0:
        return torch.ones(tile, tile)
    pos = torch.arange(tile, dtype=torch.float64)
    ramp = torch.minimum((pos + 0.5) / overlap, (tile - pos - 0.5) / overlap).clamp(max=1.0)
    return torch.outer(ramp, ramp).float()


@dataclass(frozen=True)
class TileGrid:
    """Tiles of ``tile`` px over an image of ``height`` x ``width`` (both >= tile)."""

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @classmethod
    def plan(cls, height: int, width: int, tile: int, overlap: int) -> TileGrid:
        return cls(
            height,
            width,
            tile,
            overlap,
            tuple(tile_starts(height, tile, overlap)),
            tuple(tile_starts(width, tile, overlap)),
        )

    @property
    def count(self) -> int:
        return len(self.ys) * len(self.xs)

    def describe(self) -> str:
        if self.count == 1:
            return f"one {self.tile} px pass"
        return f"{len(self.xs)}x{len(self.ys)} tiles of {self.tile} px, overlap >= {self.overlap} px"

    def split(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> ``[B * count, C, tile, tile]``, image-major (tiles of image 0 first)."""
        s = self.tile
        tiles = [x[:, :, y : y + s, xx : xx + s] for y in self.ys for xx in self.xs]
        return torch.stack(tiles, dim=1).flatten(0, 1)

    def merge(self, tiles: Tensor) -> Tensor:
        """Weighted blend of ``[B * count, C, tile, tile]`` back to ``[B, C, H, W]``."""
        s = self.tile
        tiles = tiles.unflatten(0, (-1, self.count))
        window = blend_window(s, self.overlap).to(tiles.device, tiles.dtype)
        out = tiles.new_zeros(tiles.shape[0], tiles.shape[2], self.height, self.width)
        weight = tiles.new_zeros(self.height, self.width)
        for k, (y, x) in enumerate((y, x) for y in self.ys for x in self.xs):
            out[:, :, y : y + s, x : x + s] += tiles[:, k] * window
            weight[y : y + s, x : x + s] += window
        return out / weight


def pad_to_tile(x: Tensor, tile: int) -> Tensor:
    """Replicate-pad bottom/right so both sides are at least ``tile``; crop ``[..., :H, :W]`` to undo."""
    pad_h, pad_w = max(0, tile - x.shape[-2]), max(0, tile - x.shape[-1])
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x


def tiled_denoiser(network: Network, cond: Tensor | None, grid: TileGrid, max_batch: int = 64) -> Denoiser:
    """A denoiser over the whole image: tiles of ``x_t`` (after their ``cond`` tiles, when conditional) go
    through ``network`` in chunks of ``max_batch`` and their eps are blended by ``grid.merge``."""
    cond_tiles = grid.split(cond) if cond is not None else None

    def denoise(x_t: Tensor, sqrt_gamma: Tensor) -> Tensor:
        tiles = grid.split(x_t)
        inputs = torch.cat([cond_tiles, tiles], dim=1) if cond_tiles is not None else tiles
        levels = sqrt_gamma.repeat_interleave(grid.count)
        eps = [
            network(inputs[i : i + max_batch], levels[i : i + max_batch])
            for i in range(0, inputs.shape[0], max_batch)
        ]
        return grid.merge(torch.cat(eps))

    return denoise


def seam_profile(img: Tensor, grid: TileGrid, margin: int = 3) -> tuple[Tensor, Tensor]:
    """Seam check: mean |difference| of neighbouring columns/rows that straddle a tile edge, and of all other
    neighbouring columns/rows. ``img`` ``[B, C, H, W]`` made with ``grid``; no seams = the first are not
    larger than the second. Pairs within ``margin`` px of the image's own border (padded the same with or
    without tiles) are left out of both."""
    edges_x = {x for x in grid.xs if x > 0} | {x + grid.tile for x in grid.xs if x + grid.tile < grid.width}
    edges_y = {y for y in grid.ys if y > 0} | {y + grid.tile for y in grid.ys if y + grid.tile < grid.height}
    dx = (img[..., 1:] - img[..., :-1]).abs().mean(dim=(0, 1, 2))  # [W - 1]: columns c and c + 1
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs().mean(dim=(0, 1, 3))
    on_x = torch.tensor([c + 1 in edges_x for c in range(grid.width - 1)])
    on_y = torch.tensor([r + 1 in edges_y for r in range(grid.height - 1)])
    in_x, in_y = (
        (torch.arange(n - 1) >= margin) & (torch.arange(n - 1) < n - 1 - margin)
        for n in (grid.width, grid.height)
    )
    return (
        torch.cat([dx[on_x & in_x], dy[on_y & in_y]]),
        torch.cat([dx[~on_x & in_x], dy[~on_y & in_y]]),
    )
