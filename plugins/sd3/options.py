"""SD 3's typed request options (light: imported when plugins register)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aipaint.api.options import OptionGroup
from aipaint.api.request import check_range

INFOTEXT_KEY = "Shift"  # the flow shift, recorded when the request sets it


@dataclass(frozen=True)
class SD3Options(OptionGroup):
    """The flow-matching shift for this job (ComfyUI's ``ModelSamplingSD3``): how far the sigmas are
    pushed towards high noise, ``σ' = shift·σ / (1 + (shift − 1)·σ)``. None keeps the model's own
    (3.0 for SD 3 and 3.5); lower values spend more steps on detail, higher on composition."""

    namespace: ClassVar[str] = "sd3"
    description: ClassVar[str] = "SD 3's flow shift per job (ComfyUI's ModelSamplingSD3; default: the model's, 3.0)"
    shift: float | None = None

    def __post_init__(self) -> None:
        if self.shift is not None:
            check_range("sd3.shift", self.shift, 0.1, 20, float)
