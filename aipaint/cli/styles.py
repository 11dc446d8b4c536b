"""``--style NAME`` and ``--styles-file`` of the generation commands: A1111's saved prompt styles
(:mod:`aipaint.prompt.styles`) merged into a request's prompts, and recorded in its PNGs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from aipaint.errors import InvalidParameter

#: The PNG parameter A1111 records the styles of an image in (a JSON list of their names).
STYLES_KEY = "Styles array"


def styles_file(args: argparse.Namespace) -> Path:
    """``--styles-file``, else ``$AIPAINT_STYLES_FILE``, else ``$AIPAINT_HOME/styles.csv``."""
    import os

    from aipaint.plugin.kit.folders import aipaint_home

    given = getattr(args, "styles_file", None) or os.environ.get("AIPAINT_STYLES_FILE")
    return Path(given).expanduser() if given else aipaint_home() / "styles.csv"


def available_styles(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """The styles ``--style`` can name: those plugins contribute (``register_styles``) merged with the
    user's styles file (:func:`styles_file`; the user's style wins on a name both have, with a
    warning), and the file's path (which need not exist)."""
    from aipaint.plugin.host import create_plugin_host
    from aipaint.prompt.styles import load_styles, merged_styles

    path = styles_file(args)
    user = load_styles(path) if path.is_file() else {}
    host = create_plugin_host(run_registration=False)  # styles are asked for by their own hook, below
    return merged_styles(user, host, f"styles file {path.name!r}"), path


def apply_style_options(args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    """``--style NAME``: the styles merged into the prompt and negative prompt (A1111's way: a
    ``{prompt}`` in the style takes the prompt, else the style is appended), recorded for the PNG.
    Plugins' styles are there too; the user's styles file wins on a name both have."""
    from aipaint.prompt.styles import apply_styles

    styles, path = available_styles(args)
    missing = [name for name in args.styles if name not in styles]
    if missing and not path.is_file():
        raise InvalidParameter("style", missing[0], f"needs a styles file, and there is none at {path}",
                               "give --styles-file FILE or set AIPAINT_STYLES_FILE (A1111's styles.csv format)")
    kwargs["prompt"], kwargs["negative_prompt"] = apply_styles(
        kwargs["prompt"], kwargs.get("negative_prompt", ""), list(args.styles), styles)
    args.recorded_entries = {**getattr(args, "recorded_entries", {}), STYLES_KEY: json.dumps(list(args.styles))}


def recorded(args: argparse.Namespace, result: Any) -> Any:
    """``result`` with the entries the options recorded (``Styles array``) in each image's PNG parameters."""
    from aipaint.workflows.common import record_entries

    return record_entries(result, getattr(args, "recorded_entries", None) or {})


def cmd_styles(args: argparse.Namespace) -> int:
    """``aipaint styles``: every style ``--style`` can name, a line each, with where it comes from."""
    from aipaint.plugin.host import create_plugin_host
    from aipaint.prompt.styles import load_styles, plugin_styles

    path = styles_file(args)
    user = load_styles(path) if path.is_file() else {}
    contributed = plugin_styles(create_plugin_host(run_registration=False))
    names = list(contributed) + [name for name in user if name not in contributed]
    if not names:
        print(f"no styles: there is no styles file at {path}, and no plugin gives any")
        return 0
    width = max(len(name) for name in names)
    for name in names:
        style = user.get(name) or contributed[name][0]
        source = (f"{path.name} (replaces plugin {contributed[name][1]!r})" if name in user and name in contributed
                  else path.name if name in user else f"plugin {contributed[name][1]!r}")
        text = style.prompt or "(no prompt)"
        negative = f"  | negative: {style.negative_prompt}" if style.negative_prompt else ""
        print(f"{name:<{width}}  [{source}]  {text}{negative}")
    return 0


def register_commands(subparsers: argparse._SubParsersAction) -> None:
    """``aipaint styles``: list the saved prompt styles (the user's file and the plugins')."""
    p = subparsers.add_parser("styles", help="list the saved prompt styles --style can name (your styles.csv and plugins')")
    p.add_argument("--styles-file", metavar="FILE",
                   help="the styles file (default: $AIPAINT_STYLES_FILE, else $AIPAINT_HOME/styles.csv)")
    p.set_defaults(func=cmd_styles)


__all__ = ["STYLES_KEY", "apply_style_options", "available_styles", "cmd_styles", "recorded", "register_commands",
           "styles_file"]
