"""An adapter's infotext entries, declared once: the same description writes an entry into
the PNG parameters and reads it back (``--from-png``), so the writer and the reader cannot
drift apart.

Three shapes cover what A1111 and its extensions write:

* :class:`TextCodec` — one entry whose value a pair of functions writes and reads
  (LoRA's ``Lora units``: ``<lora:ink:0.8> <lora:paper:0.5>``);
* :class:`MappingCodec` — ``name: value, name: value`` (``Lora hashes``, ``TI hashes``);
* :class:`FieldsCodec` — labelled fields, ``Label: value, Label: value``, each mapped to an
  option, optionally numbered (sd-webui-controlnet's ``ControlNet 0``, ``ControlNet 1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aipaint.errors import InvalidParameter

_T = TypeVar("_T")
INDEX = "{index}"  # where a numbered entry's key holds its number, e.g. "ControlNet {index}"


@dataclass(frozen=True)
class TextCodec(Generic[_T]):
    """One entry ``key`` whose value ``encode`` writes and ``decode`` reads back (raising a typed
    error for a malformed value)."""

    key: str
    encode: Callable[[_T], str]
    decode: Callable[[str], _T]

    def write(self, value: _T) -> dict[str, str]:
        """``{key: encode(value)}``."""
        return {self.key: self.encode(value)}

    def read(self, params: Mapping[str, str]) -> _T | None:
        """The decoded entry of ``params``, or None when it is absent or empty."""
        text = params.get(self.key)
        return self.decode(text) if text else None


def _check_text(name: str, value: Any) -> str:
    text = str(value)
    if "," in text or ": " in text:
        raise InvalidParameter(name, value, "must not contain ',' or ': ' (PNG parameters)")
    return text


@dataclass(frozen=True)
class MappingCodec:
    """An entry ``key`` written as ``name: value, name: value`` (A1111's ``Lora hashes``).
    Names lose ``:`` and ``,`` as A1111 does, so every entry reads back."""

    key: str

    @staticmethod
    def alias(name: str) -> str:
        """``name`` as it can be written in the entry (without ``:`` and ``,``)."""
        return name.replace(":", "").replace(",", "")

    def write(self, values: Mapping[str, str]) -> dict[str, str]:
        """``{key: "name: value, …"}`` for the aliased names; nothing when ``values`` is empty."""
        if not values:
            return {}
        return {self.key: ", ".join(f"{self.alias(n)}: {_check_text(f'{self.key} {n}', v)}" for n, v in values.items())}

    def read(self, params: Mapping[str, str]) -> dict[str, str]:
        """The ``{name: value}`` of the entry (empty when absent)."""
        text = params.get(self.key)
        if not text:
            return {}
        found: dict[str, str] = {}
        for part in text.split(","):
            name, sep, value = part.partition(":")
            if not sep or not name.strip():
                raise InvalidParameter(self.key, text, "must be 'name: value' pairs separated by ','")
            found[name.strip()] = value.strip()
        return found


def a1111_value(value: Any) -> str:
    """A value as A1111's extensions write it: numbers as floats (``1`` → ``1.0``), the rest as text."""
    return str(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Field:
    """One ``Label: value`` field: its ``option`` name (None: written, never read back), how its
    value reads back (``float`` or ``str``) and how it is written."""

    label: str
    option: str | None
    kind: type = str
    write: Callable[[Any], str] = a1111_value


@dataclass(frozen=True)
class FieldsCodec:
    """An entry of labelled fields. ``key`` may hold :data:`INDEX` for numbered entries
    (``"ControlNet {index}"``); ``required`` options must be present when reading. Unknown
    labels are ignored on reading, since other tools write fields aipaint does not use."""

    key: str
    fields: tuple[Field, ...]
    required: tuple[str, ...] = ()

    def entry_key(self, index: int | None = None) -> str:
        if (INDEX in self.key) != (index is not None):
            raise ValueError(f"the entry {self.key!r} needs {'an' if INDEX in self.key else 'no'} index")
        return self.key.replace(INDEX, str(index)) if index is not None else self.key

    def write(self, values: Mapping[str, Any], *, index: int | None = None) -> dict[str, str]:
        """``{key: "Label: value, …"}`` for every field, valued by option (or by label for
        fields without an option). A value holding ``,`` or ``": "`` is refused: it would not read back."""
        key = self.entry_key(index)
        parts = []
        for field in self.fields:
            value = values[field.option if field.option is not None else field.label]
            parts.append(f"{field.label}: {_check_text(f'{key} {field.label.lower()}', field.write(value))}")
        return {key: ", ".join(parts)}

    def decode(self, key: str, text: str) -> dict[str, Any]:
        """The options of one entry's text; ``key`` names the entry in errors."""
        by_label = {field.label: field for field in self.fields}
        options: dict[str, Any] = {}
        for part in str(text).split(", "):
            label, sep, value = part.partition(": ")
            field = by_label.get(label.strip())
            if not sep or field is None or field.option is None:
                continue
            value = value.strip()
            if field.kind is float:
                try:
                    options[field.option] = float(value)
                except ValueError as exc:
                    raise InvalidParameter(f"{key} {label.strip()}", value, "is not a number") from exc
            else:
                options[field.option] = value
        for option in self.required:
            if option not in options:
                label = next(f.label for f in self.fields if f.option == option)
                raise InvalidParameter(key, text, f"records no {label}")
        return options

    def read(self, params: Mapping[str, str]) -> list[dict[str, Any]]:
        """The entries' options, numbered ones in index order (at most 9999: ``int()`` must not be
        handed thousands of digits)."""
        if INDEX not in self.key:
            return [self.decode(self.key, params[self.key])] if params.get(self.key) else []
        before, after = self.key.split(INDEX, 1)
        pattern = re.compile(re.escape(before) + r"(\d{1,4})" + re.escape(after))
        found = []
        for key, text in params.items():
            match = pattern.fullmatch(key.strip())
            if match:
                found.append((int(match[1]), self.decode(key, text)))
        return [options for _, options in sorted(found, key=lambda item: item[0])]
