"""QR-code art: pictures that carry a code which real decoders read.

Post-processor ``qr`` blends a code into any picture (no model needed) and repairs it
until it decodes. Command ``aipaint qr PAYLOAD --prompt …`` generates the art first.
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

QR_OPTIONS = ("payload", "version", "start", "step", "safety", "decoders")


def _settings(options: dict[str, Any]) -> Any:
    from aipaint_plugins.qrcode.art import RepairSettings

    return RepairSettings(**{k: options[k] for k in ("start", "step", "safety") if options.get(k) is not None})


def _decoders(value: Any) -> tuple[str, ...] | None:
    if value in (None, "", "all"):
        return None
    return tuple(value.split("+")) if isinstance(value, str) else tuple(value)


def run_qr(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    """The ``qr`` post-processor: carry ``payload`` in ``image``; the result always decodes."""
    from aipaint_plugins.qrcode.art import carry_code

    from aipaint.errors import InvalidParameter
    from aipaint.plugin.postprocess import PostProcessOutput

    payload = options.get("payload")
    if not payload:
        raise InvalidParameter("payload", payload, "the qr post-processor needs payload=TEXT")
    art = carry_code(image, str(payload), version=options.get("version"), repair_settings=_settings(options),
                     decoders=_decoders(options.get("decoders")))
    return PostProcessOutput(art.image, art.infotext("blend"))


@hookimpl
def register_postprocessors(register: Callable[[PostProcessorSpec], None]) -> None:
    register(PostProcessorSpec("qr", run_qr, ("qrcode", "qr-code"),
                               "blend a QR code into the picture until real decoders read it", False, QR_OPTIONS))


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_model_options

    p = subparsers.add_parser("qr", help="QR-code art: a picture that scans (verified with real decoders)")
    p.add_argument("payload", help="the text or URL to encode")
    p.add_argument("--prompt", help="what to draw (omit with --image to carry the code in an existing picture)")
    p.add_argument("-n", "--negative-prompt", default="")
    p.add_argument("--image", help="carry the code in this picture instead of generating one")
    p.add_argument("-o", "--output", help="output PNG (default: qr.png, or the first free qr-N.png; a batch adds -0, -1, …)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: they are an error)")
    p.add_argument("--size", type=int, help="picture size in px (default: the model's)")
    p.add_argument("--version", type=int, help="QR version 1-40 (default: the smallest that fits)")
    p.add_argument("--denoising-strength", type=float, default=0.75, help="img2img strength over the code (default 0.75)")
    p.add_argument("--controlnet", default="auto",
                   help="QR ControlNet to draw with: auto (an installed one with 'qr' in its name, else img2img), none, or a name")
    p.add_argument("--safety", type=float, default=0.1, help="extra code contribution above the least that decodes")
    p.add_argument("--decoders", default="all", help="opencv, zxing, or opencv+zxing (default: all installed)")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, default=1)
    add_model_options(p)
    p.set_defaults(func=_cmd_qr)


def _cmd_qr(args: argparse.Namespace) -> int:
    import sys

    from aipaint_plugins.qrcode.art import RepairSettings, carry_code, qr_art

    from aipaint.api.result import batch_paths, output_path, save_png
    from aipaint.errors import AipaintError
    from aipaint.plugin.kit.diffusion import open_image

    settings = RepairSettings(safety=args.safety)
    decoders = _decoders(args.decoders)
    count = 1 if args.image else (args.batch_size or 1)
    output = output_path(args.output, count, overwrite=args.overwrite, default="qr.png")  # checked before the work
    if args.image:
        from aipaint.infotext import read_png_parameters
        from aipaint.plugin.postprocess import merge_infotext

        art = carry_code(open_image(args.image), args.payload, version=args.version, repair_settings=settings, decoders=decoders)
        # The picture's own parameters stay, as every post-processor's command keeps them.
        results = [(art, merge_infotext(read_png_parameters(args.image) or "", art.infotext("blend")))]
    else:
        if not args.prompt:
            raise AipaintError("give --prompt to generate art, or --image to carry the code in a picture")
        from aipaint.cli.api import load_pipeline

        params = {k: getattr(args, k) for k in ("seed", "steps", "batch_size") if getattr(args, k) is not None}
        results = qr_art(load_pipeline(args), args.payload, args.prompt, args.negative_prompt, size=args.size, version=args.version,
                         denoising_strength=args.denoising_strength, controlnet=args.controlnet, repair_settings=settings,
                         decoders=decoders, **params)
    for path, (art, text) in zip(batch_paths(output, len(results)), results, strict=True):
        print(save_png(art.image, path, text, overwrite=args.overwrite))
        print(f"decodes with {'+'.join(art.decoders)}; code contribution {art.contribution:.2f}, "
              f"margin {art.margin:.2f} (still decodes down to {art.lowest_contribution:.2f})", file=sys.stderr)
    return 0
