"""The denoise loop for CLIP-conditioned latent models, and the seams adapters use.

One function, read as numbered steps. Samplers decide *how* to step (see
:mod:`aipaint.engine.samplers`); this module decides *what* the model is asked at each step:
which conditioning is in force (prompt editing, alternation, ``AND``), classifier-free
guidance, and what adapters add (:class:`LoopContributor`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from aipaint.engine.plans import SamplingPlan
from aipaint.models.latent import Conditioning, LatentDiffusionModel


@dataclass
class StepConditioning:
    """The conditioning in force at one step: weighted positive parts and the negative."""

    positives: list[tuple[Conditioning, float]]
    negative: Conditioning


class LoopContributor:
    """Narrow seams through which adapters (ControlNet, inpainting, …) join the loop.

    Every method has a no-op default; override only what you need. Several
    contributors compose: inputs are transformed in order, extra UNet keyword
    arguments are merged (tensors with the same key are summed), and ``after_step``
    results are chained.
    """

    def before_call(self, step: int, guided: bool) -> None:
        """Told before each UNet call whether it carries the negative prompt's rows (first,
        one per batch item): False when CFG is off for the call (CFG scale 1, Skip Early CFG)."""

    def transform_input(self, step: int, latent_input: torch.Tensor) -> torch.Tensor:
        """Change the UNet's latent input (e.g. concatenate mask channels for 9-channel inpainting)."""
        return latent_input

    def unet_kwargs(
        self, step: int, latent_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor
    ) -> dict[str, Any]:
        """Extra keyword arguments for the UNet call (e.g. ControlNet residuals)."""
        return {}

    def guide(
        self, step: int, total: int, *, x: torch.Tensor, t: torch.Tensor, negative: torch.Tensor,
        positives: Sequence[torch.Tensor], weights: Sequence[float], cfg_scale: float,
    ) -> torch.Tensor | None:
        """Replace classifier-free guidance's combination at a guided step, or None to keep it.

        Called only at steps that carry the negative prompt (not at CFG scale 1 or in Skip Early
        CFG's steps). ``negative`` and ``positives`` are the model's float outputs (epsilon, v or
        sample, as ``model.prediction_type`` says) for the negative and each ``AND``-ed positive,
        with their ``weights``; ``x`` and ``t`` are the model's input latents (the
        variance-preserving x_t) and timestep, for methods that need the clean-latent estimate.
        ``step`` counts from the plan's first step; ``total`` is the plan's length. The standard
        combination is ``negative + sum(w * cfg_scale * (p - negative))``. The first contributor
        that returns a tensor (same shape as ``negative``) replaces it; guidance rescale is
        applied after, as usual."""
        return None

    def perturbed_pass(self, step: int, guided: bool, first_row: int) -> bool:
        """Whether this step's UNet call should also carry a copy of the positive rows for this
        contributor to perturb (perturbed-attention guidance and its kin), or False (default).

        The copy is appended after the usual rows, from row ``first_row`` on: one row per batch
        item for each ``AND``-ed part, in the positives' order. The contributor perturbs those
        rows itself (e.g. attention processors that read ``first_row``); their output comes back
        in :meth:`perturbed_guidance`. Asked of every call the first model makes (not after a
        refiner hand-off), whether CFG is on (``guided``) or not."""
        return False

    def perturbed_guidance(
        self, step: int, total: int, *, x: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
        positive: torch.Tensor, perturbed: torch.Tensor,
    ) -> torch.Tensor:
        """The step's output once the perturbed rows are known: ``output`` is the result so far
        (CFG's combination or :meth:`guide`'s, or the positive alone when CFG is off),
        ``positive`` and ``perturbed`` the weighted positive prediction without and with this
        contributor's perturbation. Guidance rescale is applied after. The default keeps ``output``."""
        return output

    def after_step(self, step: int, total: int, latents: torch.Tensor) -> torch.Tensor | None:
        """Return replacement latents after a sampler step (e.g. inpaint blending), or None."""
        return None


