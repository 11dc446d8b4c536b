"""The generation request: one frozen dataclass, validated once.

Fields left as ``None`` take the loaded model's defaults (its zoo card), so the same
request works for a 32-pixel toy model and for SDXL. Ranges follow the AUTOMATIC1111
web UI.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

from aipaint.errors import InvalidParameter

MAX_SEED = 2**32 - 1
SIZE_RANGE = (16, 4096)
STEPS_RANGE = (1, 1000)
CFG_RANGE = (1.0, 30.0)
BATCH_RANGE = (1, 64)
CLIP_SKIP_RANGE = (1, 12)
NORMALIZATIONS = ("a1111", "none")


def _check_range(name: str, value: Any, lo: float, hi: float, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise InvalidParameter(name, value, f"must be {'an integer' if kind is int else 'a number'} from {lo} to {hi}")
    if not lo <= value <= hi:
        raise InvalidParameter(name, value, f"must be from {lo} to {hi}")


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that decides an image. ``None`` means "the model's default"."""

    prompt: str
    negative_prompt: str = ""
    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    clip_skip: int = 1
    guidance_rescale: float | None = None
    emphasis: str = "a1111"
    adapters: tuple[Any, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise InvalidParameter("prompt", self.prompt, "must be a string")
        if not isinstance(self.negative_prompt, str):
            raise InvalidParameter("negative_prompt", self.negative_prompt, "must be a string")
        if self.steps is not None:
            _check_range("steps", self.steps, *STEPS_RANGE, int)
        if self.cfg_scale is not None:
            _check_range("cfg_scale", self.cfg_scale, *CFG_RANGE, float)
        if self.guidance_rescale is not None:
            _check_range("guidance_rescale", self.guidance_rescale, 0.0, 1.0, float)
        _check_range("seed", self.seed, -1, MAX_SEED, int)
        _check_range("batch_size", self.batch_size, *BATCH_RANGE, int)
        _check_range("clip_skip", self.clip_skip, *CLIP_SKIP_RANGE, int)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is None:
                continue
            _check_range(name, value, *SIZE_RANGE, int)
            if value % 8:
                lower, upper = value - value % 8, value - value % 8 + 8
                raise InvalidParameter(name, value, "must be a multiple of 8", f"try {lower} or {upper}")
        if self.emphasis not in NORMALIZATIONS:
            raise InvalidParameter("emphasis", self.emphasis, f"must be one of {', '.join(NORMALIZATIONS)}")
        for name in ("sampler", "schedule"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise InvalidParameter(name, value, "must be a non-empty name")

    def with_defaults(self, defaults: Any) -> GenerationRequest:
        """Fill ``None`` fields from a :class:`aipaint.model.ModelDefaults`."""
        fill = {
            name: getattr(defaults, name)
            for name in ("steps", "cfg_scale", "sampler", "schedule", "width", "height", "guidance_rescale")
            if getattr(self, name) is None
        }
        return dataclasses.replace(self, **fill)

    def with_seed(self) -> GenerationRequest:
        """Replace seed -1 by a random seed (so the result records the one used)."""
        if self.seed != -1:
            return self
        return dataclasses.replace(self, seed=random.randint(0, MAX_SEED - self.batch_size))

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size)]
