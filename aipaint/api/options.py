"""Typed option groups: how a plugin adds its own parameters to a generation request.

A plugin declares a frozen dataclass that subclasses :class:`OptionGroup` and names its
``namespace``, and registers the class through the ``register_options`` hook::

    @dataclass(frozen=True)
    class SDXLOptions(OptionGroup):
        namespace: ClassVar[str] = "sdxl"
        aesthetic_score: float = 6.0

Users pass the group, or a plain mapping under its namespace (what the CLI and the HTTP
API build from text)::

    pipe.txt2img("…", options=[SDXLOptions(aesthetic_score=6.5)])
    pipe.txt2img("…", options={"sdxl": {"aesthetic_score": 6.5}})

The core turns every mapping into its typed group once, when the request enters
generation (:func:`resolve_options`): an unknown namespace or field is an
:class:`aipaint.errors.InvalidParameter` that names the close matches, and each value is
checked against its field's type. Plugins read their group with
``request.option(SDXLOptions)``, which gives the defaults when the user set nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from aipaint.errors import InvalidParameter

G = TypeVar("G", bound="OptionGroup")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(name: str, value: Any) -> bool:
    """A typed boolean from ``True``/``False`` or the words people write for them.

    Anything else is an error, never truthiness: ``"false"`` must not switch a security
    opt-in on.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidParameter(name, value, "must be true or false (also accepted: yes/no, on/off, 1/0)")


def close_matches(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'a' or 'b'?)"`` for the choices close to ``word``, else ``""``."""
    found = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    if not found:
        return ""
    return " (did you mean " + " or ".join(repr(f) for f in found) + "?)"


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` as the field type ``kind`` (bool, int, float, str, Path, an Optional of them)."""
    origin = typing.get_origin(kind)
    if origin is typing.Union or origin is types.UnionType:
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None and len(options) < len(typing.get_args(kind)):
            return None
        if len(options) == 1:
            return _coerce(name, value, options[0])
        return value
    if kind is bool:
        return parse_bool(name, value)
    if kind is int:
        if isinstance(value, str):
            text = value.strip()
            if not (text.lstrip("+-").isdigit() and len(text) <= 20):
                raise InvalidParameter(name, value, "must be a whole number")
            return int(text)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidParameter(name, value, "must be a whole number")
        return value
    if kind is float:
        if isinstance(value, str):
            try:
                value = float(value) if len(value) <= 64 else math.nan
            except ValueError:
                raise InvalidParameter(name, value, "must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidParameter(name, value, "must be a finite number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise InvalidParameter(name, value, "must be text")
        return value
    if kind is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise InvalidParameter(name, value, "must be a path")
        return Path(value)
    return value


@dataclasses.dataclass(frozen=True)
class OptionGroup:
    """Base class of a plugin's typed options. Subclass as a frozen dataclass and set ``namespace``.

    Field types may be ``bool``, ``int``, ``float``, ``str``, ``Path`` or an optional of one of
    them; values given as text (the CLI, JSON) are converted and checked by
    :meth:`from_mapping`. Check ranges in ``__post_init__`` and raise
    :class:`aipaint.errors.InvalidParameter` naming ``"<namespace>.<field>"``.
    """

    namespace: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Fields of A1111/Forge HTTP API bodies this group reads (``aipaint serve``): body key →
    #: (field name, the value the API sends when the user set nothing, which leaves the option unset).
    api_fields: ClassVar[dict[str, tuple[str, Any]]] = {}

    @classmethod
    def from_mapping(cls: type[G], values: Mapping[str, Any]) -> G:
        """The group built from a mapping of field names to values (text is converted)."""
        if not isinstance(values, Mapping):
            raise InvalidParameter(f"options[{cls.namespace!r}]", values, "must be a mapping of option names to values")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        converted = {}
        for key, value in values.items():
            if key not in fields:
                raise InvalidParameter(
                    f"{cls.namespace}.{key}", value,
                    f"is not an option of {cls.namespace!r}; its options are {', '.join(fields) or 'none'}"
                    + close_matches(str(key), fields),
                )
            converted[key] = _coerce(f"{cls.namespace}.{key}", value, hints[key])
        return cls(**converted)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


def resolve_options(given: Mapping[str, Any], known: Mapping[str, type[OptionGroup]]) -> dict[str, OptionGroup]:
    """Every group of ``given`` as its typed class from ``known`` (namespace → class).

    An unknown namespace names the installed ones and the close matches.
    """
    resolved: dict[str, OptionGroup] = {}
    for namespace, value in given.items():
        cls = known.get(namespace)
        if cls is None:
            raise InvalidParameter(
                "options", namespace,
                "no installed plugin declares these options; known: " + (", ".join(sorted(known)) or "none")
                + close_matches(namespace, known),
            )
        if isinstance(value, OptionGroup):
            if not isinstance(value, cls):
                raise InvalidParameter("options", namespace, f"must be a {cls.__name__}, not {type(value).__name__}")
            resolved[namespace] = value
        else:
            resolved[namespace] = cls.from_mapping(value)
    return resolved


def normalise_options(value: Any) -> dict[str, Any]:
    """A request's ``options`` argument (a mapping by namespace, or option groups) as a dict."""
    if value is None:
        return {}
    if isinstance(value, OptionGroup):
        value = [value]
    if isinstance(value, Mapping):
        out = {}
        for key, group in value.items():
            if not isinstance(key, str):
                raise InvalidParameter("options", key, "keys must be option namespaces (text)")
            out[key] = group
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for group in value:
            if not isinstance(group, OptionGroup):
                raise InvalidParameter("options", group, "must be option groups or a mapping by namespace")
            if group.namespace in out:
                raise InvalidParameter("options", group.namespace, "is given twice")
            out[group.namespace] = group
        return out
    raise InvalidParameter("options", value, "must be option groups or a mapping by namespace")


def parse_assignments(texts: Iterable[str], what: str = "--option") -> dict[str, dict[str, str]]:
    """``["sdxl.aesthetic_score=6", …]`` (the CLI's ``--option``) as ``{"sdxl": {"aesthetic_score": "6"}}``.

    Linear in the input; values stay text for :meth:`OptionGroup.from_mapping` to convert.
    """
    out: dict[str, dict[str, str]] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        namespace, dot, field = key.strip().partition(".")
        if not sep or not dot or not namespace or not field:
            raise InvalidParameter(what, text, "must be NAMESPACE.OPTION=VALUE, e.g. lora.folder=/path/to/loras")
        out.setdefault(namespace, {})[field] = value.strip()
    return out


def option_group(groups: Mapping[str, Any], cls: type[G]) -> G:
    """The group ``cls`` from a request's options: typed, converted if still a mapping, or its defaults."""
    value = groups.get(cls.namespace)
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    return cls.from_mapping(value)