def _merge_kwargs(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in merged:
                merged[key] = value
            elif isinstance(value, torch.Tensor):
                merged[key] = merged[key] + value
            elif isinstance(value, (list, tuple)):
                merged[key] = [a + b for a, b in zip(merged[key], value, strict=True)]
            else:
                raise ValueError(f"two loop contributors both set UNet argument {key!r}")
    return merged


@dataclass
class ModelHandoff:
    """Another model that takes over the loop part-way (A1111's "Refiner switch at").

    From the first model call whose timestep is below ``below_timestep`` on, the loop asks
    ``model`` with its own ``conditioning_at``; the sampler and its state carry on, as in
    A1111. Contributors' input seams (extra channels, residuals) belong to the first model
    and are not applied after the switch; ``after_step`` still runs.
    """

    model: LatentDiffusionModel
    conditioning_at: Callable[[int], StepConditioning]
    below_timestep: float


@dataclass
class DenoiseJob:
    model: LatentDiffusionModel
    plan: SamplingPlan
    conditioning_at: Callable[[int], StepConditioning]
    cfg_scale: float
    guidance_rescale: float = 0.0
    # A1111's "Skip Early CFG": the first steps up to this fraction of the run are taken
    # on the positive prompt alone (no negative-prompt batch half, so they are also faster).
    skip_early_cfg: float = 0.0
    contributors: Sequence[LoopContributor] = field(default_factory=tuple)
    handoff: ModelHandoff | None = None


def rescale_guidance(guided: torch.Tensor, positive: torch.Tensor, factor: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, sec. 3.4), as diffusers implements it."""
    std_pos = positive.std(dim=list(range(1, positive.ndim)), keepdim=True)
    std_cfg = guided.std(dim=list(range(1, guided.ndim)), keepdim=True)
    rescaled = guided * (std_pos / std_cfg)
    return factor * rescaled + (1 - factor) * guided


def denoise(
    job: DenoiseJob,
    latents: torch.Tensor,
    generators: Sequence[torch.Generator],
    *,
    start: int = 0,
    progress: Callable[[int, int], None] | None = None,
    preview: Callable[[Any], None] | None = None,
) -> torch.Tensor:
    """Run the job's plan from step ``start``. ``progress(done, total)`` and ``preview(step)``
    (an :class:`aipaint.engine.preview.StepPreview` with the model's estimate of the finished
    latents) are called after every step."""
    contributors = list(job.contributors)
    estimate = None
    if preview is not None:
        from aipaint.engine.preview import X0Estimator

        estimate = X0Estimator(job.model.scheduler_config)
    latest_x0: list[torch.Tensor] = []
    batch = latents.shape[0]
    handoff = job.handoff
    run_steps = max(1, job.plan.total_steps - start)

    # CFG++ samplers read the negative prompt's prediction at every step, CFG scale 1 included.
    wants_unconditional = bool(getattr(job.plan, "needs_unconditional", False))

    def guided_at(step: int) -> bool:
        # As A1111: CFG is off while step / steps <= skip_early_cfg, counted over this run's steps.
        return (job.cfg_scale > 1.0 or wants_unconditional) and not (job.skip_early_cfg > 0 and (step - start) / run_steps <= job.skip_early_cfg)

    def model_fn(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        use_cfg = guided_at(step)
        # 1. The model and the conditioning in force at this step.
        switched = handoff is not None and float(t.max()) < handoff.below_timestep
        model, conditioning_at = (handoff.model, handoff.conditioning_at) if switched else (job.model, job.conditioning_at)
        inputs = [] if switched else contributors
        cond = conditioning_at(step)
        parts = ([cond.negative] if use_cfg else []) + [c for c, _ in cond.positives]
        weights = [w for _, w in cond.positives]
        n_parts = len(parts)
        # Contributors that compare the model with a perturbed copy of itself (PAG) get a copy
        # of the positive rows each, after the usual ones.
        perturbers: list[LoopContributor] = []
        for c in inputs:
            first_row = (n_parts + len(perturbers) * len(weights)) * batch
            if hasattr(c, "perturbed_pass") and c.perturbed_pass(step, use_cfg, first_row):
                perturbers.append(c)
        parts = parts + [p for _ in perturbers for p, _ in cond.positives]
        n_calls = len(parts)
        # 2. One batched UNet call: [negative, positive_1, …, perturbed copies …] × batch.
        x_in = torch.cat([x] * n_calls)
        for c in inputs:
            if hasattr(c, "before_call"):  # contributors written before this seam need not have it
                c.before_call(step, use_cfg)
        for c in inputs:
            x_in = c.transform_input(step, x_in)
        embeds = Conditioning.cat([p.repeat(batch) for p in parts])
        timestep = t.expand(x_in.shape[0]) if t.dim() else t
        extra = _merge_kwargs([c.unet_kwargs(step, x_in, timestep, embeds.embeds) for c in inputs])
        out = model.predict(x_in, t, embeds, **extra).float()
        chunks = out.chunk(n_calls)
        chunks, perturbed_chunks = chunks[:n_parts], chunks[n_parts:]

        def weighted(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
            return sum(w * o for w, o in zip(weights, outputs, strict=True)) / sum(weights)

        def add_perturbed(output: torch.Tensor) -> torch.Tensor:
            if not perturbers:
                return output
            positive = weighted(chunks[n_parts - len(weights):])
            for k, c in enumerate(perturbers):
                perturbed = weighted(perturbed_chunks[k * len(weights):(k + 1) * len(weights)])
                output = c.perturbed_guidance(step, job.plan.total_steps, x=x, t=t, output=output,
                                              positive=positive, perturbed=perturbed)
            return output

        # 3. Classifier-free guidance, composable across AND-ed sub-prompts.
        model_fn.unconditional = chunks[0] if use_cfg else None  # type: ignore[attr-defined]
        if not use_cfg:
            return remember_x0(x, t, add_perturbed(weighted(chunks)))
        negative, positives = chunks[0], chunks[1:]
        guided = None
        for c in contributors:
            if guided is None and hasattr(c, "guide"):  # contributors written before this seam need not have it
                guided = c.guide(step, job.plan.total_steps, x=x, t=t, negative=negative, positives=positives,
                                 weights=weights, cfg_scale=job.cfg_scale)
        if guided is None:
            guided = negative + sum(w * job.cfg_scale * (p - negative) for w, p in zip(weights, positives, strict=True))
        guided = add_perturbed(guided)
        if job.guidance_rescale > 0:
            positive = sum(w * p for w, p in zip(weights, positives, strict=True)) / sum(weights)
            guided = rescale_guidance(guided, positive, job.guidance_rescale)
        return remember_x0(x, t, guided).to(x.dtype)

    def remember_x0(x: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        if estimate is not None:
            latest_x0[:] = [estimate(x, t, output)]
        return output

    def step_callback(i: int, n: int, x: torch.Tensor) -> torch.Tensor | None:
        replaced = None
        for c in contributors:
            new = c.after_step(i, n, x if replaced is None else replaced)
            if new is not None:
                replaced = new
        if progress is not None:
            progress(i + 1, n)
        if preview is not None and latest_x0:
            from aipaint.engine.preview import StepPreview

            preview(StepPreview(i + 1, n, x if replaced is None else replaced, latest_x0[0], job.model))
        return replaced

    with torch.inference_mode():
        return job.plan.run(model_fn, latents, generators, start=start, callback=step_callback)
