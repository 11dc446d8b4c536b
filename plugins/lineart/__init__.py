"""Line-art colouring: paint a line drawing and keep its lines.

Post-processor ``lineart`` (needs a model); command ``aipaint lineart``.
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

LINEART_OPTIONS = ("denoising_strength", "controlnet", "paper",
                   "prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "clip_skip")


def _run_lineart(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    from aipaint_plugins.lineart.colour import run_lineart

    return run_lineart(image, options, pipe)


@hookimpl
def register_postprocessors(register: Callable[[PostProcessorSpec], None]) -> None:
    register(PostProcessorSpec("lineart", _run_lineart, ("line-art", "colourise", "colorize"),
                               "colour a line drawing, keeping its lines", True, LINEART_OPTIONS))


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_model_options, add_overwrite_option

    p = subparsers.add_parser("lineart", help="colour a line drawing while keeping its lines")
    p.add_argument("image", help="the line drawing (dark lines on light paper)")
    p.add_argument("--prompt", required=True)
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("-o", "--output", help="output PNG (default: IMAGE-coloured.png, or the first free IMAGE-coloured-N.png)")
    add_overwrite_option(p)
    p.add_argument("--denoising-strength", type=float, default=0.8)
    p.add_argument("--controlnet", default="auto",
                   help="lineart ControlNet: auto (an installed one with 'lineart' in its name, else img2img), none, or a name")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    add_model_options(p)
    p.set_defaults(func=_cmd_lineart)


def _cmd_lineart(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aipaint_plugins.lineart.colour import colour_lineart

    from aipaint.api.result import output_path, save_png
    from aipaint.cli.api import load_pipeline
    from aipaint.plugin.kit.diffusion import open_image
    from aipaint.plugin.postprocess import merge_infotext

    default = Path(args.image).with_name(Path(args.image).stem + "-coloured.png")
    out_path = output_path(args.output, 1, overwrite=args.overwrite, default=str(default))  # checked before the work
    params = {k: getattr(args, k) for k in ("seed", "steps") if getattr(args, k) is not None}
    images, info, result = colour_lineart(load_pipeline(args), open_image(args.image), args.prompt, args.negative_prompt,
                                          denoising_strength=args.denoising_strength, controlnet=args.controlnet, **params)
    print(save_png(images[0], out_path, merge_infotext(result.infotexts[0], info), overwrite=args.overwrite))
    return 0
