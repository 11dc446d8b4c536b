"""The ``aipaint img2img``, ``aipaint inpaint`` and ``aipaint outpaint`` commands.

Each takes the input image (and mask) as files, the prompt, and the options of
``aipaint generate``; ``--from-png`` reads every recorded parameter (strength, mask
options, variation seed, …) from an A1111-style PNG, and explicit options override it.
Heavy libraries are imported inside the handlers so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from aipaint.cli.main import (
    _add_generation_options,
    _add_model_options,
    _generation_request,
    add_overwrite_option,
    add_post_option,
    run_and_save,
)
from aipaint.errors import AipaintError
from aipaint.api.request import INPAINT_FILLS, OUTPAINT_SIDES, RESIZE_MODES
from aipaint.imageutil import OUTPAINT_FILLS


def _add_common(p: argparse.ArgumentParser, strength_default: str) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax)")
    p.add_argument("--from-png", help="take the parameters stored in an A1111-style PNG (the input image is still given here)")
    g = p.add_argument_group("image")
    g.add_argument("-s", "--strength", "--denoising-strength", type=float, dest="denoising_strength", metavar="X",
                   help=f"denoising strength 0–1: how much may change (default {strength_default})")
    add_post_option(p)
    add_overwrite_option(p)
    _add_generation_options(p)
    _add_model_options(p)


def _add_img2img_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("img2img")
    g.add_argument("--resize-mode", choices=RESIZE_MODES, help="how the image is fitted to -W/-H (default: just resize)")
    g.add_argument("--exact-steps", action="store_true", default=None, dest="img2img_exact_steps",
                   help="run exactly --steps steps whatever the strength (A1111's option)")


def _add_mask_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mask")
    g.add_argument("--mask-blur", type=int, metavar="PX", help="Gaussian blur of the mask edge, pixels (default 4)")
    g.add_argument("--invert-mask", action="store_true", default=None, dest="inpainting_mask_invert",
                   help="repaint the black part of the mask instead of the white")
    g.add_argument("--masked-content", choices=INPAINT_FILLS, dest="inpainting_fill",
                   help="what the masked area starts from (default: original)")
    g.add_argument("--only-masked", action="store_true", default=None, dest="inpaint_full_res",
                   help="generate only the mask's region, at full size, and paste it back")
    g.add_argument("--padding", type=int, dest="inpaint_full_res_padding", metavar="PX",
                   help="pixels around the mask's region with --only-masked (default 32)")


SIDES = ("left", "top", "right", "bottom")
IMAGE_FIELDS = ("denoising_strength", "resize_mode", "img2img_exact_steps", "mask_blur", "inpainting_mask_invert",
                "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding")


def _image_request(args: argparse.Namespace, **fields: Any) -> Any:
    """The request of ``aipaint generate`` plus ``fields`` (the input images, …) and the image options given."""
    request = _generation_request(args)
    options = {name: getattr(args, name) for name in IMAGE_FIELDS if getattr(args, name, None) is not None}
    return dataclasses.replace(request, **fields, **options)


# img2img and inpaint take an outpainted PNG's parameters without extending the image again.
NOT_OUTPAINTING = dict.fromkeys(OUTPAINT_SIDES, 0)


def cmd_img2img(args: argparse.Namespace) -> int:
    request = _image_request(args, init_image=args.image, **NOT_OUTPAINTING)
    return run_and_save(args, lambda pipe, progress: pipe.generate(request, progress=progress), images=request.batch_size)


def cmd_inpaint(args: argparse.Namespace) -> int:
    request = _image_request(args, init_image=args.image, mask=args.mask, **NOT_OUTPAINTING)
    return run_and_save(args, lambda pipe, progress: pipe.generate(request, progress=progress), images=request.batch_size)


def cmd_outpaint(args: argparse.Namespace) -> int:
    from aipaint.engine.modes import Extension

    if args.width or args.height:
        raise AipaintError("outpaint sets the size itself (the image plus the extension): leave out -W/-H")
    # Sides and fill given here override those recorded in --from-png's PNG, one by one.
    options = {f"outpaint_{side}": getattr(args, side) for side in SIDES if getattr(args, side) is not None}
    if args.fill is not None:
        options["outpaint_fill"] = args.fill
    # The canvas is worked out again from this image (a PNG written before aipaint recorded
    # the sides gives its canvas as Size).
    request = _image_request(args, init_image=args.image, width=None, height=None, **options)
    # Without a side to extend, outpaint() refuses the request: that is the error to report, not the output's.
    images = request.batch_size if request.outpaints else None

    def outpaint(pipe: Any, progress: Any) -> Any:
        if not request.outpaints:
            Extension()  # says that outpainting needs a side to extend
        return pipe.generate(request, progress=progress)

    return run_and_save(args, outpaint, images=images)


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("img2img", help="image to image: change an image towards a prompt")
    p.add_argument("image", help="input image file")
    _add_common(p, "0.75")
    _add_img2img_options(p)
    p.set_defaults(func=cmd_img2img)

    p = subparsers.add_parser("inpaint", help="repaint the white part of a mask")
    p.add_argument("image", help="input image file")
    p.add_argument("mask", help="mask image file, same size (white = repaint; alpha used when transparent)")
    _add_common(p, "0.75")
    _add_img2img_options(p)
    _add_mask_options(p)
    p.set_defaults(func=cmd_inpaint)

    p = subparsers.add_parser("outpaint", help="extend an image on any side and paint the new area")
    p.add_argument("image", help="input image file")
    _add_common(p, "1.0")
    g = p.add_argument_group("outpaint")
    for side in SIDES:
        g.add_argument(f"--{side}", type=int, metavar="PX", help=f"pixels to add on the {side} (default 0)")
    g.add_argument("--fill", choices=OUTPAINT_FILLS, help="how the new area starts (default: edge colours)")
    g.add_argument("--mask-blur", type=int, metavar="PX", help="feather of the seam inside the new area, pixels (default 8)")
    p.set_defaults(func=cmd_outpaint)
