"""The workflow commands: ``xyz`` (A1111's X/Y/Z plot) and ``batch`` (prompts from a file,
resumable), and the dynamic prompt options (``--dynamic``, ``--wildcards DIR``,
``--combinatorial``) that ``generate`` takes too. The work is done by :mod:`aipaint.workflows`;
heavy libraries are imported inside the handlers so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from aipaint.cli.api import (
    add_generation_options,
    add_model_options,
    add_overwrite_option,
    add_post_option,
    build_request,
    check_post_chain,
    load_option_values,
    load_pipeline,
    mark_generation_command,
    parse_key_values,
    progress_bar,
)
from aipaint.cli.styles import recorded
from aipaint.errors import AipaintError, InvalidParameter

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.pipeline import Pipeline
    from aipaint.prompt.wildcards import DynamicPrompts

DEFAULT_MAX_PROMPTS = 100  # aipaint.prompt.wildcards.DEFAULT_MAX_PROMPTS, without importing it for --help
DEFAULT_BATCH_FOLDER = "aipaint-batch"
DEFAULT_GRID = "xyz-grid.png"


# --- dynamic prompts ------------------------------------------------------------------------------
def add_dynamic_options(parser: argparse.ArgumentParser, *, combinatorial: bool = True) -> None:
    """Add ``--dynamic``, ``--wildcards DIR`` and (with ``combinatorial``) ``--combinatorial`` and
    ``--max-prompts N``; :func:`dynamic_from_args` reads them."""
    g = parser.add_argument_group("dynamic prompts: {a|b} variants and __name__ wildcards (docs/workflows.md)")
    g.add_argument("--dynamic", action="store_true",
                   help="resolve {a|b|c} variants and __name__ wildcards in the prompts, at random from the seed")
    g.add_argument("--wildcards", metavar="DIR",
                   help="folder of wildcard files NAME.txt (implies --dynamic; default $AIPAINT_WILDCARDS or "
                        "$AIPAINT_HOME/wildcards)")
    if combinatorial:
        g.add_argument("--combinatorial", action="store_true",
                       help="every combination of the variants and wildcards instead of one at random (implies --dynamic)")
        g.add_argument("--max-prompts", type=int, default=DEFAULT_MAX_PROMPTS, metavar="N",
                       help=f"at most this many combinations with --combinatorial (default {DEFAULT_MAX_PROMPTS})")


def wants_dynamic(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "dynamic", False) or getattr(args, "wildcards", None) or getattr(args, "combinatorial", False))


def dynamic_from_args(args: argparse.Namespace) -> DynamicPrompts | None:
    """The dynamic prompts the options ask for, or None."""
    if not wants_dynamic(args):
        return None
    from aipaint.prompt.wildcards import DynamicPrompts, default_wildcards_folder

    return DynamicPrompts(args.wildcards or default_wildcards_folder())


def _load_refiner(args: argparse.Namespace) -> Any:
    import aipaint

    return aipaint.load(args.refiner, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)


def run_dynamic(args: argparse.Namespace, request: GenerationRequest) -> int:
    """``aipaint generate`` with dynamic prompts: the prompt resolved from the seed (or every
    combination, ``out-0.png``, ``out-1.png``, …), each PNG recording the resolved prompt and,
    as ``Template``, the prompt as written. Everything is checked before the model loads."""
    from aipaint.api.result import batch_paths, check_writable, output_path, save_png
    from aipaint.workflows.common import resolve_request, run_job

    post = check_post_chain(getattr(args, "post", None) or [], args.allow_pickle)
    jobs = resolve_request(request, dynamic_from_args(args), combinatorial=getattr(args, "combinatorial", False),
                           max_prompts=getattr(args, "max_prompts", DEFAULT_MAX_PROMPTS))
    count = len(jobs) * request.batch_size
    output_path(args.output, count, overwrite=args.overwrite)
    preview = None
    if getattr(args, "preview", None):
        check_writable(args.preview, overwrite=True)
        preview = lambda step: save_png(step.image("cheap"), args.preview, None)  # noqa: E731
    pipe = load_pipeline(args)
    if getattr(args, "refiner", None):
        refiner = _load_refiner(args)
        jobs = [dataclasses.replace(job, request=dataclasses.replace(job.request, refiner=refiner)) for job in jobs]
    for job in jobs:
        pipe.check(job.request)
    images, infotexts, seconds = [], [], 0.0
    for index, job in enumerate(jobs, 1):
        progress, close = progress_bar(not args.no_progress and sys.stderr.isatty())
        try:
            result = recorded(args, run_job(pipe, job, post=post, progress=progress, preview=preview))
        finally:
            close()
        images.extend(result.images)
        infotexts.extend(result.infotexts)
        seconds += result.timings.get("total", 0.0)
        if len(jobs) > 1 and not args.no_progress:
            print(f"[{index}/{len(jobs)}] {job.request.prompt}", file=sys.stderr)
    output = output_path(args.output, count, overwrite=args.overwrite)
    for path, image, infotext in zip(batch_paths(output, count), images, infotexts):
        print(save_png(image, path, infotext, overwrite=args.overwrite))
    print(f"seed {jobs[0].request.seed}, {len(jobs)} prompt{'s' if len(jobs) > 1 else ''}, {seconds:.2f} s", file=sys.stderr)
    return 0


# --- xyz -----------------------------------------------------------------------------------------
def cmd_xyz(args: argparse.Namespace) -> int:
    import time

    from aipaint.api.result import output_path
    from aipaint.workflows.xyz import CHECKPOINT, parse_axis, xyz

    axes = [parse_axis(text) if text is not None else None for text in (args.x, args.y, args.z)]
    if not any(axes):
        raise AipaintError("give at least one axis: --x 'TYPE: VALUES' (e.g. --x 'cfg: 1, 3, 7'); see docs/workflows.md")
    fields: dict[str, Any] = {}
    if args.image is not None:
        fields["init_image"] = args.image
    if args.denoising_strength is not None:
        fields["denoising_strength"] = args.denoising_strength
    request = build_request(args, **fields)
    post = check_post_chain(args.post, args.allow_pickle)
    layers = len(axes[2].values) if axes[2] is not None else 1
    output = output_path(args.output, layers, overwrite=args.overwrite, default=DEFAULT_GRID)
    checkpoint = any(axis is not None and axis.type is CHECKPOINT for axis in axes)
    pipe = None if checkpoint else load_pipeline(args)
    started = time.perf_counter()

    def load(name: str) -> Pipeline:
        import aipaint

        print(f"loading {name}", file=sys.stderr)
        return aipaint.load(name, device=args.device, dtype=args.dtype, runtime=args.runtime,
                            allow_pickle=args.allow_pickle)

    def on_cell(done: int, total: int, cell: Any) -> None:
        if not args.no_progress:
            where = f" {cell.path}" if cell.path is not None else ""
            print(f"[{done}/{total}] {', '.join(cell.labels)}:{where} {cell.seconds:.2f} s", file=sys.stderr)

    result = xyz(pipe, request, x=axes[0], y=axes[1], z=axes[2], output=output, cells_dir=args.cells,
                 overwrite=args.overwrite, post=post, load=load, dynamic=dynamic_from_args(args), on_cell=on_cell)
    for path in result.grid_paths:
        print(path)
    print(f"{len(result.cells)} cells in {time.perf_counter() - started:.2f} s; each cell's PNG is in "
          f"{result.cells[0].path.parent if result.cells[0].path else '-'}", file=sys.stderr)
    return 0


# --- batch ---------------------------------------------------------------------------------------
def cmd_batch(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aipaint.workflows.batch import batch, plan_batch, read_prompts

    if args.midjourney:
        raise AipaintError("batch reads A1111 prompts; --mj is not supported here")
    if args.ray_workers is not None and args.ray is None:
        raise AipaintError("--ray-workers needs --ray (the workers are Ray's)")
    if getattr(args, "styles", None):
        raise AipaintError("batch does not apply --style to its lines yet; apply the styles to the lines' prompts "
                           "(or use generate/xyz, which take --style)")
    out_dir = Path(args.output or DEFAULT_BATCH_FOLDER)
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidParameter("output", str(out_dir), "is a file; batch writes into a folder", "give a folder with -o DIR")
    args.prompt = ""  # each line brings its own prompt
    base = build_request(args)
    post = check_post_chain(args.post, args.allow_pickle)
    dynamic = dynamic_from_args(args)
    lines = read_prompts(args.file)
    if not lines:
        raise InvalidParameter("prompts file", args.file, "holds no prompts (blank and # lines are skipped)")
    plan_batch(lines, base, out_dir, dynamic=dynamic, combinatorial=args.combinatorial, max_prompts=args.max_prompts)

    def on_progress(event: Any) -> None:
        if args.no_progress:
            return
        names = ", ".join(path.name for path in event.job.files)
        state = {"generated": f"generated in {event.seconds:.2f} s", "skipped": "done before, skipped",
                 "recovered": "written before its worker died, kept"}[event.status]
        print(f"[{event.index}/{event.total}] line {event.job.line}: {names} {state}", file=sys.stderr, flush=True)

    if args.ray is not None:  # on a Ray cluster (docs/scale-out.md); Ray is imported only here
        from aipaint.workflows.ray_batch import ray_batch

        load_options = {"family": args.family, "device": args.device, "dtype": args.dtype, "runtime": args.runtime,
                        "allow_pickle": args.allow_pickle, "config": args.config,
                        "runtime_options": parse_key_values(args.runtime_options or [], "--runtime-option"),
                        **load_option_values(args)}
        report = ray_batch(lines, out_dir, model=args.model, load_options=load_options, base=base, dynamic=dynamic,
                           combinatorial=args.combinatorial, max_prompts=args.max_prompts, post=post,
                           address=args.ray or None, workers=args.ray_workers, on_progress=on_progress)
    else:
        report = batch(load_pipeline(args), lines, out_dir, base=base, dynamic=dynamic, combinatorial=args.combinatorial,
                       max_prompts=args.max_prompts, post=post, on_progress=on_progress)
    for path in report.generated:
        print(path)
    print(f"batch: {len(report.generated)} images generated, {len(report.skipped)} done before; "
          f"manifest {report.manifest}; {report.seconds:.2f} s", file=sys.stderr)
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "xyz", help="A1111's X/Y/Z plot: a grid of images over up to three parameters",
        description="Vary a request along up to three axes, e.g. --x 'cfg: 1, 3, 7' --y 'seed: 1-3'. Axis types: Seed, "
                    "Var. seed, Var. strength, Steps, CFG Scale, Sampler, Schedule type, Prompt S/R, Checkpoint name, "
                    "LoRA weight, Denoising, Clip skip, Width, Height, Guidance rescale, and 'option NAMESPACE.FIELD'. "
                    "Values: a comma-separated list; numbers also as ranges 1-5, 1-10 (+2), 4-8 [3].")
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax)")
    g = p.add_argument_group("axes")
    for letter in "xyz":
        g.add_argument(f"--{letter}", metavar="'TYPE: VALUES'", help=f"the {letter.upper()} axis"
                       + (" (one grid per value)" if letter == "z" else ""))
    g.add_argument("--cells", metavar="DIR", help="where each cell's PNG goes (default: GRID-cells beside the grid)")
    p.add_argument("--image", metavar="FILE", help="an input image: the cells are img2img from it (the Denoising axis needs one)")
    p.add_argument("-s", "--strength", type=float, dest="denoising_strength", metavar="X",
                   help="denoising strength with --image (default 0.75)")
    p.add_argument("--from-png", help="take the parameters stored in an A1111-style PNG")
    add_post_option(p)
    add_overwrite_option(p)
    add_generation_options(p)
    add_dynamic_options(p, combinatorial=False)
    add_model_options(p)
    mark_generation_command(p)
    p.set_defaults(func=cmd_xyz)

    p = subparsers.add_parser(
        "batch", help="prompts from a file (A1111's syntax, or JSON lines), resumable", conflict_handler="resolve",
        description="One request a line: a prompt, or A1111's options (--prompt \"...\" --steps 20 --seed 1 ...), or, "
                    "in a .jsonl file, a JSON object of request fields. The options below are the defaults lines "
                    "override. Images are named by their request's hash; a re-run skips those already made.")
    p.add_argument("file", help="the prompts file (.txt: A1111's lines; .jsonl: JSON objects)")
    add_post_option(p)
    add_generation_options(p)
    p.add_argument("-o", "--output", metavar="DIR", help=f"the output folder (default: {DEFAULT_BATCH_FOLDER})")
    add_dynamic_options(p)
    add_model_options(p)
    g = p.add_argument_group("scale-out on Ray (docs/scale-out.md)")
    g.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run the jobs on a Ray cluster: ADDRESS as Ray's (auto, HOST:6379, ray://HOST:10001); "
                        "without one, $RAY_ADDRESS, else a Ray started here for the run")
    g.add_argument("--ray-workers", type=_positive, metavar="N",
                   help="with --ray: N workers, each with its own model (default: as many as the cluster's CPUs, "
                        "or GPUs with --device cuda, hold)")
    mark_generation_command(p)
    p.set_defaults(func=cmd_batch)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, 1 or more, not {text!r}")
    return int(text)
