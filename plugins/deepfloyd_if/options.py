"""DeepFloyd IF's own generation options (namespace ``if``), importable without torch.

Stage I takes the core request's ``steps``, ``cfg_scale``, ``width`` and ``height``; the
later stages take these::

    pipe.txt2img("a corgi", steps=50, options={"if": {"stage2_steps": 30, "stage2_noise_level": 250}})
    aipaint generate "a corgi" -m IF-I-XL-v1.0 --option if.stage2_steps=30

``None`` takes the stage's default (the zoo card's ``stage_defaults``, else DeepFloyd's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from aipaint.api.options import OptionGroup
from aipaint.api.request import CFG_RANGE, STEPS_RANGE, check_range

MAX_STAGES = 3
NOISE_LEVEL_RANGE = (0, 999)  # the DDPM noising schedule's timesteps


@dataclass(frozen=True)
class IFOptions(OptionGroup):
    """How many stages to run, and the settings of stage II (×4 super-resolution) and stage III (×4 upscaler)."""

    namespace: ClassVar[str] = "if"
    description: ClassVar[str] = "DeepFloyd IF: stages to run; steps, CFG scale and noise level of stages II and III"

    stages: int | None = None
    stage2_steps: int | None = None
    stage2_cfg_scale: float | None = None
    stage2_noise_level: int | None = None
    stage3_steps: int | None = None
    stage3_cfg_scale: float | None = None
    stage3_noise_level: int | None = None

    def __post_init__(self) -> None:
        if self.stages is not None:
            check_range("if.stages", self.stages, 1, MAX_STAGES, int)
        for stage in (2, 3):
            for name, (lo, hi), kind in (("steps", STEPS_RANGE, int), ("cfg_scale", CFG_RANGE, float),
                                         ("noise_level", NOISE_LEVEL_RANGE, int)):
                value = getattr(self, f"stage{stage}_{name}")
                if value is not None:
                    check_range(f"if.stage{stage}_{name}", value, lo, hi, kind)

    def stage_setting(self, stage: int, name: str) -> int | float | None:
        """The setting ``name`` (steps, cfg_scale, noise_level) of stage ``stage`` (2 or 3)."""
        return getattr(self, f"stage{stage}_{name}")
