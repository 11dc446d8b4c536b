"""The commands that inspect rather than generate: ``info`` (a PNG's parameters), ``samplers``,
``plugins``, ``zoo`` and ``prompt`` (how a prompt is understood)."""

from __future__ import annotations

import argparse
import json
import sys

from aipaint.cli.api import add_model_options, load_pipeline
from aipaint.plugin.host import default_host


def cmd_info(args: argparse.Namespace) -> int:
    from aipaint.infotext import Infotext, read_png_parameters

    text = read_png_parameters(args.image)
    if text is None:
        print(f"{args.image}: no generation parameters", file=sys.stderr)
        return 1
    if args.json:
        info = Infotext.from_text(text)
        print(json.dumps({"prompt": info.prompt, "negative_prompt": info.negative_prompt, "parameters": info.params}, indent=2))
    else:
        print(text)
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    registry = default_host().registry.samplers
    for spec in registry:
        flow = "  flow-matching models too" if spec.flow_scheduler_class is not None else ""
        print(f"{spec.name:<14} schedules: {', '.join(spec.schedules):<44} ({registry.owners[spec.name]}){flow}")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    host = default_host()
    print("plugins:", ", ".join(host.plugin_names()))
    reg = host.registry
    for title, cat in (
        ("model families", reg.families),
        ("samplers", reg.samplers),
        ("adapters", reg.adapters),
        ("post-processors", reg.postprocessors),
        ("preprocessors", reg.preprocessors),
        ("runtimes", reg.runtimes),
    ):
        names = ", ".join(f"{n} [{cat.owners[n]}]" for n in cat.names()) or "none"
        print(f"{title}: {names}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from aipaint.models import zoo

    for card in zoo.cards():
        marker = " (default)" if card.id == zoo.DEFAULT_MODEL else ""
        print(f"{card.id:<22} {card.family:<8} {card.source.get('kind'):<9} {card.license:<26} {card.description}{marker}")
    return 0


def cmd_prompt(args: argparse.Namespace) -> int:
    from aipaint.api.request import MAX_PROMPT_CHARS, STEPS_RANGE
    from aipaint.errors import InvalidParameter
    from aipaint.prompt import describe, parse_midjourney, parse_prompt

    text = args.prompt
    steps = args.steps
    # The same limits as a generation's, checked before any work (--mj and token counts load the model).
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidParameter("prompt", f"<{len(text)} characters>", f"must be at most {MAX_PROMPT_CHARS} characters")
    if steps is not None and not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
        raise InvalidParameter("steps", steps, f"must be from {STEPS_RANGE[0]} to {STEPS_RANGE[1]}")
    if args.midjourney:
        mj = parse_midjourney(text)
        text = mj.prompt
        if mj.negative:
            print(f"negative prompt: {mj.negative}")
        defaults = load_pipeline(args).model.defaults
        width, height = mj.size_for(defaults.width, defaults.height)
        if mj.aspect is None:
            print(f"size: {width}x{height} (the model's default; no --ar given)")
        else:
            print(f"size: {width}x{height} (--ar {mj.aspect[0]}:{mj.aspect[1]} at the pixel count of the model's "
                  f"default {defaults.width}x{defaults.height})")
        print(f"seed: {mj.seed}" if mj.seed is not None else "seed: random (no --seed given)")
        if steps is None:
            steps = mj.steps
    tokenizer = None
    if not args.no_tokens:
        from aipaint.models import zoo
        from aipaint.models.loading import resolve_source

        source = resolve_source(args.model or zoo.DEFAULT_MODEL, allow_pickle=args.allow_pickle)
        from transformers import CLIPTokenizer

        if (source.path / "tokenizer").is_dir():
            tokenizer = CLIPTokenizer.from_pretrained(source.path / "tokenizer")
    print(describe(parse_prompt(text), tokenizer=tokenizer, steps=20 if steps is None else steps))
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("info", help="print the generation parameters of a PNG")
    p.add_argument("image")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("samplers", help="list samplers and their schedule types")
    p.set_defaults(func=cmd_samplers)
    p = subparsers.add_parser("plugins", help="list loaded plugins and what they registered")
    p.set_defaults(func=cmd_plugins)
    p = subparsers.add_parser("zoo", help="list models in the zoo")
    p.set_defaults(func=cmd_zoo)

    p = subparsers.add_parser("prompt", help="show how a prompt is understood")
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, help="steps to show the schedule for (default: a Midjourney --steps, else 20)")
    p.add_argument("--midjourney", "--mj", action="store_true",
                   help="read the prompt in Midjourney syntax and print the size and seed it resolves to (loads the model)")
    p.add_argument("--no-tokens", action="store_true", help="skip token counting")
    add_model_options(p)
    p.set_defaults(func=cmd_prompt)
