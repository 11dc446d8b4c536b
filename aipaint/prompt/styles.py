"""A1111's saved prompt styles: a ``styles.csv`` read into data, and styles applied to a prompt.

The file is A1111's: a header row ``name,prompt,negative_prompt`` (A1111's older ``text``
column is read as ``prompt``; other columns are left alone), one style a row, rows whose
name is empty or starts with ``#`` skipped, a later row of the same name replacing an
earlier one. A style's text with ``{prompt}`` in it has the user's prompt put there; any
other style text is appended to the prompt after ``", "`` (A1111's ``merge_prompts``).
The same holds for the negative prompt. Styles apply in the order given.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from aipaint.errors import AipaintWarning, InvalidParameter, UnknownName

if TYPE_CHECKING:
    from aipaint.plugin.host import PluginHost

MAX_STYLES_BYTES = 16 * 2**20  # a styles file is text someone wrote; more than this is not one


@dataclass(frozen=True)
class PromptStyle:
    """One saved style: its name and the text it adds to the prompt and the negative prompt."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_prompt(style_text: str, prompt: str) -> str:
    """``prompt`` with one style's text: put at ``{prompt}`` when the style has it, else
    appended after ``", "`` (neither side empty), as A1111 merges them."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def parse_styles(text: str, source: str = "the styles file") -> dict[str, PromptStyle]:
    """The styles in the text of a ``styles.csv``, by name, in file order."""
    reader = csv.DictReader(io.StringIO(text), skipinitialspace=True)
    fields = [name.strip() for name in reader.fieldnames or ()]
    if "name" not in fields:
        raise InvalidParameter(source, f"header {fields}" if fields else "an empty file",
                               "must be a CSV file whose first row is name,prompt,negative_prompt (A1111's styles.csv)")
    reader.fieldnames = fields
    styles: dict[str, PromptStyle] = {}
    try:
        for row in reader:
            name = (row.get("name") or "").strip()
            if not name or name.startswith("#"):
                continue
            prompt = row.get("prompt") if row.get("prompt") is not None else row.get("text")
            styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
    except csv.Error as exc:
        raise InvalidParameter(source, f"line {reader.line_num}", f"is not valid CSV ({exc})") from None
    return styles


def load_styles(path: str | Path) -> dict[str, PromptStyle]:
    """The styles in A1111's ``styles.csv`` at ``path`` (UTF-8, a byte-order mark allowed)."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        if size > MAX_STYLES_BYTES:
            raise InvalidParameter("styles file", path.name, f"is {size:,} bytes, more than a styles file holds "
                                                             f"({MAX_STYLES_BYTES:,} at most)")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidParameter("styles file", path.name, f"is not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise InvalidParameter("styles file", str(path), f"cannot be read ({exc.strerror or exc})") from None
    return parse_styles(text, f"styles file {path.name!r}")


def apply_styles(prompt: str, negative_prompt: str, names: Sequence[str],
                 styles: Mapping[str, PromptStyle]) -> tuple[str, str]:
    """``(prompt, negative_prompt)`` with the styles ``names`` applied in order. An unknown
    name is an :class:`~aipaint.errors.UnknownName` listing the known ones; nothing is applied
    unless every name is known."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise InvalidParameter("styles", names, "must be a list of style names")
    chosen = []
    for name in names:
        if not isinstance(name, str):
            raise InvalidParameter("styles", names, "must be a list of style names")
        if name not in styles:
            raise UnknownName("style", name, list(styles) or ["(none: no styles file was given)"])
        chosen.append(styles[name])
    for style in chosen:
        prompt = merge_prompt(style.prompt, prompt)
        negative_prompt = merge_prompt(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


def plugin_styles(host: PluginHost) -> dict[str, tuple[PromptStyle, str]]:
    """The styles plugins contribute through the ``register_styles`` hook, by name, each with the
    plugin that gave it. A plugin whose hook raises, or that registers something other than a
    :class:`PromptStyle`, is named in a warning and skipped; a name two plugins give keeps the
    first (plugins are called in load order, built-ins first), with a warning."""
    import warnings

    found: dict[str, tuple[PromptStyle, str]] = {}
    # pluggy calls the last-registered plugin first; styles are taken in load order (built-ins first) instead
    for owner, call in reversed(host.implementations("register_styles")):
        given: list[PromptStyle] = []

        def register(style: PromptStyle, given: list[PromptStyle] = given) -> None:
            if not isinstance(style, PromptStyle) or not isinstance(style.name, str) or not style.name.strip():
                raise TypeError(f"register_styles takes PromptStyle objects with a name, not {style!r}")
            given.append(style)

        try:
            call(register=register)
        except Exception as exc:  # a broken plugin must not take the other styles with it
            warnings.warn(f"aipaint plugin {owner!r} failed in register_styles and was skipped: {exc!r}",
                          AipaintWarning, stacklevel=2)
            continue
        for style in given:
            if style.name in found:
                warnings.warn(f"style {style.name!r} from plugin {owner!r} is ignored: plugin "
                              f"{found[style.name][1]!r} gave that name first", AipaintWarning, stacklevel=2)
                continue
            found[style.name] = (style, owner)
    return found


def merged_styles(user: Mapping[str, PromptStyle], host: PluginHost | None,
                  user_source: str = "your styles file") -> dict[str, PromptStyle]:
    """The plugins' styles and the user's, by name: the plugins' first, then the user's file, whose
    style wins on a name both have (a warning names the plugin whose style it replaces)."""
    import warnings

    contributed = plugin_styles(host) if host is not None else {}
    merged = {name: style for name, (style, _) in contributed.items()}
    for name, style in user.items():
        if name in merged:
            warnings.warn(f"style {name!r} from {user_source} replaces the one plugin {contributed[name][1]!r} "
                          "gives", AipaintWarning, stacklevel=2)
        merged[name] = style
    return merged


__all__ = ["PromptStyle", "apply_styles", "load_styles", "merge_prompt", "merged_styles", "parse_styles",
           "plugin_styles"]
