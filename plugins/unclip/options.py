"""The unCLIP families' own generation options (namespace ``unclip``), importable without torch.

The core request gives the decoder's (Karlo) or the UNet's (Stable unCLIP) ``steps`` and
``cfg_scale``, and the image prompts of variations and blends; these are the rest::

    pipe.txt2img("a fox", options={"unclip": {"prior_steps": 25, "prior_cfg_scale": 4}})
    aipaint generate "a fox" -m karlo-v1-alpha --option unclip.super_res_steps=7

``None`` takes the model's default. ``super_res_steps`` is Karlo's only, ``noise_level``
Stable unCLIP's only; setting one for the other family is an error, not ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aipaint.api.options import OptionGroup
from aipaint.api.request import CFG_RANGE, STEPS_RANGE, check_range

MIN_UNCLIP_STEPS = 2  # unCLIP's scheduler spaces its timesteps over steps - 1 intervals: one step is undefined
NOISE_LEVEL_RANGE = (0, 999)  # the image-embedding noising schedule's timesteps (the model's own may be shorter)


@dataclass(frozen=True)
class UnCLIPOptions(OptionGroup):
    """The prior's steps and guidance (text to image), Karlo's super-resolution steps, and
    Stable unCLIP's image-embedding noise level (higher strays further from the image)."""

    namespace: ClassVar[str] = "unclip"
    description: ClassVar[str] = ("unCLIP: prior steps and CFG scale; Karlo's super-resolution steps; "
                                  "Stable unCLIP's image-embedding noise level")

    prior_steps: int | None = None
    prior_cfg_scale: float | None = None
    super_res_steps: int | None = None
    noise_level: int | None = None

    def __post_init__(self) -> None:
        for name in ("prior_steps", "super_res_steps"):
            if getattr(self, name) is not None:
                check_range(f"unclip.{name}", getattr(self, name), MIN_UNCLIP_STEPS, STEPS_RANGE[1], int)
        if self.prior_cfg_scale is not None:
            check_range("unclip.prior_cfg_scale", self.prior_cfg_scale, *CFG_RANGE, float)
        if self.noise_level is not None:
            check_range("unclip.noise_level", self.noise_level, *NOISE_LEVEL_RANGE, int)
