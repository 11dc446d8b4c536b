"""Typed errors. Every error a user can cause is an :class:`AipaintError`.

Messages are written for users: what was wrong, what is allowed, what to do next.
The CLI prints ``str(error)`` as one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

from typing import Any


class AipaintError(Exception):
    """Base class of every error aipaint raises on purpose."""


class AipaintWarning(UserWarning):
    """Base class of the warnings aipaint and its first-party plugins issue (part of a prompt
    ignored, LoRA keys that match nothing, a plugin skipped). The CLI prints each distinct one
    once per command, as ``aipaint: warning: ...``; ``warnings.filterwarnings("ignore",
    category=AipaintWarning)`` silences them all."""


class InvalidParameter(AipaintError, ValueError):
    """A parameter value is outside what is allowed.

    ``name``, ``value`` and ``allowed`` are kept as attributes so callers (an HTTP API,
    a GUI) can point at the offending field.
    """

    def __init__(self, name: str, value: Any, allowed: str, hint: str = "") -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        self.hint = hint
        message = f"invalid {name}={shown(value)}: {allowed}"
        if hint:
            message += f" ({hint})"
        super().__init__(message)


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut in the middle when longer than ``limit``, so that a message about a
    megabyte of pasted text stays one readable line."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[: limit // 2]}…{text[-(limit // 4) :]}{size}"


class UnknownName(InvalidParameter):
    """A name (sampler, schedule, model family, runtime, …) that nothing registered."""

    def __init__(self, kind: str, value: str, valid: list[str] | tuple[str, ...]) -> None:
        self.valid = tuple(valid)
        super().__init__(kind, value, "valid values are " + ", ".join(repr(v) for v in valid))


class ModelLoadError(AipaintError):
    """A model could not be found, read or recognised."""


class UnsafeFileError(ModelLoadError):
    """A pickle-based file was refused because loading it could run arbitrary code."""


class DownloadError(ModelLoadError):
    """Weights could not be downloaded (offline, hub unreachable, checksum mismatch)."""


class MissingWeights(ModelLoadError):
    """A component (a preprocessor, an upscaler, …) needs a weights file that is not installed.

    ``file`` is the file name it looked for and ``searched`` the folders it looked in, so
    the message can say exactly what to download and where to put it.
    """

    def __init__(self, component: str, file: str, searched: list[str] | tuple[str, ...], hint: str = "") -> None:
        self.component = component
        self.file = file
        self.searched = tuple(searched)
        self.hint = hint
        message = f"{component} needs the weights file {file!r}, which is not in {', '.join(self.searched) or 'any folder'}"
        if hint:
            message += f"; {hint}"
        super().__init__(message)


class PluginError(AipaintError):
    """A plugin broke a contract (duplicate name, bad registration)."""


class UnsupportedFeature(AipaintError):
    """The request needs something the loaded model or the installed plugins do not provide."""


class ImageError(AipaintError):
    """An input image or mask is unreadable or inconsistent with the request."""
