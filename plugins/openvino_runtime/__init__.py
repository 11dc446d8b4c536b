"""The ``openvino`` runtime and ``aipaint export openvino``.

Convert an ONNX export to OpenVINO IR once (``aipaint export onnx MODEL -o ONNX_DIR``, then
``aipaint export openvino ONNX_DIR -o OV_DIR [--weights int8]``), then load with
``aipaint.load(MODEL, runtime="openvino", runtime_options={"openvino_dir": OV_DIR})``: the
UNet, the VAE and the text encoder run as OpenVINO compiled models on the CPU, compiled per
request shape, in bf16 on CPUs with bf16 units (OpenVINO's own default there) and fp32
elsewhere. See ``docs/runtimes.md``.

Registration is light: openvino, nncf and torch are imported only when a folder is
converted or a model prepared, so ``aipaint --help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.plugin.runtimes import RuntimeSpec

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel


def _unavailable() -> str | None:
    from importlib.util import find_spec

    if find_spec("openvino") is None:
        return "the openvino package is not installed (pip install 'aipaint[openvino]')"
    return None


def _prepare(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    from aipaint_plugins.openvino_runtime.runtime import prepare_openvino

    prepare_openvino(model, options)


@hookimpl
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    register(
        RuntimeSpec(
            name="openvino",
            prepare=_prepare,
            unavailable=_unavailable,
            aliases=("ov",),
            description="OpenVINO on an `aipaint export openvino` folder (runtime option openvino_dir; CPU, bf16 where it has bf16 units)",
        )
    )


def cmd_export_openvino(args: argparse.Namespace) -> int:
    from aipaint_plugins.openvino_runtime.convert import convert_to_openvino

    from aipaint.errors import AipaintError

    problem = _unavailable()
    if problem:
        raise AipaintError(f"cannot convert to OpenVINO IR: {problem}")
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    calibration = None
    if args.activations == "int8":
        from aipaint_plugins.openvino_runtime.quantize import DEFAULT_PROMPTS, Calibration, read_prompts

        if not args.model:
            raise AipaintError("--activations int8 needs --model: the model the ONNX export was made from (its "
                               "activation ranges are measured by generating with it)")
        size = _size(args.calibration_size) if args.calibration_size else (None, None)
        calibration = Calibration(
            args.model, read_prompts(args.calibration_prompts) if args.calibration_prompts else DEFAULT_PROMPTS,
            steps=args.calibration_steps, width=size[0], height=size[1],
        )
    manifest = convert_to_openvino(args.onnx_dir, args.output, weights=args.weights, activations=args.activations,
                                   calibration=calibration, components=components, overwrite=args.overwrite,
                                   log=lambda message: print(message, file=sys.stderr))
    print(manifest.root)
    return 0


def _size(text: str) -> tuple[int, int]:
    from aipaint.errors import InvalidParameter

    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise InvalidParameter("calibration-size", text, "WIDTHxHEIGHT in pixels, e.g. 512x512") from None
    if min(size) < 8 or max(size) > 4096:
        raise InvalidParameter("calibration-size", text, "sides from 8 to 4096 pixels")
    return size


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import command_group

    group = command_group(subparsers, "export", "export a model for another runtime (onnx, tensorrt)")
    p = group.add_parser("openvino", help="convert an `aipaint export onnx` folder to OpenVINO IR, with a manifest")
    p.add_argument("onnx_dir", help="folder written by `aipaint export onnx` (fp32)")
    p.add_argument("-o", "--output", required=True, help="folder to write (created atomically)")
    p.add_argument("--weights", choices=("fp32", "int8"), default="fp32",
                   help="int8: compress the weights with NNCF (activations keep the compute precision)")
    p.add_argument("--activations", choices=("float", "int8"), default="float",
                   help="int8: quantise the UNet's convolutions (weights and activations), calibrated by generating "
                        "with --model; faster on the CPU (with --weights int8: optimum-intel's hybrid recipe)")
    p.add_argument("-m", "--model", help="with --activations int8: the model the ONNX export was made from")
    p.add_argument("--calibration-prompts", metavar="FILE",
                   help="with --activations int8: prompts to calibrate on, one per line (default: 8 ordinary prompts)")
    p.add_argument("--calibration-steps", type=int, default=20, help="steps per calibration prompt (default 20)")
    p.add_argument("--calibration-size", metavar="WxH", help="calibration image size (default: the model's)")
    p.add_argument("--components", help="comma-separated subset of the export's components (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OpenVINO export in that folder")
    p.set_defaults(func=cmd_export_openvino)
