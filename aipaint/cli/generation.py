"""The generation commands: ``generate`` (``txt2img``), ``img2img``, ``inpaint``, ``outpaint``,
``variations`` and ``blend``.

Each builds one request from its arguments and the generation options (``--from-png`` reads
every recorded parameter from an A1111-style PNG; explicit options override it) and hands it
to :func:`aipaint.cli.api.run_and_save`. Heavy libraries are imported inside the handlers so
``--help`` stays quick.
"""

from __future__ import annotations

import argparse
from typing import Any

from aipaint.api.request import INPAINT_FILLS, OUTPAINT_FILLS, OUTPAINT_SIDES, RESIZE_MODES
from aipaint.cli.api import (
    add_generation_options,
    add_model_options,
    add_overwrite_option,
    add_post_option,
    add_run_options,
    build_request,
    check_post_chain,
    run_and_save,
)
from aipaint.cli.workflows import add_dynamic_options, run_dynamic, wants_dynamic
from aipaint.errors import AipaintError, InvalidParameter

SIDES = ("left", "top", "right", "bottom")
IMAGE_FIELDS = ("denoising_strength", "resize_mode", "img2img_exact_steps", "mask_blur", "inpainting_mask_invert",
                "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding")
# img2img and inpaint take an outpainted PNG's parameters without extending the image again.
NOT_OUTPAINTING = dict.fromkeys(OUTPAINT_SIDES, 0)


def _add_shared(p: argparse.ArgumentParser, *, prompt_help: str = "the prompt (A1111 syntax)") -> None:
    p.add_argument("prompt", nargs="?", help=prompt_help)
    p.add_argument("--from-png", help="take the parameters stored in an A1111-style PNG (input images are still given here)")
    add_post_option(p)
    add_overwrite_option(p)
    add_generation_options(p)
    add_run_options(p)
    add_model_options(p)


def _add_strength(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument_group("image").add_argument(
        "-s", "--strength", "--denoising-strength", type=float, dest="denoising_strength", metavar="X",
        help=f"denoising strength 0–1: how much may change (default {default})")


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


def _image_request(args: argparse.Namespace, **fields: Any) -> Any:
    """The request of ``aipaint generate`` plus ``fields`` (the input images, …) and the image options given."""
    options = {name: getattr(args, name) for name in IMAGE_FIELDS if getattr(args, name, None) is not None}
    return build_request(args, **fields, **options)


def cmd_generate(args: argparse.Namespace) -> int:
    if wants_dynamic(args):  # wildcards and {a|b} variants: the prompt resolved, and recorded as its Template
        return run_dynamic(args, build_request(args))
    return run_and_save(args, build_request(args))


def cmd_img2img(args: argparse.Namespace) -> int:
    return run_and_save(args, _image_request(args, init_image=args.image, **NOT_OUTPAINTING))


def cmd_inpaint(args: argparse.Namespace) -> int:
    return run_and_save(args, _image_request(args, init_image=args.image, mask=args.mask, **NOT_OUTPAINTING))


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
    check_post_chain(args.post, args.allow_pickle)  # a typo in the chain is said first, as by every command
    Extension(*(getattr(request, f"outpaint_{side}") for side in SIDES))  # a side to extend, or it is img2img
    return run_and_save(args, request)


def cmd_variations(args: argparse.Namespace) -> int:
    return run_and_save(args, build_request(args, image_prompts=(args.image_prompt,)))


def parse_weights(text: str | None) -> tuple[float, ...]:
    """``--weights 1,2.5`` as numbers (None: equal weights); the request checks there is one per image."""
    if text is None:
        return ()
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise InvalidParameter("--weights", text, "must be numbers separated by commas, e.g. 1,2") from None
    return weights


def cmd_blend(args: argparse.Namespace) -> int:
    weights = parse_weights(args.weights)
    return run_and_save(args, build_request(args, image_prompts=tuple(args.images), image_prompt_weights=weights))


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="text to image", aliases=["txt2img"])
    _add_shared(p)
    add_dynamic_options(p)
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("img2img", help="image to image: change an image towards a prompt")
    p.add_argument("image", help="input image file")
    _add_shared(p)
    _add_strength(p, "0.75")
    _add_img2img_options(p)
    p.set_defaults(func=cmd_img2img)

    p = subparsers.add_parser("inpaint", help="repaint the white part of a mask")
    p.add_argument("image", help="input image file")
    p.add_argument("mask", help="mask image file, same size (white = repaint; alpha used when transparent)")
    _add_shared(p)
    _add_strength(p, "0.75")
    _add_img2img_options(p)
    _add_mask_options(p)
    p.set_defaults(func=cmd_inpaint)

    p = subparsers.add_parser("outpaint", help="extend an image on any side and paint the new area")
    p.add_argument("image", help="input image file")
    _add_shared(p)
    _add_strength(p, "1.0")
    g = p.add_argument_group("outpaint")
    for side in SIDES:
        g.add_argument(f"--{side}", type=int, metavar="PX", help=f"pixels to add on the {side} (default 0)")
    g.add_argument("--fill", choices=OUTPAINT_FILLS, help="how the new area starts (default: edge colours)")
    g.add_argument("--mask-blur", type=int, metavar="PX", help="feather of the seam inside the new area, pixels (default 8)")
    p.set_defaults(func=cmd_outpaint)

    p = subparsers.add_parser("variations", help="pictures like an image (families that take image prompts; `aipaint plugins` lists them)")
    p.add_argument("image_prompt", metavar="IMAGE", help="the image to make variations of")
    _add_shared(p, prompt_help="an optional prompt to steer the variations")
    p.set_defaults(func=cmd_variations)

    p = subparsers.add_parser("blend", help="a picture mixing 2-5 images (families that take image prompts; `aipaint plugins` lists them)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="the images to mix")
    p.add_argument("--prompt", help="an optional prompt to steer the mix")
    p.add_argument("--weights", metavar="W1,W2,...", help="how much of each image, one number per image (default: equal)")
    p.add_argument("--from-png", help="take the parameters stored in an A1111-style PNG")
    add_post_option(p)
    add_overwrite_option(p)
    add_generation_options(p)
    add_run_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_blend)
