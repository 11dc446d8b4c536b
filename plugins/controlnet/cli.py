"""Command line: ``aipaint preprocess``, ``aipaint controlnets`` and ``--controlnet`` for generation.

``--controlnet MODEL:IMAGE[:PREPROCESSOR][:WEIGHT][:KEY=VALUE…]`` adds a unit (repeatable);
keys are unit options or the short forms ``start``, ``end``, ``mode``, ``resize``, ``type``
(``union_control_type``).
``--control-image IMAGE`` (repeatable) gives the control images again for ``--from-png``:
PNGs record the units (model, preprocessor, weight, window, mode) but not the images.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from aipaint.errors import AipaintError, shown

SHORT_KEYS = {"start": "guidance_start", "end": "guidance_end", "mode": "control_mode", "resize": "resize_mode",
              "type": "union_control_type"}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("preprocess", help="show what a ControlNet preprocessor makes of an image")
    p.add_argument("image", nargs="?", help="input image")
    p.add_argument("-p", "--preprocessor", default="canny", help="preprocessor name (default: canny; --list shows all)")
    p.add_argument("-o", "--output", help="output PNG (default: IMAGE-PREPROCESSOR.png, or the first free IMAGE-PREPROCESSOR-N.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (default: it is an error)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preprocessor setting, repeatable")
    p.add_argument("--mask", help="mask image (white = repaint), for the inpaint preprocessor")
    p.add_argument("-W", "--width", type=int, help="resize to this width first (default: the image's)")
    p.add_argument("-H", "--height", type=int, help="resize to this height first (default: the image's)")
    p.add_argument("--resize-mode", default="Crop and Resize", help="Just Resize, Crop and Resize, Resize and Fill")
    p.add_argument("--list", action="store_true", help="list the preprocessors and their settings")
    p.set_defaults(func=cmd_preprocess)

    p = subparsers.add_parser("controlnets", help="list the ControlNet models found (zoo and ControlNet folder)")
    p.set_defaults(func=cmd_controlnets)

    from aipaint.cli.api import add_adapter_unit_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        group = parser.add_argument_group("ControlNet")
        group.add_argument("--controlnet", action="append", default=[], metavar="MODEL:IMAGE[:PREPROCESSOR][:WEIGHT][:K=V]",
                           help="add a ControlNet unit, repeatable; e.g. my-canny:photo.png:canny:0.8:end=0.6")
        group.add_argument("--control-image", action="append", default=[], metavar="IMAGE",
                           help="with --from-png: the control image of each recorded ControlNet unit, in order")
        add_adapter_unit_builder(parser, build_units)


def _value(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def _model_argument(text: str) -> Any:
    """An existing path typed on the command line is used as a path; anything else is a name."""
    looks_like_path = os.sep in text or "/" in text or text.lower().endswith((".safetensors", ".pth", ".ckpt"))
    try:
        exists = looks_like_path and Path(text).expanduser().exists()
    except (OSError, RuntimeError):  # too long to be a path (ENAMETOOLONG), "~nobody/…" (no such user): no file
        exists = False
    return Path(text) if exists else text


def parse_controlnet_option(text: str) -> dict[str, Any]:
    """``MODEL:IMAGE[:PREPROCESSOR][:WEIGHT][:KEY=VALUE…]`` → unit options (in time linear in the text's length)."""
    parts = text.split(":")
    if len(parts) < 2 or not parts[0] or not parts[1]:
        raise AipaintError(f"--controlnet expects MODEL:IMAGE[:PREPROCESSOR][:WEIGHT][:KEY=VALUE…], got {shown(text)}")
    options: dict[str, Any] = {"model": _model_argument(parts[0]), "image": parts[1]}
    positional = ["preprocessor", "weight"]
    for part in parts[2:]:
        key, sep, value = part.partition("=")
        if sep:
            options[SHORT_KEYS.get(key.strip(), key.strip())] = _value(value.strip())
        elif positional:
            name = positional.pop(0)
            options[name] = _value(part) if name == "weight" else part
        else:
            raise AipaintError(f"--controlnet {shown(text)}: {shown(part)} is neither PREPROCESSOR, WEIGHT nor KEY=VALUE")
    if isinstance(options.get("weight"), str):
        raise AipaintError(f"--controlnet {shown(text)}: the weight must be a number, got {shown(options['weight'])}")
    return options


def build_units(args: argparse.Namespace, png_params: dict[str, str]) -> list[Any]:
    from aipaint.plugin.adapters import AdapterUnit

    from .units import units_from_params

    specs = getattr(args, "controlnet", None) or []
    images = getattr(args, "control_image", None) or []
    if specs:
        if images:
            raise AipaintError("give control images inside --controlnet MODEL:IMAGE, or with --control-image for the units "
                               "recorded in --from-png's PNG, not both")
        return [AdapterUnit("controlnet", parse_controlnet_option(s)) for s in specs]
    recorded = units_from_params(png_params)
    if not recorded:
        if images:
            raise AipaintError("--control-image gives the images of the ControlNet units recorded in a PNG (--from-png); "
                               "this run has none: use --controlnet MODEL:IMAGE")
        return []
    if len(images) != len(recorded):
        models = ", ".join(str(u["model"]) for u in recorded)
        raise AipaintError(
            f"{args.from_png} was made with {len(recorded)} ControlNet unit(s) ({models}); PNGs do not store control images "
            f"(as in A1111), so pass --control-image once per unit, in order (got {len(images)})"
        )
    return [AdapterUnit("controlnet", {**options, "image": image}) for options, image in zip(recorded, images, strict=True)]


def cmd_preprocess(args: argparse.Namespace) -> int:
    from aipaint.cli.api import parse_key_values
    from aipaint.plugin.host import default_host

    registry = default_host().registry.preprocessors
    if args.list:
        for spec in registry:
            settings = ", ".join(f"{p.name}={p.default:g} [{p.minimum:g}..{p.maximum:g}]" for p in spec.params) or "-"
            weights = f"  needs: {', '.join(spec.weights)}" if spec.weights else ""
            print(f"{spec.name:<10} {spec.description}; settings: {settings}{weights}")
        return 0
    if not args.image:
        raise AipaintError("give an image to preprocess (or --list)")
    from aipaint.api.result import output_path, save_png

    from .units import RESIZE_MODES, fit_image, load_image

    spec = registry.get(args.preprocessor)
    default = Path(args.image).with_name(f"{Path(args.image).stem}-{spec.name}.png")
    output = output_path(args.output, 1, overwrite=args.overwrite, default=str(default))  # checked before the work
    image = load_image(args.image, "image").convert("RGB")
    mode = RESIZE_MODES.get(args.resize_mode.strip().lower())
    if mode is None:
        raise AipaintError(f"--resize-mode must be one of {', '.join(dict.fromkeys(RESIZE_MODES.values()))}")
    width, height = args.width or image.width, args.height or image.height
    image = fit_image(image, width, height, mode)
    mask = fit_image(load_image(args.mask, "mask").convert("L"), width, height, mode, is_mask=True) if args.mask else None
    result = spec.apply(image, parse_key_values(args.set, "--set"), mask)
    print(save_png(result, output, None, overwrite=args.overwrite))
    return 0


def cmd_controlnets(args: argparse.Namespace) -> int:
    from . import models

    for card_id, card in sorted(models.zoo_controlnets().items()):
        print(f"{card_id:<36} zoo     {card.description}")
    folder = models.controlnet_dir()
    found = models.folder_models(folder)
    for name, path in found.items():
        print(f"{name:<36} folder  {path}")
    if not found:
        print(f"(no models in {folder}; set AIPAINT_CONTROLNET_DIR or put diffusers folders / .safetensors files there)")
    return 0
