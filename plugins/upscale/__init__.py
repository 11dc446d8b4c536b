"""Upscaling: latent, pixel and model upscalers (spandrel), tiled; hires fix; SD upscale.

Post-processors: ``upscale`` (any image, no model), ``hires`` (A1111's hires fix) and
``sd-upscale`` (A1111's SD upscale script). Command: ``aipaint upscale``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.plugin.postprocess import PostProcessorSpec

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline

UPSCALE_OPTIONS = ("upscaler", "scale", "resize_to", "tile", "overlap", "allow_pickle", "device")


def run_upscale(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    """The ``upscale`` post-processor (A1111's Extras tab): any image, no diffusion."""
    from aipaint_plugins.upscale.upscalers import DEFAULT_TILE, UpscaleSettings, get_upscaler

    from aipaint.plugin.kit.options import number, option_bool, parse_size
    from aipaint.plugin.postprocess import PostProcessOutput

    upscaler = get_upscaler(str(options.get("upscaler") or "Lanczos"))
    scale = number(options, "scale", 2.0, 0.0, 16.0, low_open=True)
    size = parse_size(options.get("resize_to"), "resize_to") or (round(image.width * scale), round(image.height * scale))
    settings = UpscaleSettings(
        tile=number(options, "tile", DEFAULT_TILE, 0, 1 << 16, integer=True),
        overlap=None if options.get("overlap") is None else number(options, "overlap", 0, 0, 1 << 15, integer=True),
        device=str(options.get("device") or "cpu"),
        allow_pickle=option_bool(options, "allow_pickle"),
    )
    out = upscaler.upscale(image, size, settings)
    info = {"Postprocess upscaler": upscaler.name}
    if options.get("resize_to"):
        info["Postprocess upscale to"] = f"{size[0]}x{size[1]}"
    else:
        info["Postprocess upscale by"] = f"{scale:g}"
    return PostProcessOutput(out, info)


def _run_hires(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    from aipaint_plugins.upscale.hires import run_hires_postprocessor

    return run_hires_postprocessor(image, options, pipe)


def _run_sd_upscale(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    from aipaint_plugins.upscale.sd_upscale import run_sd_upscale_postprocessor

    return run_sd_upscale_postprocessor(image, options, pipe)


# Option names are listed here (not imported) so registration stays free of torch imports.
HIRES_OPTION_NAMES = ("scale", "resize_to", "upscaler", "hires_steps", "denoising_strength", "hires_prompt",
                      "hires_negative_prompt", "hires_sampler", "tile", "overlap", "allow_pickle",
                      "prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "clip_skip")
SD_UPSCALE_OPTION_NAMES = ("scale", "upscaler", "overlap", "denoising_strength", "tile_width", "tile_height", "allow_pickle",
                           "prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "clip_skip")


@hookimpl
def register_postprocessors(register: Callable[[PostProcessorSpec], None]) -> None:
    register(PostProcessorSpec("upscale", run_upscale, ("upscaler",),
                               "resize with a pixel or model upscaler (tiled)", False, UPSCALE_OPTIONS))
    register(PostProcessorSpec("hires", _run_hires, ("hires-fix", "hiresfix"),
                               "A1111 hires fix: upscale, then denoise again", True, HIRES_OPTION_NAMES))
    register(PostProcessorSpec("sd-upscale", _run_sd_upscale, ("sdupscale",),
                               "A1111 SD upscale: upscale, img2img each tile, blend seams", True, SD_UPSCALE_OPTION_NAMES))


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint_plugins.upscale.commands import add_upscale_command

    add_upscale_command(subparsers)
