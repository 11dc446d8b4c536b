"""Post-processors (upscalers, face fix, QR-code art, …): the registration record, the
steps of a chain and how a chain is checked (:mod:`aipaint.engine.postprocessing` runs it).

A processor records what it did as A1111 infotext entries (``Hires upscale``,
``ADetailer model``, …); the chain merges those into the image's PNG parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline
    from aipaint.plugin.host import PluginHost

RESERVED_OPTIONS = ("request",)
"""Options the chain itself may pass: ``request`` is the image's own
:class:`aipaint.api.request.GenerationRequest` (batch of one, that image's seed) when the chain
runs after a generation, so a processor that diffuses again (hires fix, face fix) reuses
its prompt, seed and settings."""


@dataclass
class PostProcessOutput:
    """An image after post-processing, plus what to record in its PNG parameters."""

    image: Image.Image
    infotext: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PostProcessorSpec:
    """A post-processor as registered by a plugin.

    ``run(image, options, pipeline)`` returns a :class:`PostProcessOutput`; ``pipeline``
    is the loaded pipeline (or ``None`` when run on a bare image without a model, for
    processors that need no diffusion model). ``options`` lists the option names the
    processor accepts; when given, the chain refuses any other name (a typo must not be
    ignored silently). :data:`RESERVED_OPTIONS` are always accepted.
    """

    name: str
    run: Callable[[Image.Image, dict[str, Any], Pipeline | None], PostProcessOutput]
    aliases: tuple[str, ...] = ()
    description: str = ""
    needs_model: bool = False
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PostStep:
    """One link of a chain: a post-processor's name and its options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PostStep:
        """Read the command-line form ``NAME[:key=value,key=value]``.

        Values become ``int``, ``float`` or ``bool`` (``true``/``false``) where they read as
        one, otherwise stay strings; a value cannot contain a comma. A number that is not
        finite (``inf``, ``nan``, too many digits for a float) is an error. Reading takes time
        linear in the text's length.
        """
        from aipaint.errors import InvalidParameter, shown

        name, _, rest = text.partition(":")
        if not name.strip():
            raise InvalidParameter("post", text, "must be NAME or NAME:key=value,…", "e.g. hires:scale=2,strength=0.5")
        options: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise InvalidParameter("post", text, f"option {shown(item)} is not key=value", "e.g. hires:scale=2,strength=0.5")
            options[key.strip().replace("-", "_")] = _parse_value(key.strip(), value.strip())
        return cls(name.strip(), options)


def _parse_value(key: str, text: str) -> Any:
    from aipaint.errors import InvalidParameter

    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        number = int(text)  # refuses more than 4300 digits (ValueError) before converting any
    except ValueError:
        pass
    else:
        if abs(number) < 2**63:
            return number
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        raise InvalidParameter(f"post option {key}", text, "must be a finite number (this one is infinite, NaN or too large for a float)")
    return value


def as_steps(steps: Sequence[PostStep | str | tuple[str, dict[str, Any]]]) -> list[PostStep]:
    out = []
    for step in steps:
        if isinstance(step, PostStep):
            out.append(step)
        elif isinstance(step, str):
            out.append(PostStep.parse(step))
        else:
            name, options = step
            out.append(PostStep(name, dict(options)))
    return out


def check_chain(steps: Sequence[PostStep], host: PluginHost) -> list[tuple[Any, PostStep]]:
    """Each step with its registered post-processor; unknown names and option names raise
    (exact names: a near miss must not pass and then be ignored). Option values are checked
    by the post-processor when it runs."""
    from aipaint.errors import UnknownName

    catalogue = host.registry.postprocessors
    resolved = [(catalogue.get(step.name), step) for step in steps]
    for spec, step in resolved:
        for key in step.options if spec.options else ():
            if key not in spec.options + RESERVED_OPTIONS:
                raise UnknownName(f"{spec.name} option", key, list(spec.options))
    return resolved


def merge_infotext(text: str, entries: dict[str, str]) -> str:
    """Add ``entries`` to an A1111 parameters text, before its closing ``Version`` entry.

    ``text`` may be empty or hold no parameters line (an image aipaint did not generate):
    the result keeps A1111's layout (the prompt line, empty when there is none, then one
    parameters line) and ends with aipaint's ``Version`` as a generated image's does, so it
    reads back as parameters even when a processor recorded only one or two entries.
    """
    from aipaint import __version__
    from aipaint.infotext import Infotext

    parsed = Infotext.from_text(text) if text else Infotext("")
    params = {k: v for k, v in parsed.params.items() if k != "Version"}
    params.update(entries)
    if "Version" in parsed.params:
        params["Version"] = parsed.params["Version"]
    elif entries and not parsed.params:
        params["Version"] = f"aipaint {__version__}"
    return Infotext(parsed.prompt, parsed.negative_prompt, params).to_text()
