"""SDXL's typed request options (light: imported when plugins register)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aipaint.api.options import OptionGroup
from aipaint.errors import InvalidParameter

AESTHETIC_SCORE = 6.0  # diffusers' and A1111's defaults for the refiner
NEGATIVE_AESTHETIC_SCORE = 2.5


@dataclass(frozen=True)
class SDXLOptions(OptionGroup):
    """SDXL's micro-conditioning: the crop it was told the picture has, and (the refiner's) aesthetic scores."""

    namespace: ClassVar[str] = "sdxl"
    description: ClassVar[str] = "SDXL micro-conditioning: crop offsets and the refiner's aesthetic scores"
    crop_top: int = 0
    crop_left: int = 0
    aesthetic_score: float = AESTHETIC_SCORE
    negative_aesthetic_score: float = NEGATIVE_AESTHETIC_SCORE

    def __post_init__(self) -> None:
        for name in ("crop_top", "crop_left"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096:
                raise InvalidParameter(f"sdxl.{name}", value, "must be a whole number of pixels from 0 to 4096")
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
                raise InvalidParameter(f"sdxl.{name}", value, "must be a number from 0 to 10")
