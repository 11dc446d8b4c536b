"""Samplers: the registration record and the one interface the denoise loop uses.

A plugin registers a :class:`SamplerSpec` of one of two kinds:

* ``scheduler``: a diffusers scheduler class (or its name in ``diffusers``, resolved
  when first used, so registering imports nothing heavy) plus config overrides. The model's own
  scheduler config (its noise schedule, prediction type, timestep spacing) is kept;
  the spec only chooses the algorithm.
* ``function``: a k-diffusion-style function ``fn(denoiser, x, sigmas, *, noise_sampler,
  callback) -> x`` where ``denoiser(x, sigma) -> x0``. The sigmas come from the model's
  noise schedule; eps/v-prediction differences are handled by the denoiser wrapper here,
  never inside the sampler.

Both become a :class:`aipaint.engine.plans.SamplingPlan` with the same methods.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aipaint.engine.schedules import SCHEDULES
from aipaint.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

    from aipaint.engine.plans import SamplingPlan





@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as registered by a plugin."""

    name: str
    kind: str  # "scheduler" or "function"
    scheduler_class: Any = None
    scheduler_options: dict[str, Any] = field(default_factory=dict)
    function: Callable[..., torch.Tensor] | None = None
    schedules: tuple[str, ...] = ("Automatic",)
    aliases: tuple[str, ...] = ()
    description: str = ""
    stochastic: bool = False
    # A function sampler that reads the unconditional (negative-prompt) prediction's clean-latent
    # estimate as ``denoiser.unconditional`` after each call (CFG++). The loop then asks the model
    # for the negative rows at every step, CFG scale 1 included.
    needs_unconditional: bool = False
    # The sampler's form for flow-matching models (SD 3, FLUX: x_t = (1 - sigma) x0 + sigma noise,
    # the network predicts the velocity noise - x0): a diffusers scheduler class (or its name)
    # that steps that parametrisation, and its options. ``None``: the sampler has no such form,
    # and asking a flow-matching model for it is an error that names the samplers that do.
    flow_scheduler_class: Any = None
    flow_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("scheduler", "function"):
            raise ValueError(f"sampler {self.name!r}: kind must be 'scheduler' or 'function', not {self.kind!r}")
        if self.kind == "scheduler" and self.scheduler_class is None:
            raise ValueError(f"sampler {self.name!r}: a scheduler sampler needs scheduler_class")
        if self.kind == "function" and self.function is None:
            raise ValueError(f"sampler {self.name!r}: a function sampler needs function")
        unknown = [s for s in self.schedules if s not in SCHEDULES]
        if unknown:
            raise ValueError(f"sampler {self.name!r}: unknown schedule types {unknown}; known: {list(SCHEDULES)}")

    def check_schedule(self, schedule: str) -> str:
        """The schedule type ``schedule`` names, as A1111 labels it ("SGM Uniform") or as its API
        names it ("sgm_uniform"): case, spaces, dashes and underscores do not matter."""
        def key(name: str) -> str:
            return "".join(ch for ch in name.lower() if ch not in " _-")

        for s in self.schedules:
            if key(s) == key(schedule):
                return s
        raise InvalidParameter("schedule", schedule, f"sampler {self.name!r} supports {', '.join(self.schedules)}")

    def plan(
        self,
        scheduler_config: dict[str, Any],
        schedule: str,
        steps: int,
        device: torch.device | str = "cpu",
        seeds: Sequence[int] = (),
    ) -> SamplingPlan:
        """A plan for ``steps`` steps over the model's noise schedule (``scheduler_config``)."""
        from aipaint.engine.plans import FlowPlan, FunctionPlan, SchedulerPlan

        schedule = self.check_schedule(schedule)
        if is_flow_config(scheduler_config):
            if self.flow_scheduler_class is None:
                raise InvalidParameter(
                    "sampler", self.name,
                    "it has no form for flow-matching models (SD 3, FLUX); `aipaint samplers` marks the samplers that do",
                )
            return FlowPlan(self, scheduler_config, schedule, steps, device, seeds)
        if self.kind == "scheduler":
            return SchedulerPlan(self, scheduler_config, schedule, steps, device, seeds)
        return FunctionPlan(self, scheduler_config, schedule, steps, device)


def is_flow_config(scheduler_config: dict[str, Any]) -> bool:
    """Whether a model's scheduler config is a flow-matching one (SD 3, FLUX): its scheduler is
    one of diffusers' ``FlowMatch…`` classes, or its prediction type says ``flow_prediction``."""
    name = str(scheduler_config.get("_class_name", ""))
    return name.startswith("FlowMatch") or scheduler_config.get("prediction_type") == "flow_prediction"
