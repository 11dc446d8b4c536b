"""``aipaint upscale``: upscale any image, or list the upscalers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aipaint.errors import AipaintError


def add_upscale_command(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_model_options, add_overwrite_option

    p = subparsers.add_parser("upscale", help="upscale an image (Lanczos, Real-ESRGAN/SwinIR/… weights, or SD upscale)")
    p.add_argument("image", nargs="?", help="input image")
    p.add_argument("-o", "--output", help="output PNG (default: IMAGE-upscaled.png, or IMAGE-upscaled-1.png, … the first "
                                         "name not taken)")
    add_overwrite_option(p)
    p.add_argument("--upscaler", default="Lanczos", help="upscaler name, or a weights file's name in the upscaler folder (see --list)")
    p.add_argument("--scale", type=float, default=2.0, help="scale factor (default 2)")
    p.add_argument("--resize-to", help="exact output size WIDTHxHEIGHT instead of --scale")
    p.add_argument("--tile", type=int, default=192, help="tile size in input pixels for model upscalers (0: whole image)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in pixels")
    p.add_argument("--list", action="store_true", help="list the upscalers and exit")
    g = p.add_argument_group("SD upscale (redraw each tile with a model)")
    g.add_argument("--sd", action="store_true", help="A1111's SD upscale: img2img every tile after upscaling")
    g.add_argument("--prompt", default=None, help="prompt for SD upscale (default: the one stored in the PNG)")
    g.add_argument("--denoising-strength", type=float, default=0.3)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--steps", type=int, default=None)
    add_model_options(p)
    p.set_defaults(func=cmd_upscale)


def cmd_upscale(args: argparse.Namespace) -> int:
    from aipaint_plugins.upscale.upscalers import upscaler_catalogue

    from aipaint.plugin.kit.image_models import upscaler_dir

    if args.list:
        for item in upscaler_catalogue():
            print(f"{item.name:<30} {item.kind:<7} {item.description}")
        print(f"(model upscalers are read from {upscaler_dir()})", file=sys.stderr)
        return 0
    if not args.image:
        raise AipaintError("give an image to upscale (or --list)")
    from aipaint.api.result import output_path, save_png
    from aipaint.engine.postprocessing import run_postprocessors
    from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters
    from aipaint.plugin.kit.diffusion import open_image
    from aipaint.plugin.postprocess import PostStep, merge_infotext

    default = Path(args.image).with_name(Path(args.image).stem + "-upscaled.png")
    out_path = output_path(args.output, 1, overwrite=args.overwrite, default=str(default))
    image = open_image(args.image)
    parameters = read_png_parameters(args.image) or ""
    common = {"upscaler": args.upscaler, "scale": args.scale, "allow_pickle": args.allow_pickle}
    if args.overlap is not None:
        common["overlap"] = args.overlap
    if args.sd:
        options = dict(common, denoising_strength=args.denoising_strength)
        stored = generation_kwargs(Infotext.from_text(parameters)) if parameters else {}
        prompt = args.prompt if args.prompt is not None else stored.get("prompt") or None  # "": recorded without one
        if prompt is None:
            raise AipaintError("SD upscale needs a prompt: pass --prompt (the image carries none)")
        options["prompt"] = prompt
        for name in ("seed", "steps"):
            value = getattr(args, name)
            if value is None:
                value = stored.get(name)
            if value is not None:
                options[name] = value
        from aipaint.cli.api import load_pipeline

        pipe = load_pipeline(args)
        output = run_postprocessors(image, [PostStep("sd-upscale", options)], pipe)
    else:
        options = dict(common, tile=args.tile, device=args.device)
        if args.resize_to:
            options["resize_to"] = args.resize_to
        output = run_postprocessors(image, [PostStep("upscale", options)])
    text = merge_infotext(parameters, output.infotext)
    print(save_png(output.image, out_path, text, overwrite=args.overwrite))
    return 0
