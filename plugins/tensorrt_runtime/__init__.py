"""The ``tensorrt`` runtime and ``aipaint export tensorrt``.

Engines are built from an ONNX export (``aipaint export onnx``) with one optimization
profile per network (batch 1–4, 256–1024 px by default), fp16, a timing cache that
makes rebuilds fast, and refitting, so a different LoRA set needs a new ONNX export and
a refit instead of a rebuild. Loaded with ``aipaint.load(MODEL, device="cuda",
runtime="tensorrt", runtime_options={"engine_dir": DIR})``.

Needs an NVIDIA GPU and the ``tensorrt`` package; where it is missing the runtime says
so (``unavailable()``) instead of failing later.
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
    from aipaint_plugins.tensorrt_runtime.runtime import unavailable

    return unavailable()


def _prepare(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    from aipaint_plugins.tensorrt_runtime.runtime import prepare_tensorrt

    prepare_tensorrt(model, options)


@hookimpl
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    register(
        RuntimeSpec(
            name="tensorrt",
            prepare=_prepare,
            unavailable=_unavailable,
            aliases=("trt",),
            description="TensorRT engines from `aipaint export tensorrt` (runtime option engine_dir; NVIDIA GPU)",
        )
    )


def cmd_export_tensorrt(args: argparse.Namespace) -> int:
    from aipaint_plugins.tensorrt_runtime.build import build_engines, refit_engines
    from aipaint_plugins.tensorrt_runtime.profiles import ProfileSettings

    from aipaint.errors import AipaintError

    problem = _unavailable()
    if problem:
        raise AipaintError(f"cannot build TensorRT engines: {problem} (it needs an NVIDIA GPU and `pip install tensorrt`)")
    log = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.refit:
        manifest = refit_engines(args.output, args.onnx_dir, log=log)
    else:
        settings = ProfileSettings(
            min_batch=args.min_batch, opt_batch=args.opt_batch, max_batch=args.max_batch,
            min_size=args.min_size, opt_size=args.opt_size, max_size=args.max_size, max_chunks=args.max_chunks,
        )
        manifest = build_engines(
            args.onnx_dir, args.output, settings=settings, fp16=not args.fp32, refittable=not args.no_refit,
            timing_cache=args.timing_cache, workspace_gb=args.workspace_gb, overwrite=args.overwrite, log=log,
        )
    print(manifest.root)
    return 0


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import command_group

    group = command_group(subparsers, "export", "export a model for another runtime (onnx, tensorrt)")
    p = group.add_parser("tensorrt", help="build TensorRT engines from an `aipaint export onnx` folder (NVIDIA GPU)")
    p.add_argument("onnx_dir", help="folder written by `aipaint export onnx`")
    p.add_argument("-o", "--output", required=True, help="engine folder to write")
    p.add_argument("--min-batch", type=int, default=1)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--min-size", type=int, default=256, help="smallest image side in pixels")
    p.add_argument("--opt-size", type=int, default=512, help="image side the engines are tuned for")
    p.add_argument("--max-size", type=int, default=1024, help="largest image side in pixels")
    p.add_argument("--max-chunks", type=int, default=3, help="longest prompt, in 75-token chunks")
    p.add_argument("--fp32", action="store_true", help="build without fp16 kernels")
    p.add_argument("--no-refit", action="store_true", help="build non-refittable engines (slightly faster)")
    p.add_argument("--timing-cache", help="timing cache file (default: beside the output folder)")
    p.add_argument("--workspace-gb", type=float, default=8.0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--refit", action="store_true",
                   help="-o holds engines of the same architecture: refit their weights from ONNX_DIR (e.g. other LoRAs)")
    p.set_defaults(func=cmd_export_tensorrt)
