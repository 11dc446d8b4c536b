"""Recipes as data: what a plugin registers through ``register_recipes``, how a user's settings are
checked against it, and how a run is recorded in (and read back from) the PNG parameters.

A recipe is a function ``run(pipe, settings) -> Result`` plus its defaults. The settings a user
gives are checked here once (unknown names list the known ones; values take the type of their
default; numbers stay inside ``ranges``), a seed of -1 is fixed first, and every image the recipe
returns records ``Recipe`` and ``Recipe settings`` (JSON, input images by path and SHA-256), so
:func:`rerun` can run the same recipe with the same settings again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import AipaintWarning, ImageError, InvalidParameter, UnknownName

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline
    from aipaint.plugin.host import PluginHost

RECIPE_KEY = "Recipe"
SETTINGS_KEY = "Recipe settings"
STEPS_KEY = "Recipe steps"
"""The PNG parameters a recipe's images record: its name, its settings (JSON) and its steps (text)."""

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Recipe:
    """One registered recipe. ``run(pipe, settings)`` gets every setting, checked; ``inputs`` name
    the settings that are images (a path or a PIL image); ``sheet``: it makes several pictures, and
    the command also writes a contact sheet of them."""

    name: str
    run: Callable[[Pipeline, dict[str, Any]], Result]
    summary: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    help: Mapping[str, str] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    sheet: bool = False
    owner: str = ""

    def check(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """Every setting: ``given`` over the defaults, each of the default's type and in its range.
        A seed of -1 becomes a random one, so the recorded settings reproduce the run."""
        unknown = [name for name in given if name not in self.defaults]
        if unknown:
            raise UnknownName(f"setting of recipe {self.name!r}", unknown[0], list(self.defaults))
        settings = {name: _typed(self.name, name, given.get(name, default), default, self.ranges.get(name))
                    for name, default in self.defaults.items()}
        for name in self.inputs:
            value = settings.get(name)
            if value is not None and not isinstance(value, (str, Path)) and not hasattr(value, "convert"):
                raise InvalidParameter(name, value, "must be an image: a file path or a PIL image")
            if isinstance(value, (str, Path)) and str(value) and not Path(value).is_file():
                raise InvalidParameter(name, str(value), "is not a file (a picture to read was expected)")
        if settings.get("seed") == -1:
            settings["seed"] = random.randrange(MAX_SEED)
        return settings


def _typed(recipe: str, name: str, value: Any, default: Any, bounds: tuple[float, float] | None) -> Any:
    """``value`` as the type of ``default`` (bool, int, float, str, list of str); None stays None."""
    from aipaint.api.options import parse_bool

    if value is None:
        return None
    if isinstance(default, bool):
        return parse_bool(name, value)
    if isinstance(default, (int, float)) and not isinstance(value, bool):
        kind = int if isinstance(default, int) else float
        try:
            number = kind(value) if not isinstance(value, str) or kind is float else int(value.strip())
        except (TypeError, ValueError):
            raise InvalidParameter(name, value, f"must be {'a whole number' if kind is int else 'a number'}") from None
        if kind is int and isinstance(value, float) and value != number:
            raise InvalidParameter(name, value, "must be a whole number")
        if isinstance(number, float) and not math.isfinite(number):
            raise InvalidParameter(name, value, "must be a finite number")
        if bounds is not None and not bounds[0] <= number <= bounds[1]:
            raise InvalidParameter(name, value, f"must be from {shown_number(bounds[0])} to {shown_number(bounds[1])}")
        return number
    if isinstance(default, (int, float)):
        raise InvalidParameter(name, value, "must be a number")
    if isinstance(default, (list, tuple)):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(";")] if ";" in value or value.strip() else []
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise InvalidParameter(name, value, "must be a list of texts (on the command line: a;b;c or a JSON list)")
        return [v for v in value if v]
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # title=2026 on the command line reads as a number
    if isinstance(default, str) and not isinstance(value, (str, Path)) and not hasattr(value, "convert"):
        raise InvalidParameter(name, value, "must be text")
    return str(value) if isinstance(value, Path) else value


def shown_number(value: float) -> str:
    """A bound as people write it: 4294967295, not 4.29497e+09."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class RecipeBook:
    """The recipes every plugin registered through ``register_recipes``, by name."""

    def __init__(self) -> None:
        self.recipes: dict[str, Recipe] = {}

    def register(self, owner: str) -> Callable[..., None]:
        def register(name: str, run: Callable[..., Any], summary: str = "", defaults: Mapping[str, Any] | None = None,
                     inputs: Sequence[str] = (), help: Mapping[str, str] | None = None,
                     ranges: Mapping[str, tuple[float, float]] | None = None, sheet: bool = False) -> None:
            if not isinstance(name, str) or not name.strip() or not callable(run):
                raise TypeError(f"register_recipes takes a name and a run function, not {name!r}, {run!r}")
            if name in self.recipes:
                warnings.warn(f"recipe {name!r} from plugin {owner!r} is ignored: plugin "
                              f"{self.recipes[name].owner!r} registered that name first", AipaintWarning, stacklevel=2)
                return
            self.recipes[name] = Recipe(name, run, summary, dict(defaults or {}), tuple(inputs), dict(help or {}),
                                        dict(ranges or {}), sheet, owner)

        return register

    def get(self, name: str) -> Recipe:
        if name not in self.recipes:
            raise UnknownName("recipe", name, sorted(self.recipes))
        return self.recipes[name]


def recipe_book(host: PluginHost) -> RecipeBook:
    """Every plugin's recipes; a plugin whose hook raises is named in a warning and skipped."""
    book = RecipeBook()
    # pluggy calls the last-registered plugin first; recipes are taken in load order, so built-in names win
    for owner, call in reversed(host.implementations("register_recipes")):
        try:
            call(register=book.register(owner))
        except Exception as exc:
            warnings.warn(f"aipaint plugin {owner!r} failed in register_recipes and was skipped: {exc!r}",
                          AipaintWarning, stacklevel=2)
    return book


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _recorded_value(value: Any) -> Any:
    """A setting as JSON: an image file by path and hash, an image given in memory by its pixels' hash."""
    if isinstance(value, (str, Path)) and Path(value).is_file():
        return {"path": str(Path(value).resolve()), "sha256": file_sha256(value)}
    if hasattr(value, "tobytes"):
        return {"path": None, "sha256": hashlib.sha256(value.tobytes()).hexdigest()}
    return value


