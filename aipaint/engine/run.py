"""One generation of a CLIP-conditioned latent diffusion model, read as numbered steps.

:func:`generate` is the only place that runs a latent model: txt2img, img2img, inpainting,
outpainting, hires fix's latent pass, Stable unCLIP's variations and blends, and the refiner
hand-off all come through it. What differs between them is a :class:`aipaint.engine.modes.Mode`
(how the loop starts and how the picture is finished) and the loop contributors that
adapters and the family add.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from aipaint.engine.activation import activate_adapters, adapter_defaults
from aipaint.engine.conditioning import conditioning_schedule, parse_prompts
from aipaint.engine.loop import DenoiseJob, ModelHandoff, denoise
from aipaint.engine.modes import Mode, mode_for
from aipaint.engine.noise import request_noise
from aipaint.engine.preview import to_pictures
from aipaint.engine.record import make_result, refiner_model
from aipaint.errors import InvalidParameter

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.api.result import Result
    from aipaint.engine.preview import StepPreview
    from aipaint.models.latent import LatentDiffusionModel
    from aipaint.plugin.host import PluginHost
    from aipaint.prompt import ParsedPrompt

Progress = Callable[[int, int], None]
"""``progress(steps_done, total_steps)``, called after every step."""
Preview = Callable[["StepPreview"], None]
"""``preview(step)``, called after every step with the model's current estimate of the picture."""


def make_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image: item i of a batch uses seed + i."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def scheduler_generator(generators: list[torch.Generator]) -> torch.Generator | list[torch.Generator]:
    """The ``generator`` argument of a diffusers scheduler's ``step`` for a batch: a single
    image's generator alone (as diffusers' own pipelines pass it), else one per image."""
    return generators if len(generators) > 1 else generators[0]


