"""Face fix: ADetailer-style detect → inpaint, and face restoration models.

Post-processors: ``facefix`` (needs a model; inpaints each face, optionally restores it
afterwards) and ``face-restore`` (GFPGAN/CodeFormer/RestoreFormer weights, no diffusion
model). Command: ``aipaint facefix``.
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

FACEFIX_OPTION_NAMES = ("detector", "confidence", "max_faces", "mask_dilation", "mask_blur", "padding", "denoising_strength",
                        "inpaint_width", "inpaint_height", "restorer", "restore_visibility", "allow_pickle",
                        "prompt", "negative_prompt", "steps", "cfg_scale", "sampler", "schedule", "seed", "clip_skip")
RESTORE_OPTION_NAMES = ("restorer", "visibility", "detector", "confidence", "max_faces", "mask_dilation", "mask_blur",
                        "padding", "allow_pickle")


def _run_facefix(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    from aipaint_plugins.facefix.fix import run_facefix

    return run_facefix(image, options, pipe)


def _run_restore(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    from aipaint_plugins.facefix.fix import run_restore

    return run_restore(image, options, pipe)


@hookimpl
def register_postprocessors(register: Callable[[PostProcessorSpec], None]) -> None:
    register(PostProcessorSpec("facefix", _run_facefix, ("adetailer", "face-fix"),
                               "ADetailer: detect faces, inpaint each at a higher resolution", True, FACEFIX_OPTION_NAMES))
    register(PostProcessorSpec("face-restore", _run_restore, ("face-restoration", "restore-faces"),
                               "restore faces with GFPGAN/CodeFormer/RestoreFormer weights", False, RESTORE_OPTION_NAMES))


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_model_options, add_overwrite_option

    p = subparsers.add_parser("facefix", help="find faces and redraw them (ADetailer), or restore them with GFPGAN/CodeFormer")
    p.add_argument("image")
    p.add_argument("-o", "--output", help="output PNG (default: IMAGE-facefix.png, or the first free IMAGE-facefix-N.png)")
    add_overwrite_option(p)
    p.add_argument("--prompt", help="prompt for the faces (default: the one stored in the PNG)")
    p.add_argument("-n", "--negative-prompt")
    p.add_argument("--detector", default="face_haar", help="face_haar (default), face_haar_alt, profile_haar, yunet")
    p.add_argument("--confidence", type=float, default=0.3)
    p.add_argument("--denoising-strength", type=float, default=0.4)
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--padding", type=int, default=32)
    p.add_argument("--mask-blur", type=int, default=4)
    p.add_argument("--restorer", help="GFPGAN/CodeFormer/RestoreFormer weights: a file's name in the upscaler folder")
    p.add_argument("--visibility", type=float, default=1.0, help="blend strength of the restored faces (0-1)")
    p.add_argument("--restore-only", action="store_true", help="only restore faces (no diffusion model needed)")
    p.add_argument("--detect-only", action="store_true", help="print the faces found and exit")
    add_model_options(p)
    p.set_defaults(func=_cmd_facefix)


def _cmd_facefix(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aipaint_plugins.facefix.fix import detect_faces

    from aipaint.api.result import output_path, save_png
    from aipaint.engine.postprocessing import run_postprocessors
    from aipaint.errors import AipaintError
    from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters
    from aipaint.plugin.kit.diffusion import open_image
    from aipaint.plugin.postprocess import PostStep, merge_infotext

    image = open_image(args.image)
    if args.detect_only:
        found, name = detect_faces(image, args.detector, args.confidence)
        for d in found:
            print(f"{d.label} {d.box[0]},{d.box[1]},{d.box[2]},{d.box[3]} score {d.score:.2f} ({name})")
        return 0 if found else 1
    default = Path(args.image).with_name(Path(args.image).stem + "-facefix.png")
    out_path = output_path(args.output, 1, overwrite=args.overwrite, default=str(default))  # checked before the work
    parameters = read_png_parameters(args.image) or ""
    common = {"detector": args.detector, "confidence": args.confidence, "padding": args.padding,
              "mask_blur": args.mask_blur, "allow_pickle": args.allow_pickle}
    if args.restore_only:
        if not args.restorer:
            raise AipaintError("--restore-only needs --restorer WEIGHTS")
        output = run_postprocessors(image, [PostStep("face-restore", dict(common, restorer=args.restorer,
                                                                          visibility=args.visibility))])
    else:
        stored = generation_kwargs(Infotext.from_text(parameters)) if parameters else {}
        options = dict(common, denoising_strength=args.denoising_strength)
        prompt = args.prompt if args.prompt is not None else stored.get("prompt") or None  # "": recorded without one
        if prompt is None:
            raise AipaintError("face fix needs a prompt: pass --prompt (the image carries none)")
        options["prompt"] = prompt
        if args.negative_prompt is not None:
            options["negative_prompt"] = args.negative_prompt
        for name in ("seed", "steps"):
            value = getattr(args, name)
            value = stored.get(name) if value is None else value
            if value is not None:
                options[name] = value
        if args.restorer:
            options.update(restorer=args.restorer, restore_visibility=args.visibility)
        from aipaint.cli.api import load_pipeline

        output = run_postprocessors(image, [PostStep("facefix", options)], load_pipeline(args))
    text = merge_infotext(parameters, output.infotext)
    print(save_png(output.image, out_path, text, overwrite=args.overwrite))
    return 0
