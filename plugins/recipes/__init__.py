"""Recipes: one command and one Python call per everyday job, built from the installed plugins.

``aipaint recipes`` lists them, ``aipaint recipe NAME KEY=VALUE …`` runs one; in Python::

    import aipaint
    from aipaint_plugins import recipes

    pipe = aipaint.load()
    result = recipes.avatar(pipe, image="me.jpg", style="oil painting", seed=1)
    result = recipes.run_recipe(pipe, "cover", prompt="a lighthouse at dusk", title="North Sea")
    again = recipes.rerun(pipe, "cover.png")        # the recipe and settings its PNG records

Recipes are registered through the ``register_recipes`` hook exactly as a third-party package
registers its own; this plugin registers the built-in ones and runs the hook. It also gives a
few saved prompt styles through ``register_styles`` (``aipaint styles`` lists them).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aipaint_plugins.recipes.registry import (
    RECIPE_KEY,
    SETTINGS_KEY,
    STEPS_KEY,
    recipe_book,
    rerun,
    run_recipe,
)

from aipaint import hookimpl
from aipaint.prompt.styles import PromptStyle

if TYPE_CHECKING:
    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

STYLES = (
    PromptStyle("oil painting", "{prompt}, oil painting, thick brush strokes, rich colours", "photo, flat colours"),
    PromptStyle("watercolour", "{prompt}, watercolour painting, soft washes, paper texture", "photo, harsh lines"),
    PromptStyle("comic", "{prompt}, comic book art, bold ink outlines, flat colours", "photo, blurry"),
    PromptStyle("pixel art", "{prompt}, pixel art, limited palette, crisp pixels", "blurry, smooth gradients"),
    PromptStyle("studio portrait", "{prompt}, studio portrait, soft light, sharp focus", "blurry, distorted face"),
)


def _call(name: str) -> Callable[..., Result]:
    def call(pipe: Pipeline, **settings: Any) -> Result:
        return run_recipe(pipe, name, **settings)

    call.__name__ = name.replace("-", "_")
    call.__doc__ = f"Run the {name!r} recipe on ``pipe`` (``aipaint recipes {name}`` lists its settings)."
    return call


avatar = _call("avatar")
character = _call("character")
lineart = _call("lineart")
stylize = _call("stylize")
old_photo = _call("old-photo")
retouch = _call("retouch")
ad = _call("ad")
variations = _call("variations")
sticker = _call("sticker")
cover = _call("cover")
qr = _call("qr")


@hookimpl
def register_recipes(register: Callable[..., None]) -> None:
    from aipaint_plugins.recipes.builtin import register_builtin

    register_builtin(register)


@hookimpl
def register_styles(register: Callable[[PromptStyle], None]) -> None:
    for style in STYLES:
        register(style)


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint_plugins.recipes.cli import add_commands

    add_commands(subparsers)


__all__ = ["RECIPE_KEY", "SETTINGS_KEY", "STEPS_KEY", "STYLES", "ad", "avatar", "character", "cover", "lineart",
           "old_photo", "qr", "recipe_book", "rerun", "retouch", "run_recipe", "sticker", "stylize", "variations"]
