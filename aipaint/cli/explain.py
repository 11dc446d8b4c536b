"""``aipaint explain VIEW``: the diffusion process, attention, samplers and guidance drawn as
labelled contact sheets (see :mod:`aipaint.explain` and docs/explain.md).

Each sub-command writes one PNG sheet (``-o``; default ``explain-VIEW.png``, or the first free
``explain-VIEW-N.png``), ``denoise`` also an animation (``--animation``, GIF or WebP), and with
``--figure FILE`` the view's matplotlib plots. The paths written are printed one a line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aipaint.cli.api import add_model_options, load_pipeline, progress_bar

VIEWS = ("noise", "denoise", "attention", "samplers", "cfg")


def _numbers(kind: type, what: str) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} separated by commas, e.g. 1,5,10, not {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of {what}")
        return values

    return parse


def _names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected names separated by commas")
    return names


def _add_output(p: argparse.ArgumentParser, view: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", help=f"the contact sheet, PNG (default: explain-{view}.png, or the first free "
                                         f"explain-{view}-N.png)")
    g.add_argument("--figure", metavar="FILE.png", help="also write the view's plots with matplotlib (needs matplotlib)")
    g.add_argument("--cell", type=int, default=None, metavar="PX", help="size of each picture on the sheet")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--no-progress", action="store_true")


def _add_generation(p: argparse.ArgumentParser, *, sampler: bool = True, cfg: bool = True) -> None:
    g = p.add_argument_group("generation (defaults: the model's)")
    g.add_argument("-n", "--negative-prompt", default=None)
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int, help="-1 for random (default); every run of a view uses the same one")
    if sampler:
        g.add_argument("--sampler", help="sampler name, e.g. 'DPM++ 2M' (see `aipaint samplers`)")
        g.add_argument("--schedule", help="schedule type: Automatic, Karras, Exponential, SGM Uniform")
    if cfg:
        g.add_argument("--cfg-scale", "--cfg", type=float, dest="cfg_scale")
    g.add_argument("-W", "--width", type=int)
    g.add_argument("-H", "--height", type=int)
    g.add_argument("--clip-skip", type=int)
    g.add_argument("--guidance-rescale", type=float)


def _params(args: argparse.Namespace) -> dict[str, Any]:
    names = ("steps", "seed", "sampler", "schedule", "cfg_scale", "width", "height", "clip_skip", "guidance_rescale")
    params = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if args.negative_prompt is not None:
        params["negative_prompt"] = args.negative_prompt
    return params


def _outputs(args: argparse.Namespace, view: str, animation: bool = False) -> tuple[Path, Path | None]:
    """The sheet's path and the animation's, checked before any work: an existing ``-o`` (or
    ``--animation``) file is an error without ``--overwrite``; without ``-o`` the first free name."""
    from aipaint.api.result import check_writable
    from aipaint.errors import InvalidParameter

    chosen_animation = getattr(args, "animation", None)
    if chosen_animation and Path(chosen_animation).suffix.lower() not in (".gif", ".webp"):
        raise InvalidParameter("--animation", chosen_animation, "must end in .gif or .webp")
    if args.output is not None:
        sheet = Path(args.output)
        check_writable(sheet, overwrite=args.overwrite)
        movie = Path(chosen_animation) if chosen_animation else sheet.with_suffix(".gif")
    else:
        number = 0
        while True:
            sheet = Path(f"explain-{view}{'' if number == 0 else f'-{number}'}.png")
            movie = Path(chosen_animation) if chosen_animation else sheet.with_suffix(".gif")
            taken = [os.path.lexists(sheet)] + ([os.path.lexists(movie)] if animation and not chosen_animation else [])
            if not any(taken):
                break
            number += 1
        check_writable(sheet)
    if not animation:
        return sheet, None
    check_writable(movie, overwrite=args.overwrite)
    if movie.resolve() == sheet.resolve():
        raise InvalidParameter("--animation", str(movie), "is the sheet's own file; give another name")
    return sheet, movie


def _finish(args: argparse.Namespace, result: Any, sheet: Path, movie: Path | None = None) -> int:
    print(result.save(sheet, overwrite=args.overwrite))
    if movie is not None:
        print(result.save_animation(movie, overwrite=args.overwrite, duration=args.frame_ms))
    if args.figure:
        print(result.save_figure(args.figure, overwrite=args.overwrite))
    seed = result.data.get("seed")
    if seed is None and result.data.get("runs"):
        seed = result.data["runs"][0].get("seed")
    if seed is not None:
        print(f"seed {seed}", file=sys.stderr)
    return 0


def _prepare(args: argparse.Namespace, view: str, animation: bool = False) -> tuple[Any, Path, Path | None, Any, Any]:
    """Outputs checked, matplotlib checked when ``--figure`` asks for it, then the model loaded."""
    from aipaint.api.result import check_writable
    from aipaint.explain.common import matplotlib_figure

    sheet, movie = _outputs(args, view, animation)
    if args.figure:
        matplotlib_figure()
        check_writable(args.figure, overwrite=args.overwrite)
    pipe = load_pipeline(args)
    update, close = progress_bar(not args.no_progress and sys.stderr.isatty())
    return pipe, sheet, movie, update, close


def _cell(args: argparse.Namespace, default: int) -> dict[str, int]:
    from aipaint.errors import InvalidParameter

    if args.cell is None:
        return {"cell": default}
    if not 32 <= args.cell <= 512:
        raise InvalidParameter("--cell", args.cell, "must be from 32 to 512 pixels")
    return {"cell": args.cell}


def cmd_noise(args: argparse.Namespace) -> int:
    from aipaint import explain
    from aipaint.imageutil import load_image

    image = load_image(args.image)  # an unreadable image is said before the model loads
    pipe, sheet, _, _, close = _prepare(args, "noise")
    close()
    kwargs: dict[str, Any] = {"seed": args.seed if args.seed is not None else 0, **_cell(args, 128)}
    if args.timesteps:
        kwargs["timesteps"] = args.timesteps
    result = explain.noise(pipe, image, width=args.width, height=args.height, **kwargs)
    return _finish(args, result, sheet)


def cmd_denoise(args: argparse.Namespace) -> int:
    from aipaint import explain

    pipe, sheet, movie, update, close = _prepare(args, "denoise", animation=not args.no_animation)
    try:
        result = explain.denoise(pipe, args.prompt, at=args.at, columns=args.columns, progress=update,
                                 animation=movie is not None, **_cell(args, 128), **_params(args))
    finally:
        close()
    return _finish(args, result, sheet, movie)


def cmd_attention(args: argparse.Namespace) -> int:
    from aipaint import explain
    from aipaint.explain.crossattn import LAYER_CHOICES

    layers = args.layers if args.layers in (*LAYER_CHOICES, "auto") else _names(args.layers)
    pipe, sheet, _, update, close = _prepare(args, "attention")
    try:
        result = explain.attention(pipe, args.prompt, at=args.at, layers=layers, combine=args.combine, words=args.words,
                                   progress=update,
                                   **_cell(args, 128), **_params(args))
    finally:
        close()
    return _finish(args, result, sheet)


def cmd_samplers(args: argparse.Namespace) -> int:
    from aipaint import explain
    from aipaint.explain.sampling import DEFAULT_SAMPLERS, DEFAULT_SCHEDULES

    pipe, sheet, _, update, close = _prepare(args, "samplers")
    try:
        result = explain.samplers(pipe, args.prompt, samplers=args.samplers or DEFAULT_SAMPLERS,
                                  schedules=args.schedules or DEFAULT_SCHEDULES, columns=args.columns,
                                  progress=update, **_cell(args, 96), **_params(args))
    finally:
        close()
    if result.data["skipped"]:
        print("left out (the sampler lacks the schedule type): " + ", ".join(result.data["skipped"]), file=sys.stderr)
    return _finish(args, result, sheet)


def cmd_cfg(args: argparse.Namespace) -> int:
    from aipaint import explain
    from aipaint.explain.guidance import DEFAULT_SCALES

    pipe, sheet, _, update, close = _prepare(args, "cfg")
    try:
        result = explain.cfg(pipe, args.prompt, scales=args.scales or DEFAULT_SCALES, progress=update,
                             **_cell(args, 128), **_params(args))
    finally:
        close()
    return _finish(args, result, sheet)


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain", help="see inside: the diffusion process, attention, samplers and CFG drawn as labelled sheets",
        description="Draw what happens inside a generation; each view writes a PNG contact sheet (see docs/explain.md).")
    views = parser.add_subparsers(dest="explain_view", metavar="VIEW")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)

    p = views.add_parser("noise", help="the forward process: an image noised to chosen timesteps, with the SNR")
    p.add_argument("image", help="the image (PNG, JPEG, …)")
    p.add_argument("--timesteps", type=_numbers(int, "timesteps"), metavar="T,T,…",
                   help="timesteps to show (default 0,100,250,400,550,700,850,999)")
    p.add_argument("--seed", type=int, help="the noise's seed (default 0)")
    p.add_argument("-W", "--width", type=int, help="resize the image to this width (default: the model's)")
    p.add_argument("-H", "--height", type=int, help="resize the image to this height (default: the model's)")
    _add_output(p, "noise")
    add_model_options(p)
    p.set_defaults(func=cmd_noise)

    p = views.add_parser("denoise", help="a generation as a strip: latents and predicted x0 at chosen steps, "
                                         "and an animation")
    p.add_argument("prompt")
    p.add_argument("--at", type=_numbers(int, "steps"), metavar="S,S,…", help="1-based steps to show (default: 6 "
                                                                              "evenly spaced, ending with the last)")
    p.add_argument("--columns", type=int, default=6, help="how many steps to show without --at (default 6)")
    p.add_argument("--animation", metavar="FILE.gif|FILE.webp",
                   help="the animation of every step (default: the sheet's name with .gif)")
    p.add_argument("--no-animation", action="store_true", help="write the sheet only")
    p.add_argument("--frame-ms", type=int, default=250, help="milliseconds per animation frame (default 250)")
    _add_generation(p)
    _add_output(p, "denoise")
    add_model_options(p)
    p.set_defaults(func=cmd_denoise)

    p = views.add_parser("attention", help="which word paints where: each word's cross-attention over the image")
    p.add_argument("prompt", nargs="+", help="one prompt, or several to compare (e.g. with and without (word:1.4))")
    p.add_argument("--at", type=_numbers(int, "steps"), metavar="S,S,…", help="1-based steps to average over "
                                                                              "(default: all)")
    p.add_argument("--layers", default="auto", help="cross-attention layers to average: auto (default: what the "
                                                    "model's card names, else up), all, down, mid, up, finest, or "
                                                    "layer-name prefixes separated by commas")
    p.add_argument("--combine", default="auto", choices=("auto", "probability", "standardised"),
                   help="how layers' maps are combined: probability (their attention shares averaged) or "
                        "standardised (each layer's map rescaled to mean 0, spread 1 first); auto: the card's, "
                        "else probability")
    p.add_argument("--words", type=_names, metavar="W,W,…", help="the words to draw (default: all but a, the, on, …; "
                                                                "'all' for every one)")
    _add_generation(p)
    _add_output(p, "attention")
    add_model_options(p)
    p.set_defaults(func=cmd_attention)

    p = views.add_parser("samplers", help="one seed under several samplers and schedule types, with their sigmas")
    p.add_argument("prompt")
    p.add_argument("--samplers", type=_names, metavar="NAME,NAME,…",
                   help="samplers to compare (default Euler,Euler a,DPM++ 2M,Heun,DDIM)")
    p.add_argument("--schedules", type=_names, metavar="NAME,NAME,…",
                   help="schedule types to compare (default Automatic,Karras)")
    p.add_argument("--columns", type=int, default=5, help="pictures per run (default 5)")
    _add_generation(p, sampler=False)
    _add_output(p, "samplers")
    add_model_options(p)
    p.set_defaults(func=cmd_samplers)

    p = views.add_parser("cfg", help="one seed across CFG scales, and where cond − uncond pushes")
    p.add_argument("prompt")
    p.add_argument("--scales", type=_numbers(float, "CFG scales"), metavar="S,S,…",
                   help="CFG scales (default 1,3,7,12)")
    _add_generation(p, cfg=False)
    _add_output(p, "cfg")
    add_model_options(p)
    p.set_defaults(func=cmd_cfg)
