"""Frame-by-frame video stylisation: command ``aipaint video`` (see :mod:`aipaint_plugins.video.stylize`)."""

from __future__ import annotations

import argparse
import sys

from aipaint import hookimpl


@hookimpl(tryfirst=True)  # before the plugins that add their generation options to it
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_generation_options, add_model_options, mark_generation_command

    p = subparsers.add_parser(
        "video", help="stylise a video (or GIF, or frame folder) frame by frame with img2img",
        epilog="Plugin options apply to every frame; with --controlnet MODEL:frame:PREPROCESSOR each frame is "
               "its own control image.")
    p.add_argument("input", help="video file (.mp4, .mov, .avi, …), animated GIF, or a folder of frames")
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax)")
    p.add_argument("--from-png", help="take the generation parameters stored in an A1111-style PNG")
    g = p.add_argument_group("video")
    g.add_argument("-s", "--strength", "--denoising-strength", type=float, default=0.5, dest="denoising_strength",
                   metavar="X", help="denoising strength per frame, 0–1 (default 0.5)")
    g.add_argument("--temporal", type=float, default=0.0, metavar="X",
                   help="share of each frame's start that is the previous stylised frame, warped along the "
                        "input's optical flow (0 to <1, default 0: each frame starts from itself)")
    g.add_argument("--seed-step", type=int, default=0, metavar="N",
                   help="frame i is painted with seed + i*N (default 0: one seed for every frame, which is "
                        "what keeps a video from flickering)")
    g.add_argument("--every", type=int, default=1, metavar="N", help="keep one input frame in N (default 1)")
    g.add_argument("--max-frames", type=int, metavar="N", help="stop after N frames")
    add_generation_options(p)
    add_model_options(p)
    p.set_defaults(func=_cmd_video, output=None)
    mark_generation_command(p)  # --lora-dir, --controlnet MODEL:frame:…, --deepcache, … work per frame


def _cmd_video(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aipaint_plugins.video.stylize import FrameSink, check_settings, open_frames, stylize_file

    from aipaint.cli.api import build_request, load_pipeline, progress_bar

    source = Path(args.input)
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}-styled{source.suffix or ''}")
    # The input and the output's format are checked before the model loads: a typo costs nothing.
    frames = open_frames(source, max_frames=args.max_frames, every=args.every)
    FrameSink(output, frames.fps)
    check_settings(args.denoising_strength, args.temporal)
    request = build_request(args)
    pipe = load_pipeline(args)
    update, close = progress_bar(not args.no_progress and sys.stderr.isatty(), unit="frame")
    progress = None if update is None else (lambda done, total: update(done, total or None))
    try:
        written, count, fps, seed = stylize_file(
            pipe, frames, output, request.prompt, request.negative_prompt, request=request,
            denoising_strength=args.denoising_strength, temporal=args.temporal, seed_step=args.seed_step,
            progress=progress)
    finally:
        close()
    print(written)
    print(f"{count} frames at {fps:.3g} fps, seed {seed}", file=sys.stderr)
    return 0
