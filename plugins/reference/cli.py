"""Command line: ``--reference IMAGE`` and its settings on every generation command.

``--reference IMAGE`` (repeatable: one unit each) with ``--reference-mode``
(``reference-only`` or ``ip-adapter``), ``--reference-weight W`` and, for the other unit
options, ``--reference-option KEY=VALUE`` (e.g. ``style_fidelity=0.8``, ``model=ip-adapter-plus_sd15``),
which apply to every ``--reference``. With ``--from-png``, the recorded units come back when
``--reference`` gives their images again (PNGs do not store them).
"""

from __future__ import annotations

import argparse
from typing import Any

from aipaint.errors import AipaintError


def add_options(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_adapter_unit_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        group = parser.add_argument_group("reference image")
        group.add_argument("--reference", action="append", default=[], metavar="IMAGE",
                           help="take style (colours, textures) from this image; repeatable")
        group.add_argument("--reference-mode", choices=("reference-only", "reference-adain", "reference-adain+attn", "ip-adapter"),
                           default=None,
                           help="reference-only: share the image's attention (default); reference-adain(+attn): match its feature "
                                "statistics (and share attention), no weights; "
                                "ip-adapter: IP-Adapter weights and a CLIP image encoder")
        group.add_argument("--reference-weight", type=float, default=None, metavar="W",
                           help="0-2, default 1: reference-only's share of attention layers, IP-Adapter's scale")
        group.add_argument("--reference-option", action="append", default=[], metavar="KEY=VALUE",
                           help="another reference unit option (style_fidelity, guidance_start, guidance_end, "
                                "control_mode, model, image_encoder), repeatable")
        add_adapter_unit_builder(parser, build_units)


def build_units(args: argparse.Namespace, png_params: dict[str, str]) -> list[Any]:
    from aipaint.cli.api import parse_key_values
    from aipaint.plugin.adapters import AdapterUnit

    from .units import units_from_params

    images = getattr(args, "reference", None) or []
    mode = getattr(args, "reference_mode", None)
    weight = getattr(args, "reference_weight", None)
    extra = parse_key_values(getattr(args, "reference_option", None) or [], "--reference-option")
    if not images:
        if mode is not None or weight is not None or extra:
            raise AipaintError("--reference-mode, --reference-weight and --reference-option need --reference IMAGE")
        return []
    overrides: dict[str, Any] = dict(extra)
    if mode is not None:
        overrides["mode"] = mode
    if weight is not None:
        overrides["weight"] = weight
    recorded = units_from_params(png_params)
    if recorded:
        if len(images) != len(recorded):
            raise AipaintError(f"{args.from_png} was made with {len(recorded)} reference image(s); PNGs do not store "
                               f"them, so pass --reference once per unit, in order (got {len(images)})")
        return [AdapterUnit("reference", {**options, **overrides, "image": image})
                for options, image in zip(recorded, images, strict=True)]
    return [AdapterUnit("reference", {**overrides, "image": image}) for image in images]
