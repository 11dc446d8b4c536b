"""Reading plugin options given as a mapping (post-processor options, unit options): numbers
in a range, sizes and yes/no values, each refused with an error that names the option, the
value and what is allowed. Yes/no values are parsed by :func:`aipaint.api.options.parse_bool`,
the one boolean parser."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aipaint.api.options import parse_bool
from aipaint.errors import InvalidParameter


def number(options: Mapping[str, Any], name: str, default: float, lo: float, hi: float, *, integer: bool = False,
           low_open: bool = False) -> Any:
    """Read a numeric option and check its range; the error names the option and the range."""
    value = options.get(name, default)
    if value is None:
        value = default
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InvalidParameter(name, value, f"must be a number from {lo} to {hi}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, value, f"must be a number from {lo} to {hi}")
    if integer:
        if not float(value).is_integer():
            raise InvalidParameter(name, value, f"must be a whole number from {lo} to {hi}")
        value = int(value)
    if (value <= lo if low_open else value < lo) or value > hi:
        bound = f"above {lo}" if low_open else f"from {lo}"
        raise InvalidParameter(name, value, f"must be {bound} to {hi}")
    return value


def option_bool(options: Mapping[str, Any], name: str, default: bool = False) -> bool:
    """The yes/no option ``name`` (``default`` when absent or None), parsed by
    :func:`~aipaint.api.options.parse_bool`: never truthiness, so ``allow_pickle=no`` or a typo
    such as ``allow_pickle=nope`` can never switch a safety option on."""
    value = options.get(name)
    return default if value is None else parse_bool(name, value)


def parse_size(value: Any, name: str) -> tuple[int, int] | None:
    """``"1024x768"`` or ``(1024, 768)`` → (width, height); ``None``/empty → None."""
    if value in (None, "", 0):
        return None
    if isinstance(value, str):
        parts = value.lower().split("x")
        try:
            width, height = (int(p) for p in parts)
        except ValueError:
            raise InvalidParameter(name, value, "must be WIDTHxHEIGHT, e.g. 1024x768") from None
    else:
        try:
            width, height = (int(v) for v in value)
        except (TypeError, ValueError):
            raise InvalidParameter(name, value, "must be WIDTHxHEIGHT, e.g. 1024x768") from None
    if width < 8 or height < 8:
        raise InvalidParameter(name, value, "must be at least 8x8")
    return width, height
