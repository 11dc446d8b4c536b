"""Sampling plans: one sampler run over a model's noise schedule (imports torch)."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aipaint.engine.schedules import SCHEDULES

if TYPE_CHECKING:
    from aipaint.engine.samplers import SamplerSpec
from aipaint.errors import PluginError

ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
"""``model_fn(scaled_latents, timestep, step_index) -> raw model output`` (eps or v)."""

StepCallback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]
"""``callback(step_index, total_steps, latents)`` after each step; may return replacement latents."""


def _init_keys(cls: Any) -> set[str]:
    # Some schedulers' __init__ is wrapped by a decorator; read the real signature.
    return set(inspect.signature(inspect.unwrap(cls.__init__)).parameters) - {"self"}


def zero_snr_betas(config: dict[str, Any]) -> list[float]:
    """The betas of a zero-terminal-SNR schedule, with the last step's SNR set to 2**-24.

    Schedulers that cannot rescale betas themselves get these as ``trained_betas``,
    so every sampler sees the schedule the model was trained with (the same clamp
    diffusers' Euler scheduler applies to keep the first sigma finite).
    """
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    ddpm = DDPMScheduler.from_config({k: config[k] for k in keys if k in config})
    alphas_cumprod = ddpm.alphas_cumprod.double().clone()
    alphas_cumprod[-1] = 2**-24
    alphas = alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return (1 - alphas).tolist()


def scheduler_class(cls: Any) -> Any:
    if isinstance(cls, str):
        import diffusers

        return getattr(diffusers, cls)
    return cls


def _make_scheduler(cls: Any, scheduler_config: dict[str, Any], options: dict[str, Any], seeds: Sequence[int] = ()) -> Any:
    cls = scheduler_class(cls)
    keys = _init_keys(cls)
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_") and k in keys}
    if scheduler_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in keys:
        config["trained_betas"] = zero_snr_betas(scheduler_config)
    if "noise_sampler_seed" in keys and seeds:
        # Seeded Brownian noise (DPM++ SDE); otherwise the scheduler picks a random seed.
        config["noise_sampler_seed"] = list(seeds) if len(seeds) > 1 else int(seeds[0])
    if "clip_sample" in keys and "clip_sample" not in config:
        # Latents are not bounded to [-1, 1]: latent models never clip x0 (SD's own configs say so),
        # but DDIM-style schedulers default to clipping when the model's config does not mention it.
        config["clip_sample"] = False
    refused = sorted(k for k in options if k not in keys)
    if refused:
        raise PluginError(
            f"{cls.__name__} does not accept the option(s) {', '.join(refused)}, which the sampler's "
            "scheduler_options or schedule type ask for; the sampler plugin must not offer a schedule type "
            "or option its scheduler lacks"
        )
    config.update(options)
    return cls.from_config(config)


class SamplingPlan:
    """One sampler run over ``steps`` steps: initial noise scaling, img2img noising, the loop."""

    total_steps: int

    def start_index(self, strength: float) -> int:
        """First step to run for img2img at ``strength`` (1.0 = all steps)."""
        raise NotImplementedError

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def noised_latents(self, clean: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
        """``clean`` latents noised to the level a run starting at step ``start`` begins at (img2img)."""
        raise NotImplementedError

    def noised_after(self, clean: torch.Tensor, noise: torch.Tensor, start: int, done: int) -> torch.Tensor:
        """``clean`` noised to the level the loop's latents have after ``done`` callbacks of a
        run that started at ``start``; ``clean`` itself once the run is over (inpaint blending)."""
        raise NotImplementedError

    def run(
        self,
        model_fn: ModelFn,
        latents: torch.Tensor,
        generators: Sequence[torch.Generator],
        start: int = 0,
        callback: StepCallback | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class SchedulerPlan(SamplingPlan):
    def __init__(
        self, spec: SamplerSpec, scheduler_config: dict[str, Any], schedule: str, steps: int, device: Any, seeds: Sequence[int]
    ) -> None:
        options = dict(spec.scheduler_options)
        options.update(SCHEDULES[schedule])
        self.scheduler = _make_scheduler(spec.scheduler_class, scheduler_config, options, seeds)
        self.scheduler.set_timesteps(steps, device=device)
        # add_noise of index-based schedulers reads the step index the loop advances; a copy
        # that never steps maps each timestep to its own noise level, whenever it is asked.
        self._noiser = copy.deepcopy(self.scheduler)
        self.steps = steps
        self.order = getattr(self.scheduler, "order", 1)
        self.total_steps = steps

    def start_index(self, strength: float) -> int:
        init_timestep = min(int(self.steps * strength), self.steps)
        return max(self.steps - init_timestep, 0)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.scheduler.init_noise_sigma

    def noised_latents(self, clean: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
        return self.noised_after(clean, noise, start, 0)

    def noised_after(self, clean: torch.Tensor, noise: torch.Tensor, start: int, done: int) -> torch.Tensor:
        timesteps = self._noiser.timesteps
        index = start * self.order + done
        if index >= len(timesteps):
            return clean
        t = timesteps[index : index + 1].repeat(clean.shape[0])
        return self._noiser.add_noise(clean, noise.to(clean), t.to(clean.device))

    def run(self, model_fn, latents, generators, start=0, callback=None):
        scheduler = self.scheduler
        timesteps = scheduler.timesteps[start * self.order :]
        if start and hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start * self.order)
        generator = list(generators) if len(generators) > 1 else (generators[0] if generators else None)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        n = len(timesteps)
        for i, t in enumerate(timesteps):
            # Second-order schedulers call the model more than once per step.
            step_index = start + (i * (self.steps - start)) // n
            # Flow-matching schedulers (FlowPlan) have no input scaling.
            scaled = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
            output = model_fn(scaled, t, min(step_index, self.steps - 1))
            latents = scheduler.step(output, t, latents, return_dict=False, **step_kwargs)[0]
            if callback is not None:
                replaced = callback(i, n, latents)
                if replaced is not None:
                    latents = replaced
        return latents


class FlowPlan(SchedulerPlan):
    """A scheduler sampler's flow-matching form (``SamplerSpec.flow_scheduler_class``) over a
    flow-matching model's sigmas: ``x_t = (1 - sigma) x0 + sigma noise``, timestep ``sigma * N``.

    The model's config gives the shift: a fixed ``shift`` (SD 3), or dynamic shifting with the
    ``mu`` the family computed for the image size (FLUX; ``LatentDiffusionModel.sampling_config``).
    A config with ``linear_sigmas`` spaces the unshifted sigmas ``linspace(1, 1/steps, steps)``
    (FLUX's pipelines) for schedulers whose ``set_timesteps`` takes ``sigmas``.
    Schedulers that cannot shift dynamically get the equal fixed shift ``exp(mu)``.
    """

    def __init__(
        self, spec: SamplerSpec, scheduler_config: dict[str, Any], schedule: str, steps: int, device: Any, seeds: Sequence[int]
    ) -> None:
        import math

        cls = scheduler_class(spec.flow_scheduler_class)
        keys = _init_keys(cls)
        options = dict(spec.flow_options)
        options.update(SCHEDULES[schedule])
        unsupported = sorted(k for k in SCHEDULES[schedule] if k not in keys)
        # DPM-Solver's and UniPC's Karras/exponential spacing ignores use_flow_sigmas (it yields
        # variance-exploding sigmas): their flow form has the shifted flow spacing only.
        if unsupported or (SCHEDULES[schedule] and "use_flow_sigmas" in keys):
            from aipaint.errors import InvalidParameter

            raise InvalidParameter("schedule", schedule, f"sampler {spec.name!r} has no {schedule} form for flow-matching models")
        mu = scheduler_config.get("mu")
        shift = float(scheduler_config.get("shift", 1.0))
        dynamic = bool(scheduler_config.get("use_dynamic_shifting")) and mu is not None
        set_kwargs: dict[str, Any] = {}
        config = {k: v for k, v in scheduler_config.items() if k != "mu"}
        takes_mu = "mu" in inspect.signature(cls.set_timesteps).parameters and "use_dynamic_shifting" in keys
        if dynamic and takes_mu and "time_shift_type" in keys:
            set_kwargs["mu"] = float(mu)
        else:
            # exp(mu) as a fixed shift is the same exponential time shift.
            config["use_dynamic_shifting"] = False
            shift = math.exp(float(mu)) if dynamic else shift
            config["shift"] = shift
        if "use_flow_sigmas" in keys:  # DPM-Solver and UniPC step flow sigmas when told to
            config.update(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction")
        self.scheduler = _make_scheduler(cls, config, options, seeds)
        takes_sigmas = "sigmas" in inspect.signature(self.scheduler.set_timesteps).parameters
        if scheduler_config.get("linear_sigmas") and takes_sigmas and "use_flow_sigmas" not in keys:
            # Unshifted sigmas 1 … 1/steps, as diffusers' FLUX pipelines pass them (the scheduler's
            # own spacing ends at 1/num_train_timesteps instead).
            set_kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps).tolist()
        self.scheduler.set_timesteps(steps, device=device, **set_kwargs)
        self._train_steps = float(scheduler_config.get("num_train_timesteps", 1000))
        self.steps = steps
        self.order = getattr(self.scheduler, "order", 1)
        self.total_steps = steps

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise  # sigma 1 is pure noise

    def noised_after(self, clean: torch.Tensor, noise: torch.Tensor, start: int, done: int) -> torch.Tensor:
        timesteps = self.scheduler.timesteps
        index = start * self.order + done
        if index >= len(timesteps):
            return clean
        sigmas = getattr(self.scheduler, "sigmas", None)  # the sampler's own sigma at each timestep
        sigma = float(sigmas[index]) if sigmas is not None and len(sigmas) > index else float(timesteps[index]) / self._train_steps
        return (1.0 - sigma) * clean + sigma * noise.to(clean)


class FunctionPlan(SamplingPlan):
    """Adapts a k-diffusion-style function sampler to the model's discrete noise schedule."""

    def __init__(self, spec: SamplerSpec, scheduler_config: dict[str, Any], schedule: str, steps: int, device: Any) -> None:
        from diffusers import EulerDiscreteScheduler

        self.spec = spec
        self.steps = steps
        self.total_steps = steps
        options = dict(spec.scheduler_options)
        options.update(SCHEDULES[schedule])
        # Euler's scheduler computes sigmas (and their timesteps) for every schedule type.
        self.scheduler = _make_scheduler(EulerDiscreteScheduler, scheduler_config, options)
        self.scheduler.set_timesteps(steps, device=device)
        self.sigmas = self.scheduler.sigmas.to(torch.float32)  # length steps + 1, ends with 0
        self.timesteps = self.scheduler.timesteps
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        self.needs_unconditional = spec.needs_unconditional

    def start_index(self, strength: float) -> int:
        init_timestep = min(int(self.steps * strength), self.steps)
        return max(self.steps - init_timestep, 0)

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.sigmas[0]

    def noised_latents(self, clean: torch.Tensor, noise: torch.Tensor, start: int) -> torch.Tensor:
        return self.noised_after(clean, noise, start, 0)

    def noised_after(self, clean: torch.Tensor, noise: torch.Tensor, start: int, done: int) -> torch.Tensor:
        sigma = self.sigmas[min(start + done, len(self.sigmas) - 1)]  # the last sigma is 0: clean
        return clean + noise.to(clean) * sigma.to(clean)

    def run(self, model_fn, latents, generators, start=0, callback=None):
        sigmas = self.sigmas[start:].to(latents.device)
        timestep_of = {float(s): t for s, t in zip(self.sigmas[:-1].tolist(), self.timesteps, strict=True)}
        prediction_type = self.prediction_type
        # Every model call belongs to the step in progress: ``start`` plus the steps the sampler
        # has reported done. Matching the call's sigma against the schedule cannot tell a
        # midpoint from a step: DPM++ 2S a's midpoint is mathematically the next schedule sigma,
        # and equal to it in float only some of the time.
        done = 0

        def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            s = float(sigma)
            t = timestep_of.get(s)
            if t is None:  # a sampler's intermediate sigma (Heun-like): nearest timestep by log-sigma
                t = torch.as_tensor(float(self.scheduler._sigma_to_t(np.array(s), self._log_sigmas)))
            c_in = 1.0 / (s**2 + 1.0) ** 0.5
            out = model_fn(x * c_in, t, start + done)
            if self.needs_unconditional:
                # CFG++ samplers read the negative prompt's estimate (the loop leaves it on model_fn)
                negative = getattr(model_fn, "unconditional", None)
                denoiser.unconditional = to_x0(x, s, out if negative is None else negative)  # type: ignore[attr-defined]
            return to_x0(x, s, out)

        def to_x0(x: torch.Tensor, s: float, out: torch.Tensor) -> torch.Tensor:
            if prediction_type == "v_prediction":
                return x / (s**2 + 1.0) - out * s / (s**2 + 1.0) ** 0.5
            return x - out * s

        noise_sampler = make_noise_sampler(latents, generators)
        n = len(sigmas) - 1

        def step_callback(info: dict[str, Any]) -> None:
            nonlocal done
            done += 1
            if callback is not None:
                replaced = callback(info["i"], n, info["x"])
                if replaced is not None:  # function samplers keep x in a local: update it in place
                    info["x"].copy_(replaced)

        assert self.spec.function is not None
        latents = self.spec.function(denoiser, latents, sigmas, noise_sampler=noise_sampler, callback=step_callback)
        if done != n:
            raise PluginError(
                f"the function sampler {self.spec.name!r} reported {done} finished steps for a run of {n}; "
                "it must call callback once after each step (prompt editing, inpainting and progress rely on it)"
            )
        return latents

    @property
    def _log_sigmas(self) -> np.ndarray:
        alphas = self.scheduler.alphas_cumprod.double().numpy()
        return np.log(((1 - alphas) / alphas) ** 0.5)


def make_noise_sampler(like: torch.Tensor, generators: Sequence[torch.Generator]) -> Callable[[Any, Any], torch.Tensor]:
    """Per-item seeded noise, drawn on the CPU so CPU and GPU runs see the same numbers."""

    def noise_sampler(sigma: Any = None, sigma_next: Any = None) -> torch.Tensor:
        shape = like.shape[1:]
        parts = [torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(parts).to(device=like.device, dtype=like.dtype)

    return noise_sampler
