"""FLUX's typed request options (light: imported when plugins register)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from aipaint.api.options import OptionGroup
from aipaint.api.request import check_range

DISTILLED_CFG_SCALE = 3.5  # FLUX.1 dev's default, in diffusers (guidance_scale) and Forge
INFOTEXT_KEY = "Distilled CFG Scale"  # Forge's name in the PNG parameters


@dataclass(frozen=True)
class FluxOptions(OptionGroup):
    """FLUX.1 dev's distilled guidance: a number the transformer takes as an input (its
    ``guidance`` embedding), not classifier-free guidance. None means the default, 3.5.
    FLUX.1 schnell has no guidance input: setting it there is refused."""

    namespace: ClassVar[str] = "flux"
    description: ClassVar[str] = "FLUX.1 dev's distilled guidance (Forge's 'Distilled CFG Scale'; default 3.5)"
    distilled_cfg_scale: float | None = None
    # Forge's API sends its default, 3.5, with every job, for any model: that leaves the option unset.
    api_fields: ClassVar[dict[str, tuple[str, Any]]] = {"distilled_cfg_scale": ("distilled_cfg_scale", DISTILLED_CFG_SCALE)}

    def __post_init__(self) -> None:
        if self.distilled_cfg_scale is not None:
            check_range("flux.distilled_cfg_scale", self.distilled_cfg_scale, 0, 30, float)
