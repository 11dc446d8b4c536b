"""Post-processors (upscalers, face fix, QR-code art, …): the registration record."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.pipeline import Pipeline


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
    processors that need no diffusion model).
    """

    name: str
    run: Callable[[Image.Image, dict[str, Any], Pipeline | None], PostProcessOutput]
    aliases: tuple[str, ...] = ()
    description: str = ""
    needs_model: bool = False
