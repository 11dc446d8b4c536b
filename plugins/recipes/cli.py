"""``aipaint recipes`` (what there is, a line each; one recipe's settings) and ``aipaint recipe NAME``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.api.result import Result

SHEET_KEY = "Contact sheet"


def contact_sheet_of(result: Result, title: str = "") -> Image.Image:
    """The pictures of ``result`` on one labelled sheet (each labelled with its seed and, where the
    prompts differ, the part of its prompt that differs)."""
    from aipaint_plugins.recipes.layout import contact_sheet

    from aipaint.infotext import Infotext

    prompts = [Infotext.from_text(text).prompt for text in result.infotexts]
    common = _common_prefix(prompts) if len(set(prompts)) > 1 else ""
    labels = [f"seed {seed}" + (f": {prompt[len(common):].strip(' ,')}" if common or len(set(prompts)) > 1 else "")
              for seed, prompt in zip(result.seeds, prompts)]
    return contact_sheet(result.images, labels, title=title)


def _common_prefix(texts: list[str]) -> str:
    prefix = texts[0]
    for text in texts[1:]:
        while not text.startswith(prefix):
            prefix = prefix[:-1]
    return prefix[: prefix.rfind(",") + 1] if "," in prefix else prefix


def save_outputs(result: Result, output: str | Path, *, overwrite: bool = False, sheet: bool = False,
                 title: str = "") -> list[Path]:
    """Write every picture (``out.png``, or ``out-0.png``, ``out-1.png``, … for several) and, with
    ``sheet``, the contact sheet ``out-sheet.png``; nothing is written when a file is there without
    ``overwrite``."""
    from aipaint.api.result import batch_paths, check_writable, save_png
    from aipaint.plugin.postprocess import merge_infotext

    output = Path(output)
    paths = batch_paths(output, len(result.images))
    sheet_path = output.with_name(f"{output.stem}-sheet.png") if sheet else None
    for path in paths + ([sheet_path] if sheet_path else []):
        check_writable(path, overwrite=overwrite)
    written = [save_png(image, path, text, overwrite=overwrite)
               for image, path, text in zip(result.images, paths, result.infotexts)]
    if sheet_path is not None:
        text = merge_infotext(result.infotexts[0], {SHEET_KEY: f"{len(result.images)} pictures"})
        written.append(save_png(contact_sheet_of(result, title), sheet_path, text, overwrite=overwrite))
    return written


def _book() -> Any:
    from aipaint_plugins.recipes.registry import recipe_book

    from aipaint.plugin.host import create_plugin_host

    return recipe_book(create_plugin_host(run_registration=False))


def cmd_recipes(args: argparse.Namespace) -> int:
    from aipaint_plugins.recipes.registry import shown_number

    book = _book()
    if args.name:
        recipe = book.get(args.name)
        print(f"{recipe.name}: {recipe.summary}")
        print(f"  aipaint recipe {recipe.name} KEY=VALUE …   (plugin {recipe.owner!r})")
        width = max(len(name) for name in recipe.defaults) if recipe.defaults else 0
        for name, default in recipe.defaults.items():
            shown = "(required)" if default is None and name in recipe.inputs else repr(default)
            bounds = recipe.ranges.get(name)
            extra = f" [{shown_number(bounds[0])}..{shown_number(bounds[1])}]" if bounds else ""
            print(f"  {name:<{width}}  {shown}{extra}  {recipe.help.get(name, '')}".rstrip())
        return 0
    width = max((len(name) for name in book.recipes), default=0)
    for name, recipe in sorted(book.recipes.items()):
        print(f"{name:<{width}}  {recipe.summary}")
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    from aipaint_plugins.recipes.registry import read_recorded, rerun, run_recipe

    from aipaint.cli import api

    given = api.parse_key_values(args.settings, "recipe setting")
    for name in ("image", "mask", "prompt", "negative_prompt", "seed", "steps"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    if args.from_png:
        from aipaint.infotext import read_png_parameters

        recorded, _ = read_recorded(read_png_parameters(args.from_png) or "")
        if args.name not in ("-", recorded):
            raise InvalidParameter("recipe", args.name, f"differs from the one {Path(args.from_png).name} records ({recorded!r})",
                                   f"aipaint recipe {recorded} --from-png …, or aipaint recipe - --from-png …")
        name = recorded
    else:
        name = args.name
    recipe = _book().get(name)
    if not args.from_png:
        given = recipe.check(given)  # every setting checked before the model loads
    output = Path(args.output or f"{name}.png")
    if not args.overwrite:
        from aipaint.api.result import check_writable

        check_writable(output if not recipe.sheet else output.with_name(f"{output.stem}-sheet.png"))
    pipe = api.load_pipeline(args)
    if args.from_png:
        inputs = {key: given.pop(key) for key in recipe.inputs if key in given}
        result = rerun(pipe, args.from_png, inputs=inputs, **given)
    else:
        result = run_recipe(pipe, name, given)
    sheet = recipe.sheet and not args.no_sheet and len(result.images) > 1
    for path in save_outputs(result, output, overwrite=args.overwrite, sheet=sheet, title=f"{name}"):
        print(path)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_model_options

    p = subparsers.add_parser("recipes", help="list the recipes (one command per everyday job), or one recipe's settings")
    p.add_argument("name", nargs="?", help="a recipe: print its settings, their defaults and ranges")
    p.set_defaults(func=cmd_recipes)

    p = subparsers.add_parser("recipe", help="run a recipe: aipaint recipe NAME KEY=VALUE … (aipaint recipes lists them)")
    p.add_argument("name", help="the recipe (aipaint recipes); '-' with --from-png: the one the PNG records")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE",
                   help="settings over the recipe's defaults (aipaint recipes NAME); lists as a;b;c or JSON")
    p.add_argument("--image", help="the input picture (recipes that take one)")
    p.add_argument("--mask", help="the mask (retouch: white is repainted)")
    p.add_argument("--prompt")
    p.add_argument("--negative-prompt", dest="negative_prompt")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--from-png", metavar="PNG", help="run again the recipe and settings a PNG records (settings given win)")
    p.add_argument("-o", "--output", help="output PNG (default: NAME.png; several pictures: NAME-0.png, …)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-sheet", action="store_true", help="no contact sheet for recipes that make several pictures")
    add_model_options(p)
    p.set_defaults(func=cmd_recipe)


__all__ = ["SHEET_KEY", "add_commands", "cmd_recipe", "cmd_recipes", "contact_sheet_of", "save_outputs"]
