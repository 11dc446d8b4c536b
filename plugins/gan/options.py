"""The GAN's own generation option (namespace ``gan``), importable without torch::

    pipe.txt2img("a red circle", options={"gan": {"truncation": 0.5}})
    aipaint generate "a red circle" -m my-gan/ --option gan.truncation=0.5
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aipaint.api.options import OptionGroup
from aipaint.api.request import check_range
from aipaint.errors import InvalidParameter

TRUNCATION_RANGE = (0.0, 4.0)


@dataclass(frozen=True)
class GANOptions(OptionGroup):
    """How far from the centre of its noise distribution the generator samples: the noise vector is
    multiplied by ``truncation`` (1 = as trained; lower = more typical pictures, less variety)."""

    namespace: ClassVar[str] = "gan"
    description: ClassVar[str] = "GAN: truncation (scale of the noise vector; below 1 trades variety for typical pictures)"

    truncation: float = 1.0

    def __post_init__(self) -> None:
        check_range("gan.truncation", self.truncation, *TRUNCATION_RANGE, float)
        if self.truncation <= 0.0:
            raise InvalidParameter("gan.truncation", self.truncation, "must be above 0 and at most 4")
