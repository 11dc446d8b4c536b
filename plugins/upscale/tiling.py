"""Tiled processing with overlap, so an image of any size fits in memory.

The image is cut into tiles that overlap by at least ``overlap`` pixels; each tile is
processed on its own (a super-resolution model, or an img2img pass for A1111's "SD
upscale"), and the results are blended with linear ramps across every overlap, so no seam
shows. Ramps sit only on edges shared with another tile: along the image border a tile's
weight stays 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from aipaint.errors import ImageError, InvalidParameter

DEFAULT_MAX_TILES = 4096
DEFAULT_MAX_UNTILED_PIXELS = 2048 * 2048

TileFn = Callable[[torch.Tensor], torch.Tensor]
"""``fn(tile)`` maps an NCHW float tensor in [0, 1] to one ``scale`` times larger."""


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets along one axis: the fewest tiles that overlap by at least ``overlap``,
    spread evenly, the first and last flush with the edges."""
    if size <= tile:
        return [0]
    count = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, fade_in: int, fade_out: int) -> torch.Tensor:
    """Weights along one axis of a tile: 1 inside, fading across the parts shared with a
    neighbour. The outer quarter of each shared part gets (almost) no weight, because a
    network sees less context near a tile's edge; the neighbour covers it in full. The two
    tiles' weights sum to 1 across every overlap. A floor of 1e-6 keeps every covered pixel
    weighted."""
    position = torch.arange(length, dtype=torch.float32) + 0.5
    weights = torch.ones(length, dtype=torch.float32)
    if fade_in:
        margin = fade_in // 4
        weights = torch.minimum(weights, ((position - margin) / max(fade_in - 2 * margin, 1)).clamp(0, 1))
    if fade_out:
        margin = fade_out // 4
        weights = torch.minimum(weights, ((length - position - margin) / max(fade_out - 2 * margin, 1)).clamp(0, 1))
    return weights.clamp_min(1e-6)


def check_tiling(width: int, height: int, tile: int, overlap: int, *, max_tiles: int = DEFAULT_MAX_TILES,
                 max_untiled_pixels: int = DEFAULT_MAX_UNTILED_PIXELS, tile_height: int | None = None) -> int:
    """Validate a tiling for a ``width``×``height`` image; returns the number of tiles."""
    tile_h = tile if tile_height is None else tile_height
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        raise InvalidParameter("tile", tile, "must be 0 (no tiling) or a tile size in pixels")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise InvalidParameter("overlap", overlap, "must be a whole number of pixels, 0 or more")
    if tile == 0:
        if width * height > max_untiled_pixels:
            raise ImageError(
                f"the image ({width}x{height}) is too large to process in one piece (limit {max_untiled_pixels} "
                "pixels); pass a tile size, e.g. tile=512 (--tile 512), to process it in overlapping tiles"
            )
        return 1
    if min(tile, tile_h) <= 2 * overlap:
        raise InvalidParameter("tile", min(tile, tile_h), f"must be more than twice the overlap ({overlap} px)",
                               f"use tile={4 * overlap} or a smaller overlap")
    count = len(tile_starts(width, tile, overlap)) * len(tile_starts(height, tile_h, overlap))
    if count > max_tiles:
        raise ImageError(
            f"the image ({width}x{height}) is too large for tile size {tile}: it would take {count} tiles "
            f"(limit {max_tiles}); use a larger tile, e.g. tile={tile * 2}"
        )
    return count


def process_tiled(
    image: torch.Tensor,
    fn: TileFn,
    *,
    scale: int,
    tile: int,
    overlap: int,
    max_tiles: int = DEFAULT_MAX_TILES,
    max_untiled_pixels: int = DEFAULT_MAX_UNTILED_PIXELS,
    tile_height: int | None = None,
) -> torch.Tensor:
    """Apply ``fn`` to ``image`` (NCHW, [0, 1]) tile by tile and blend the seams.

    ``tile_height`` allows non-square tiles (default: ``tile``). With ``tile=0`` the whole
    image goes through ``fn`` at once, within ``max_untiled_pixels``.
    """
    height, width = image.shape[-2:]
    tile_h = tile_height if tile_height is not None else tile
    check_tiling(width, height, tile, overlap, max_tiles=max_tiles, max_untiled_pixels=max_untiled_pixels,
                 tile_height=tile_h)
    if tile == 0 or (width <= tile and height <= tile_h):
        return fn(image)
    out: torch.Tensor | None = None
    weight_sum = torch.zeros((1, 1, height * scale, width * scale), dtype=torch.float32)
    xs, ys = tile_starts(width, tile, overlap), tile_starts(height, tile_h, overlap)
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            h, w = min(tile_h, height - y), min(tile, width - x)
            piece = fn(image[:, :, y : y + h, x : x + w]).float().cpu()  # blend on the CPU, whatever ran the tile
            if out is None:
                out = torch.zeros((image.shape[0], piece.shape[1], height * scale, width * scale), dtype=torch.float32)
            # Fade only across the part actually shared with the neighbour.
            fade_top = (ys[iy - 1] + tile_h - y) * scale if iy > 0 else 0
            fade_bottom = (y + h - ys[iy + 1]) * scale if iy + 1 < len(ys) else 0
            fade_left = (xs[ix - 1] + tile - x) * scale if ix > 0 else 0
            fade_right = (x + w - xs[ix + 1]) * scale if ix + 1 < len(xs) else 0
            wy = _ramp(h * scale, min(max(fade_top, 0), h * scale), min(max(fade_bottom, 0), h * scale))
            wx = _ramp(w * scale, min(max(fade_left, 0), w * scale), min(max(fade_right, 0), w * scale))
            weights = (wy[:, None] * wx[None, :])[None, None]
            ys0, xs0 = y * scale, x * scale
            out[:, :, ys0 : ys0 + h * scale, xs0 : xs0 + w * scale] += piece * weights
            weight_sum[:, :, ys0 : ys0 + h * scale, xs0 : xs0 + w * scale] += weights
    assert out is not None
    return out / weight_sum