def generate(
    model: LatentDiffusionModel,
    request: GenerationRequest,
    *,
    host: PluginHost,
    progress: Progress | None = None,
    preview: Preview | None = None,
    mode: Mode | None = None,
    decode: bool = True,
) -> Result:
    """Run ``request`` on ``model``. ``mode`` defaults to the one the request asks for;
    ``decode=False`` returns the final latents only (``Result.latents``, no images)."""
    started = time.perf_counter()
    mode = mode or mode_for(request)
    # 1. Settle the request: the mode's defaults, the model's, a fixed seed; check the names.
    request = settle(model, request, host=host, mode=mode)
    sampler = host.registry.samplers.get(request.sampler)
    factor = model.vae_scale_factor
    run = mode.run_request(request)  # the plan may be longer than the steps asked for
    # 2. Parse the prompts once.
    parsed, negative = parse_prompts(request, stacklevel=4)
    # 3. The sampler's plan over the model's own noise schedule, and one generator per image.
    plan = sampler.plan(model.request_sampling_config(run), run.schedule, run.steps, device=model.device, seeds=run.seeds)
    generators = make_generators(run.seeds)
    shape = (model.latent_channels, run.height // factor, run.width // factor)
    refiner = refiner_model(run.refiner) if run.refiner is not None else None
    with job_scope(model, refiner) as stack:
        # 4. Adapters join (weight patches, added tokens), for this job only.
        active = activate_adapters(model, run, parsed, host, stack)
        # 5. Encode the prompts now, so the conditioning sees the patched text encoder.
        conditioning_at = conditioning_schedule(model, parsed, negative, run, active.rewrite())
        # 6. What the family adds (e.g. Stable unCLIP's image embedding), then the seed's noise,
        #    then the mode's start: the order each image's generator is drawn in.
        family_contributors, family_info = model.job_contributors(run, prompt=parsed, generators=generators)
        noise = request_noise(run, shape, generators, factor)
        start = mode.begin(model, run, plan, noise)
        contributors = [*active.contributors, *family_contributors, *start.contributors]
        timings = {"prepare": time.perf_counter() - started}
        # 7. Denoise the remaining steps (the refiner takes over at its switch point).
        latents = start.latents
        if start.first_step < plan.total_steps:
            job = DenoiseJob(
                model=model,
                plan=plan,
                conditioning_at=conditioning_at,
                cfg_scale=float(run.cfg_scale),
                guidance_rescale=float(run.guidance_rescale or 0.0),
                skip_early_cfg=float(run.skip_early_cfg),
                contributors=contributors,
                handoff=refiner_handoff(model, refiner, parsed, negative, run) if refiner is not None else None,
            )
            latents = denoise(job, latents, generators, start=start.first_step, progress=progress, preview=preview)
        timings["denoise"] = time.perf_counter() - started - timings["prepare"]
        # 8. Decode, and let the mode finish the pictures (inpainting's overlay, outpainting's crop).
        images: list[Any] = []
        if decode:
            with torch.inference_mode():
                images = mode.finish(to_pictures(model.decode(latents)))
    timings["decode"] = time.perf_counter() - started - timings["prepare"] - timings["denoise"]
    timings["total"] = time.perf_counter() - started
    # 9. Record what was done: seeds, A1111 parameters, timings.
    infotext = {**active.infotext, **family_info, **mode.infotext(request)}
    return make_result(model, host, mode.recorded(request), images, infotext, timings, latents=latents)


def settle(model: LatentDiffusionModel, request: GenerationRequest, *, host: PluginHost,
           mode: Mode | None = None) -> GenerationRequest:
    """``request`` as it will run on ``model``: the mode's defaults (an image's size, img2img's
    strength), the model's (size, steps, sampler, CFG), a fixed seed; sampler, schedule and
    size checked. What a user interface shows before it generates."""
    mode = mode or mode_for(request)
    request = mode.settle(request, model)
    asked = adapter_defaults(model, request, host)  # a few-step LoRA's sampler, steps, CFG
    if asked:
        request = dataclasses.replace(request, **asked)
    request = request.with_defaults(model.defaults).with_seed()
    schedule = host.registry.samplers.get(request.sampler).check_schedule(request.schedule)
    if schedule != request.schedule:  # as A1111 labels it ("sgm_uniform" from its API → "SGM Uniform")
        request = dataclasses.replace(request, schedule=schedule)
    factor = model.vae_scale_factor
    if request.width % factor or request.height % factor:
        raise InvalidParameter("size", f"{request.width}x{request.height}", f"must be a multiple of {factor} for this model")
    return request


def refiner_handoff(
    model: LatentDiffusionModel, refiner: LatentDiffusionModel, parsed: ParsedPrompt, negative: ParsedPrompt,
    request: GenerationRequest,
) -> ModelHandoff | None:
    """The refiner's part of the loop: the steps whose timestep lies below the switch point
    (diffusers' ``denoising_end``/``denoising_start`` and A1111 cut at the same timestep)."""
    if (refiner.latent_channels, refiner.vae_scale_factor, refiner.scaling_factor) != (
        model.latent_channels, model.vae_scale_factor, model.scaling_factor
    ):
        raise InvalidParameter("refiner", refiner.name, f"must share the latent space of {model.name!r} (channels, VAE factor, scaling)")
    if request.refiner_switch_at >= 1.0:
        return None
    train_steps = int(model.scheduler_config.get("num_train_timesteps", 1000))
    cutoff = int(round(train_steps * (1.0 - request.refiner_switch_at)))
    return ModelHandoff(refiner, conditioning_schedule(refiner, parsed, negative, request), cutoff)


@contextmanager
def job_scope(*models: LatentDiffusionModel | None) -> Iterator[ExitStack]:
    """Hold the job lock of every model the job uses, and an exit stack for what the job changes.

    Adapters patch the loaded model in place (LoRA weights, added tokens, attention
    processors) and restore it when the stack closes. Holding the model's lock for the whole
    job means a second job on the same loaded model (another thread, another server request)
    waits and then sees the model exactly as loaded. A lock rather than a patched clone:
    a clone doubles the memory of a multi-GB UNet, and one device runs one job at a time
    anyway. Locks are taken in a fixed order, so a job whose refiner is another job's main
    model cannot deadlock with it.
    """
    unique = {id(m): m for m in models if m is not None}
    locks: list[threading.RLock] = [job_lock(unique[key]) for key in sorted(unique)]
    asked = [n for m in unique.values() if (n := getattr(m, "intra_op_threads", None))]
    with ExitStack() as outer:
        for lock in locks:
            outer.enter_context(lock)
        outer.enter_context(intra_op_threads(max(asked) if asked else None))
        with ExitStack() as stack:
            yield stack


_threads_guard = threading.Lock()
_threads_asked: list[int] = []
_threads_before: list[int] = []


@contextmanager
def intra_op_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads (``None``: leave them as they are), then
    put back the count from before. A runtime asks for a count through ``model.intra_op_threads``
    (the torch runtime's ``threads`` option: one thread for tiny models, whose operations are too
    small to share between cores). Jobs that overlap in other threads get the largest count any
    of them asked for, and the count from before the first of them comes back after the last."""
    if not count:
        yield
        return
    with _threads_guard:
        if not _threads_asked:
            _threads_before[:] = [torch.get_num_threads()]
        _threads_asked.append(count)
        torch.set_num_threads(max(_threads_asked))
    try:
        yield
    finally:
        with _threads_guard:
            _threads_asked.remove(count)
            torch.set_num_threads(max(_threads_asked) if _threads_asked else _threads_before[0])


_locks_guard = threading.Lock()


def job_lock(model: Any) -> threading.RLock:
    """The lock that scopes jobs on ``model`` (re-entrant: a post-processor may run a job inside a job)."""
    with _locks_guard:
        lock = getattr(model, "_job_lock", None)
        if lock is None:
            lock = threading.RLock()
            model._job_lock = lock
        return lock
