"""Prompt-to-Prompt editing (Hertz et al. 2022) and null-text inversion (Mokady et al. 2023).

Python::

    from aipaint_plugins.prompt_to_prompt import edit, invert
    result = edit(pipe, "a big red circle on the left, on a white background",
                  "a big blue circle on the left, on a white background", seed=3)
    result.images[0]  # the edit; result.images[1] is the source
    inv = invert(pipe, "photo.png", "a big red circle on the left, on a white background")
    inv.save("inv.safetensors")
    edit(pipe, target="a big green circle on the left, on a white background", inversion="inv.safetensors")

Command line::

    aipaint edit "PROMPT A" --to "PROMPT B" [--cross-steps 0.8] [--self-steps 0.4] [--reweight WORD=F]
    aipaint invert IMAGE --caption "…" -o inv.safetensors
    aipaint edit --from-inversion inv.safetensors --to "…"

See docs/editing.md. The modules that import torch load when a command or call runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl

if TYPE_CHECKING:
    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

    from .inversion import Inversion

__all__ = ["edit", "invert", "load_inversion"]


def edit(pipe: Pipeline, prompt: str | None = None, target: str | None = None, **kwargs: Any) -> Result:
    """Prompt-to-Prompt edit; see :func:`aipaint_plugins.prompt_to_prompt.editing.edit`."""
    from .editing import edit as run

    return run(pipe, prompt, target, **kwargs)


def invert(pipe: Pipeline, image: Any, caption: str, **kwargs: Any) -> Inversion:
    """(Null-text) inversion of a real image; see :func:`aipaint_plugins.prompt_to_prompt.inversion.invert`."""
    from .inversion import invert as run

    return run(pipe, image, caption, **kwargs)


def load_inversion(path: Any) -> Inversion:
    """Read an inversion file written by :meth:`Inversion.save`."""
    from .inversion import load_inversion as read

    return read(path)


def _reweight(items: list[str]) -> dict[str, float]:
    from aipaint.errors import InvalidParameter

    found: dict[str, float] = {}
    for item in items:
        word, sep, value = item.partition("=")
        try:
            found[word.strip()] = float(value)
        except ValueError:
            raise InvalidParameter("--reweight", item, "must be WORD=FACTOR, e.g. red=2") from None
        if not sep or not word.strip():
            raise InvalidParameter("--reweight", item, "must be WORD=FACTOR, e.g. red=2")
    return found


def cmd_edit(args: argparse.Namespace) -> int:
    from aipaint.api.result import output_path
    from aipaint.cli.api import build_request, load_pipeline, progress_bar
    from aipaint.errors import AipaintError, InvalidParameter

    if args.to is None and not args.reweight:
        raise AipaintError("give the edit's prompt with --to (or --reweight WORD=F to re-weight a word of the prompt)")
    if args.batch_size not in (None, 1):
        raise InvalidParameter("--batch-size", args.batch_size, "must be 1: an edit runs the source and the edit as a pair")
    inversion = None
    if args.from_inversion:
        from .inversion import load_inversion as read

        inversion = read(args.from_inversion)
        if args.prompt is None:
            args.prompt = inversion.caption
    count = 2 if args.save_source else 1
    output_path(args.output, count, overwrite=args.overwrite)
    request = build_request(args)
    fields = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)
              if f.name not in ("prompt", "batch_size")}
    if inversion is not None:
        fields.pop("negative_prompt", None)
    pipe = load_pipeline(args)
    progress, close = progress_bar(not args.no_progress and sys.stderr.isatty())
    try:
        result = edit(pipe, request.prompt, args.to, cross_steps=args.cross_steps, self_steps=args.self_steps,
                      reweight=_reweight(args.reweight), inversion=args.from_inversion,
                      negative_rows=args.negative_rows, progress=progress, **fields)
    finally:
        close()
    output = output_path(args.output, count, overwrite=args.overwrite)
    paths = result.save_all(output, overwrite=args.overwrite) if args.save_source else [result.save(output)]
    for path in paths:
        print(path)
    print(f"seed {result.seeds[0]}, {result.timings['total']:.2f} s", file=sys.stderr)
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aipaint.api.result import check_writable
    from aipaint.cli.api import load_pipeline, progress_bar

    out = Path(args.output or Path(args.image).with_suffix(".inversion.safetensors").name)
    check_writable(out, overwrite=args.overwrite)
    pipe = load_pipeline(args)
    progress, close = progress_bar(not args.no_progress and sys.stderr.isatty())
    try:
        inv = invert(pipe, args.image, args.caption, steps=args.steps, cfg_scale=args.cfg_scale,
                     guidance_rescale=args.guidance_rescale, null_text=not args.no_null_text,
                     inner_steps=args.inner_steps, learning_rate=args.learning_rate, progress=progress)
    finally:
        close()
    inv.save(out)
    print(out)
    kind = "plain DDIM" if inv.null_embeds is None else f"null-text, final loss {inv.final_loss:.2e}"
    print(f"inverted {args.image} in {inv.seconds:.2f} s ({inv.steps} steps, {kind})", file=sys.stderr)
    return 0


@hookimpl(tryfirst=True)  # before the plugins that add their generation options (--controlnet, …) to `edit`
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import (
        add_generation_options,
        add_model_options,
        add_overwrite_option,
        mark_generation_command,
    )

    p = subparsers.add_parser("edit", help="Prompt-to-Prompt: change the prompt, keep the picture's layout")
    p.add_argument("prompt", nargs="?", help="the source prompt A (default with --from-inversion: its caption)")
    p.add_argument("--to", help="the edit's prompt B (default: A, for --reweight alone)")
    p.add_argument("--cross-steps", type=float, default=0.8, metavar="F",
                   help="fraction of the steps during which B takes A's cross-attention (default 0.8)")
    p.add_argument("--self-steps", type=float, default=0.4, metavar="F",
                   help="fraction of the steps during which B takes A's self-attention (default 0.4)")
    p.add_argument("--reweight", action="append", default=[], metavar="WORD=F",
                   help="multiply a word of B's attention by F, repeatable (e.g. red=2)")
    p.add_argument("--negative-rows", action="store_true",
                   help="also give the edit's unconditional (CFG) pass the source's attention maps (the paper edits "
                        "only the conditional pass)")
    p.add_argument("--from-inversion", metavar="FILE", help="edit a real image: an `aipaint invert` file")
    p.add_argument("--save-source", action="store_true", help="also save the source image (-o out.png: out-0 the edit, out-1 the source)")
    add_model_options(p)
    add_generation_options(p)
    add_overwrite_option(p)
    mark_generation_command(p)
    p.set_defaults(func=cmd_edit)

    p = subparsers.add_parser("invert", help="null-text inversion of a real image, for `aipaint edit --from-inversion`")
    p.add_argument("image", help="the image (its sides multiples of the model's latent factor)")
    p.add_argument("--caption", required=True, help="what the image shows, as a prompt")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20); the edit runs the same")
    p.add_argument("--cfg-scale", "--cfg", type=float, dest="cfg_scale", help="CFG scale of the edit (default: the model's)")
    p.add_argument("--guidance-rescale", type=float, help="guidance rescale of the edit (default: the model's)")
    p.add_argument("--no-null-text", action="store_true", help="plain DDIM inversion (no optimisation; less faithful)")
    p.add_argument("--inner-steps", type=int, default=10, help="Adam iterations per step at most (default 10)")
    p.add_argument("--learning-rate", type=float, default=1e-2, help="Adam's learning rate (default 0.01)")
    p.add_argument("-o", "--output", help="the inversion file (default: IMAGE.inversion.safetensors here)")
    p.add_argument("--no-progress", action="store_true")
    add_model_options(p)
    add_overwrite_option(p)
    p.set_defaults(func=cmd_invert)