def recorded_settings(recipe: Recipe, settings: Mapping[str, Any]) -> str:
    return json.dumps({name: _recorded_value(value) if name in recipe.inputs else value
                       for name, value in settings.items()}, ensure_ascii=False, separators=(", ", ": "))


def run_recipe(pipe: Pipeline, name: str, settings: Mapping[str, Any] | None = None, **given: Any) -> Result:
    """Run recipe ``name`` on ``pipe``: settings checked first, then the recipe; every image records
    the recipe and its settings."""
    from aipaint.workflows.common import record_entries

    recipe = recipe_book(pipe.host).get(name)
    checked = recipe.check({**(settings or {}), **given})
    result = recipe.run(pipe, checked)
    return record_entries(result, {RECIPE_KEY: recipe.name, SETTINGS_KEY: recorded_settings(recipe, checked)})


def read_recorded(parameters: str) -> tuple[str, dict[str, Any]]:
    """``(recipe name, settings)`` recorded in a PNG's parameters text."""
    from aipaint.infotext import Infotext

    params = Infotext.from_text(parameters).params
    if RECIPE_KEY not in params or SETTINGS_KEY not in params:
        raise InvalidParameter("png", "(no recipe)", f"has no {RECIPE_KEY!r} and {SETTINGS_KEY!r} entries",
                               "only pictures a recipe made can be re-run as a recipe")
    try:
        settings = json.loads(params[SETTINGS_KEY])
    except json.JSONDecodeError as exc:
        raise InvalidParameter(SETTINGS_KEY, params[SETTINGS_KEY][:60], f"is not JSON ({exc.msg})") from None
    if not isinstance(settings, dict):
        raise InvalidParameter(SETTINGS_KEY, params[SETTINGS_KEY][:60], "must be a JSON object")
    return params[RECIPE_KEY], settings


def rerun(pipe: Pipeline, png: str | Path, *, inputs: Mapping[str, Any] | None = None, **overrides: Any) -> Result:
    """Run again the recipe a PNG records, with the settings it records (``overrides`` win). Input
    images are read from their recorded paths and must still have the recorded SHA-256; pass
    ``inputs={"image": path}`` for a file that has moved (its hash is checked too)."""
    from aipaint.infotext import read_png_parameters

    text = read_png_parameters(png)
    if not text:
        raise ImageError(f"{Path(png).name} has no PNG parameters to re-run")
    name, settings = read_recorded(text)
    recipe = recipe_book(pipe.host).get(name)
    for key in recipe.inputs:
        record = settings.get(key)
        if not isinstance(record, dict):
            continue
        path = (inputs or {}).get(key) or record.get("path")
        if path is None:
            raise InvalidParameter(key, None, "was an image given in memory; pass it again",
                                   f"rerun(pipe, png, inputs={{{key!r}: image_path}})")
        if not Path(path).is_file():
            raise ImageError(f"{key}: the recorded input {path} is not there; pass inputs={{{key!r}: PATH}}")
        if file_sha256(path) != record.get("sha256"):
            raise ImageError(f"{key}: {Path(path).name} is not the picture the recipe ran on (its SHA-256 differs)")
        settings[key] = str(path)
    return run_recipe(pipe, name, {**settings, **overrides})


def with_steps(result: Result, steps: Sequence[str]) -> Result:
    """``result`` with ``Recipe steps: a > b > c`` in every image's parameters."""
    from aipaint.workflows.common import record_entries

    return record_entries(result, {STEPS_KEY: " > ".join(steps)})


def single(images: list[Image.Image], infotexts: list[str], seeds: list[int], request: Any,
           timings: dict[str, float] | None = None) -> Result:
    """A :class:`Result` of pictures a recipe made outside one generation (a chain of steps)."""
    from aipaint.api.result import Result

    return Result(images=images, seeds=seeds, infotexts=infotexts, request=request, timings=timings or {})


def replace_images(result: Result, images: list[Image.Image], entries: Mapping[str, str] | None = None) -> Result:
    """``result`` with new pictures (same count) and ``entries`` added to their parameters."""
    from aipaint.plugin.postprocess import merge_infotext

    infotexts = [merge_infotext(text, dict(entries)) for text in result.infotexts] if entries else result.infotexts
    return dataclasses.replace(result, images=images, infotexts=infotexts)


__all__ = ["RECIPE_KEY", "SETTINGS_KEY", "STEPS_KEY", "Recipe", "RecipeBook", "read_recorded", "recipe_book",
           "recorded_settings", "replace_images", "rerun", "run_recipe", "single", "with_steps"]
