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


def apply_style_options(args: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    """``--style NAME``: the styles merged into the prompt and negative prompt (A1111's way: a
    ``{prompt}`` in the style takes the prompt, else the style is appended), recorded for the PNG."""
    from aipaint.prompt.styles import apply_styles, load_styles

    path = styles_file(args)
    if not path.is_file():
        raise InvalidParameter("style", args.styles[0], f"needs a styles file, and there is none at {path}",
                               "give --styles-file FILE or set AIPAINT_STYLES_FILE (A1111's styles.csv format)")
    kwargs["prompt"], kwargs["negative_prompt"] = apply_styles(
        kwargs["prompt"], kwargs.get("negative_prompt", ""), list(args.styles), load_styles(path))
    args.recorded_entries = {**getattr(args, "recorded_entries", {}), STYLES_KEY: json.dumps(list(args.styles))}


def recorded(args: argparse.Namespace, result: Any) -> Any:
    """``result`` with the entries the options recorded (``Styles array``) in each image's PNG parameters."""
    from aipaint.workflows.common import record_entries

    return record_entries(result, getattr(args, "recorded_entries", None) or {})


__all__ = ["STYLES_KEY", "apply_style_options", "recorded", "styles_file"]
