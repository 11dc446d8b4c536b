"""The built-in samplers, under the names the AUTOMATIC1111 web UI uses.

Most wrap diffusers schedulers; ``DPM++ 2S a`` (which diffusers lacks) is a
k-diffusion-style function sampler, and shows that kind of plugin. ``Euler CFG++`` and
``Euler a CFG++`` (Forge's names; ComfyUI's ``euler_cfg_pp`` and ``euler_ancestral_cfg_pp``)
are function samplers that also read the unconditional prediction.

Euler, Heun, DPM++ 2M (and its SDE form), UniPC and LCM also name their flow-matching form
(``flow_scheduler_class``), which flow-matching models (SD 3, FLUX) run.
"""

from __future__ import annotations

from collections.abc import Callable

from aipaint_plugins.samplers.functions import (
    sample_dpmpp_2s_ancestral,
    sample_euler_ancestral_cfg_pp,
    sample_euler_cfg_pp,
)

from aipaint import hookimpl
from aipaint.engine.samplers import SamplerSpec

ALL = ("Automatic", "Karras", "Exponential", "SGM Uniform")
AUTO = ("Automatic",)
UNIFORM = ("Automatic", "SGM Uniform")


def builtin_samplers() -> list[SamplerSpec]:
    def sched(name: str, cls: str, schedules: tuple[str, ...], options: dict | None = None, **kw) -> SamplerSpec:
        return SamplerSpec(
            name=name,
            kind="scheduler",
            scheduler_class=cls,
            scheduler_options=options or {},
            schedules=schedules,
            **kw,
        )

    return [
        sched("Euler", "EulerDiscreteScheduler", ALL, aliases=("euler", "k_euler"),
              flow_scheduler_class="FlowMatchEulerDiscreteScheduler"),
        sched("Euler a", "EulerAncestralDiscreteScheduler", UNIFORM, aliases=("euler_a", "euler ancestral", "k_euler_a"), stochastic=True),
        sched("LMS", "LMSDiscreteScheduler", ALL, aliases=("k_lms",)),
        sched("Heun", "HeunDiscreteScheduler", ALL, aliases=("k_heun",), flow_scheduler_class="FlowMatchHeunDiscreteScheduler"),
        sched("DPM2", "KDPM2DiscreteScheduler", ALL, aliases=("k_dpm_2",)),
        sched("DPM2 a", "KDPM2AncestralDiscreteScheduler", ALL, aliases=("k_dpm_2_a",), stochastic=True),
        sched("DPM++ 2M", "DPMSolverMultistepScheduler", ALL, aliases=("dpmpp_2m", "k_dpmpp_2m"),
              flow_scheduler_class="DPMSolverMultistepScheduler"),
        sched("DPM++ SDE", "DPMSolverSDEScheduler", ALL, aliases=("dpmpp_sde", "k_dpmpp_sde"), stochastic=True),
        sched(
            "DPM++ 2M SDE",
            "DPMSolverMultistepScheduler",
            ALL,
            {"algorithm_type": "sde-dpmsolver++"},
            aliases=("dpmpp_2m_sde", "k_dpmpp_2m_sde"),
            stochastic=True,
            flow_scheduler_class="DPMSolverMultistepScheduler",
            flow_options={"algorithm_type": "sde-dpmsolver++"},
        ),
        SamplerSpec(
            name="DPM++ 2S a",
            kind="function",
            function=sample_dpmpp_2s_ancestral,
            schedules=ALL,
            aliases=("dpmpp_2s_a", "k_dpmpp_2s_a"),
            stochastic=True,
            description="k-diffusion's DPM-Solver++(2S) ancestral",
        ),
        SamplerSpec(
            name="Euler CFG++",
            kind="function",
            function=sample_euler_cfg_pp,
            schedules=ALL,
            aliases=("euler_cfg_pp",),
            needs_unconditional=True,
            description="Euler with CFG++ (Chung et al. 2024): re-noised along the unconditional prediction; "
                        "use CFG scale about 0.5-2",
        ),
        SamplerSpec(
            name="Euler a CFG++",
            kind="function",
            function=sample_euler_ancestral_cfg_pp,
            schedules=ALL,
            aliases=("euler_ancestral_cfg_pp", "euler_a_cfg_pp"),
            stochastic=True,
            needs_unconditional=True,
            description="Euler ancestral with CFG++; use CFG scale about 0.5-2",
        ),
        sched("DDIM", "DDIMScheduler", UNIFORM, aliases=("ddim",)),
        sched("PLMS", "PNDMScheduler", AUTO, {"skip_prk_steps": True}, aliases=("plms", "pndm")),
        sched("UniPC", "UniPCMultistepScheduler", ALL, aliases=("unipc",), flow_scheduler_class="UniPCMultistepScheduler"),
        sched("LCM", "LCMScheduler", AUTO, aliases=("lcm",), flow_scheduler_class="FlowMatchLCMScheduler"),
    ]


def few_step_samplers() -> list[SamplerSpec]:
    """Samplers for few-step (distilled) models and LoRAs: ``TCD`` (diffusers' ``TCDScheduler``,
    Zheng et al. 2024, with its default gamma ``eta`` 0.3). ``LCM`` is among the built-ins above.
    Both pick their timesteps from the distillation's own skipping schedule
    (``original_inference_steps``), so only ``Automatic`` is offered."""
    return [
        SamplerSpec(
            name="TCD", kind="scheduler", scheduler_class="TCDScheduler", schedules=AUTO, aliases=("tcd",),
            stochastic=True, description="trajectory consistency distillation (for TCD LoRAs; 2-8 steps, CFG 1)",
        ),
    ]


@hookimpl
def register_samplers(register: Callable[[SamplerSpec], None]) -> None:
    for spec in builtin_samplers() + few_step_samplers():
        register(spec)
