"""Stickers: cut the subject from its background, add an outline, save a transparent PNG.

Post-processor ``sticker`` (no model needed); command ``aipaint sticker``.
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

STICKER_OPTIONS = ("method", "tolerance", "outline_width", "outline_colour", "keep_largest", "padding")


def run_sticker(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    from aipaint_plugins.sticker.cutout import make_sticker

    from aipaint.plugin.kit.options import number, option_bool
    from aipaint.plugin.postprocess import PostProcessOutput

    method = options.get("method") or "floodfill"
    width = number(options, "outline_width", 8, 0, 512, integer=True)
    sticker, _ = make_sticker(
        image,
        method=method,
        tolerance=number(options, "tolerance", 40.0, 0.0, 442.0),
        outline_width=width,
        outline_colour=options.get("outline_colour") or "white",
        keep_largest=option_bool(options, "keep_largest", True),
        padding=None if options.get("padding") is None else number(options, "padding", 0, 0, 4096, integer=True),
    )
    name = method if isinstance(method, str) else getattr(method, "__name__", "custom")
    return PostProcessOutput(sticker, {"Sticker": f"{name}, outline {width}px {options.get('outline_colour') or 'white'}"})


@hookimpl
def register_postprocessors(register: Callable[[PostProcessorSpec], None]) -> None:
    register(PostProcessorSpec("sticker", run_sticker, (), "cut out the subject, outline it, transparent background",
                               False, STICKER_OPTIONS))


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_overwrite_option

    p = subparsers.add_parser("sticker", help="cut out the subject and make a transparent sticker PNG with an outline")
    p.add_argument("image")
    p.add_argument("-o", "--output", help="output PNG (default: IMAGE-sticker.png, or the first free IMAGE-sticker-N.png)")
    add_overwrite_option(p)
    p.add_argument("--method", default="floodfill", choices=["floodfill", "grabcut"])
    p.add_argument("--tolerance", type=float, default=40.0, help="flood fill: RGB distance to the border colour (default 40)")
    p.add_argument("--outline-width", type=int, default=8)
    p.add_argument("--outline-colour", "--outline-color", default="white")
    p.set_defaults(func=_cmd_sticker)


def _cmd_sticker(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aipaint.api.result import output_path, save_png
    from aipaint.engine.postprocessing import run_postprocessors
    from aipaint.infotext import read_png_parameters
    from aipaint.plugin.kit.diffusion import open_image
    from aipaint.plugin.postprocess import PostStep, merge_infotext

    default = Path(args.image).with_name(Path(args.image).stem + "-sticker.png")
    out_path = output_path(args.output, 1, overwrite=args.overwrite, default=str(default))  # checked before the work
    options = {"method": args.method, "tolerance": args.tolerance, "outline_width": args.outline_width,
               "outline_colour": args.outline_colour}
    output = run_postprocessors(open_image(args.image), [PostStep("sticker", options)])
    parameters = read_png_parameters(args.image) or ""
    text = merge_infotext(parameters, output.infotext)
    print(save_png(output.image, out_path, text, overwrite=args.overwrite))
    return 0
