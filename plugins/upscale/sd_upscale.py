"""A1111's "SD upscale" script: upscale, then img2img every tile, then blend the seams.

Tiles are the model's native size (where it draws best) and overlap by ``overlap``
pixels; each tile is redrawn with the prompt at a low denoising strength, adding detail
the upscaler could not, and the tiles are blended with linear ramps across the overlaps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aipaint_plugins.upscale.tiling import process_tiled
from aipaint_plugins.upscale.upscalers import UpscaleSettings, get_upscaler

from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.kit.diffusion import generation_settings, img2img, require_mode
from aipaint.plugin.kit.image_models import pil_to_tensor, tensor_to_pil
from aipaint.plugin.kit.options import number, option_bool

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline

def sd_upscale(
    pipe: Pipeline,
    image: Image.Image,
    prompt: str | None = None,
    negative_prompt: str | None = None,
    *,
    scale: float = 2.0,
    upscaler: str = "Lanczos",
    overlap: int | None = None,
    denoising_strength: float = 0.3,
    tile_width: int | None = None,
    tile_height: int | None = None,
    request: Any = None,
    allow_pickle: bool = False,
    **params: Any,
) -> tuple[Image.Image, dict[str, str]]:
    """Upscale ``image`` by ``scale`` and redraw it tile by tile; returns (image, infotext entries).

    Tiles default to the model's native size, the overlap to an eighth of a tile (A1111's
    64 px for 512-px tiles); the prompt and seed come from ``request`` unless given.
    """
    options = {"prompt": prompt, "negative_prompt": negative_prompt, **params}
    prompt_text, negative, gen = generation_settings(options, request, what="SD upscale")
    require_mode(pipe, "img2img", "SD upscale")
    scale = number({"scale": scale}, "scale", 2.0, 1.0, 8.0)
    strength = number({"denoising_strength": denoising_strength}, "denoising_strength", 0.3, 0.0, 1.0, low_open=True)
    defaults = pipe.model.defaults
    tile_w = int(tile_width or defaults.width)
    tile_h = int(tile_height or defaults.height)
    for name, value in (("tile_width", tile_w), ("tile_height", tile_h)):
        if value % 8 or value < 16:
            raise InvalidParameter(name, value, "must be a multiple of 8, at least 16")
    width = max(8, int(image.width * scale) // 8 * 8)
    height = max(8, int(image.height * scale) // 8 * 8)
    chosen = get_upscaler(upscaler)
    if chosen.is_latent:
        raise UnsupportedFeature(f"SD upscale works on pixels; pick a pixel or model upscaler instead of {chosen.name!r}")
    big = chosen.upscale(image, (width, height), UpscaleSettings(tile=0 if chosen.kind == "pixel" else 192,
                                                                   allow_pickle=allow_pickle))
    tile_w, tile_h = min(tile_w, width), min(tile_h, height)
    # A1111's default: 64 px for 512-px tiles.
    overlap = min(tile_w, tile_h) // 8 if overlap is None else number({"overlap": overlap}, "overlap", 0, 0, 4096, integer=True)

    def redraw(tile):
        piece = tensor_to_pil(tile)
        result = img2img(pipe, piece, prompt_text, negative, what="SD upscale", denoising_strength=strength,
                         width=piece.width, height=piece.height, **gen)
        out = result.images[0]
        if out.size != piece.size:
            raise UnsupportedFeature(f"img2img returned {out.size} for a {piece.size} tile")
        return pil_to_tensor(out)

    out = process_tiled(pil_to_tensor(big), redraw, scale=1, tile=tile_w, tile_height=tile_h, overlap=overlap)
    info = {
        "Denoising strength": f"{strength:g}",
        "SD upscale overlap": str(overlap),
        "SD upscale upscaler": chosen.name,
    }
    return tensor_to_pil(out), info


def run_sd_upscale_postprocessor(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    from aipaint.plugin.postprocess import PostProcessOutput

    if pipe is None:
        raise UnsupportedFeature("SD upscale diffuses with a model: load one first")
    from aipaint_plugins.upscale import SD_UPSCALE_OPTION_NAMES

    kwargs = {k: v for k, v in options.items() if k in SD_UPSCALE_OPTION_NAMES or k == "request"}
    kwargs["allow_pickle"] = option_bool(options, "allow_pickle")
    out, info = sd_upscale(pipe, image, **kwargs)
    return PostProcessOutput(out, info)
