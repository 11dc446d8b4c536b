"""The ``onnxruntime`` runtime and ``aipaint export onnx``.

Export once (``aipaint export onnx MODEL -o DIR [--controlnet NAME …]``), then load with
``aipaint.load(MODEL, runtime="onnxruntime", runtime_options={"onnx_dir": DIR})``: the
UNet, the VAE, the text encoder and the exported ControlNets run as ONNX Runtime
sessions (CPU by default; CUDA or TensorRT execution providers with onnxruntime-gpu).
See ``docs/runtimes.md``.

Registration is light: onnx, onnxruntime and torch are imported only when a model is
exported or prepared, so ``aipaint --help`` stays quick.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.plugin.runtimes import RuntimeSpec

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel

EXPORT_COMPONENTS = ("unet", "text_encoder", "vae_decoder", "vae_encoder")


def _prepare(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    from aipaint_plugins.onnx_runtime.runtime import prepare_onnxruntime

    prepare_onnxruntime(model, options)


def _unavailable() -> str | None:
    from importlib.util import find_spec

    if find_spec("onnxruntime") is None:
        return "the onnxruntime package is not installed (pip install 'aipaint[onnx]', or onnxruntime-gpu for CUDA)"
    return None


@hookimpl
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    register(
        RuntimeSpec(
            name="onnxruntime",
            prepare=_prepare,
            unavailable=_unavailable,
            aliases=("onnx", "ort"),
            description="ONNX Runtime on an `aipaint export onnx` folder (runtime option onnx_dir)",
        )
    )


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from aipaint_plugins.onnx_runtime.export import LoraSpec, export_onnx

    import aipaint
    from aipaint.errors import InvalidParameter

    components = [c.strip() for c in args.components.split(",") if c.strip()]
    bad = [c for c in components if c not in EXPORT_COMPONENTS]
    if bad:
        raise InvalidParameter("--components", args.components, f"a comma-separated subset of {', '.join(EXPORT_COMPONENTS)}")
    loras = [LoraSpec.parse(text) for text in args.lora]
    pipe = aipaint.load(args.model, family=args.family, device=args.device, allow_pickle=args.allow_pickle, config=args.config)
    manifest = export_onnx(
        pipe.model,
        args.output,
        fp16=args.fp16,
        fp16_vae=args.fp16_vae,
        loras=loras,
        lora_dir=args.lora_dir,
        components=components,
        controlnet_inputs=not args.no_controlnet_inputs,
        controlnets=[_controlnet_argument(text) for text in args.controlnet],
        allow_pickle=args.allow_pickle,
        opset=args.opset,
        overwrite=args.overwrite,
        host=pipe.host,
        log=lambda message: print(message, file=sys.stderr),
        int8=args.int8,
    )
    print(manifest.root)
    return 0


def _controlnet_argument(text: str) -> str | Path:
    """As for ``--controlnet`` when generating: an existing path typed as one is a path, anything else a name."""
    looks_like_path = os.sep in text or "/" in text or text.lower().endswith((".safetensors", ".pth", ".ckpt"))
    return Path(text) if looks_like_path and Path(text).expanduser().exists() else text


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import command_group

    group = command_group(subparsers, "export", "export a model for another runtime (onnx, tensorrt)")
    p = group.add_parser("onnx", help="export the UNet, VAE, text encoder(s) and ControlNets to ONNX, with a manifest")
    p.add_argument("model", help="zoo id, diffusers folder, .safetensors file or hub id")
    p.add_argument("-o", "--output", required=True, help="folder to write (created atomically)")
    p.add_argument("--fp16", action="store_true", help="the UNet in float16 (for CUDA/TensorRT)")
    p.add_argument("--fp16-vae", action="store_true", help="the VAE in float16 too (can overflow for some VAEs)")
    p.add_argument("--int8", action="store_true",
                   help="the UNet's MatMul weights in int8 (ONNX Runtime dynamic quantisation; for the CPU)")
    p.add_argument("--lora", action="append", default=[], metavar="NAME[:WEIGHT]", help="fuse a LoRA (repeatable)")
    p.add_argument("--lora-dir", help="folder the LoRA names are looked up in (default: the LoRA adapter's)")
    p.add_argument("--components", default=",".join(EXPORT_COMPONENTS), help="comma-separated subset to export (default: all)")
    p.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                   help="also export this ControlNet (repeatable): a zoo id, a name in the ControlNet folder "
                        "(`aipaint controlnets` lists them) or a path; units naming it then run through ONNX Runtime")
    p.add_argument("--no-controlnet-inputs", action="store_true", help="leave out the UNet's ControlNet residual inputs")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--overwrite", action="store_true", help="replace an existing export in that folder")
    p.add_argument("--family", help="model family, when it cannot be detected")
    p.add_argument("--config", help="diffusers config folder for a single-file checkpoint")
    p.add_argument("--device", default="cpu", help="device to trace on (cuda is faster for --fp16)")
    p.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pth files (the model and its ControlNets)")
    p.set_defaults(func=cmd_export_onnx)
