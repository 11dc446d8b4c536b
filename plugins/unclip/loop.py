"""The unCLIP loop (DALL·E 2 / Karlo): text → image embedding → pixels → super-resolution.

1. Encode the prompt with CLIP (pooled ``text_embeds`` and token states).
2. Prior: denoise a CLIP *image* embedding conditioned on the text (``txt2img``).
   Variations start instead from the CLIP image encoder's embedding of the request's image
   prompt, and a blend from the weighted spherical interpolation of 2-5 images' embeddings.
3. Decoder: denoise 64×64 pixels conditioned on the image embedding (projected to extra
   context tokens and added to the time embedding) and the text.
4. Super-resolution ×4 (two UNets: one for every step but the last, one for the last).

The core request gives the decoder's ``steps`` and ``cfg_scale``; the ``unclip`` options
(:class:`aipaint_plugins.unclip.options.UnCLIPOptions`) the prior's and super-resolution's.
One CPU generator per image runs through every stage, so a seed fixes the whole run (and the
numbers match diffusers' UnCLIP pipelines given the same generator).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from aipaint_plugins.unclip.options import MIN_UNCLIP_STEPS, UnCLIPOptions
from aipaint_plugins.unclip.shared import Tick, blend_weights, encode_prior_text, image_embedding, run_prior

from aipaint import __version__
from aipaint.api.request import STEPS_RANGE, check_range
from aipaint.api.result import Result
from aipaint.engine.noise import initial_noise
from aipaint.engine.preview import to_pictures
from aipaint.engine.run import job_scope, make_generators, scheduler_generator
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext, build_params
from aipaint.models.family import make_scheduler, refuse_unused

if TYPE_CHECKING:
    from aipaint_plugins.unclip.model import UnCLIPModel

    from aipaint.api.request import GenerationRequest

Progress = Callable[[int, int], None]
UNUSED_FIELDS = ("sampler", "schedule", "clip_skip", "guidance_rescale", "skip_early_cfg", "emphasis", "subseed_strength",
                 "seed_resize_from_w", "seed_resize_from_h")
"""Request fields of the latent loop that Karlo's own schedulers and fixed-size stages have no use for."""


@dataclass(frozen=True)
class Settings:
    prior_steps: int
    steps: int
    super_res_steps: int
    prior_cfg_scale: float
    cfg_scale: float


def settings_for(model: UnCLIPModel, request: GenerationRequest) -> Settings:
    """The run's settings, checked against what Karlo can do before any work."""
    refuse_unused(model, request, UNUSED_FIELDS)
    options = request.option(UnCLIPOptions)
    if options.noise_level is not None:
        raise InvalidParameter("unclip.noise_level", options.noise_level,
                               "is a Stable unCLIP option; Karlo's decoder takes no image-embedding noise level")
    size = model.defaults.width
    for name in ("width", "height"):
        if getattr(request, name) not in (None, size):
            raise InvalidParameter(name, getattr(request, name), f"must be {size}: {model.name!r} paints {size}x{size} only")
    if request.steps is not None:
        check_range("steps", request.steps, MIN_UNCLIP_STEPS, STEPS_RANGE[1], int)
    defaults = model.unclip_defaults
    return Settings(
        prior_steps=options.prior_steps or defaults.prior_steps,
        steps=request.steps or defaults.decoder_steps,
        super_res_steps=options.super_res_steps or defaults.super_res_steps,
        prior_cfg_scale=float(options.prior_cfg_scale if options.prior_cfg_scale is not None else defaults.prior_cfg_scale),
        cfg_scale=float(request.cfg_scale if request.cfg_scale is not None else defaults.decoder_cfg_scale),
    )


def run_unclip(model: UnCLIPModel, request: GenerationRequest, *, progress: Progress | None = None) -> Result:
    """Run ``request`` (checked by the pipeline: its mode is one the model can do, typed options)."""
    settings = settings_for(model, request)
    request = request.with_seed()
    text_mode = request.mode == "txt2img"
    total = (settings.prior_steps if text_mode else 0) + settings.steps + settings.super_res_steps
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    seeds = request.seeds
    generators = make_generators(seeds)
    batch = request.batch_size
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with job_scope(model), torch.inference_mode():
        # 1. Text: [negative, positive] when guiding (variations and blends take the empty text by default, as Karlo's do).
        guided = settings.cfg_scale > 1.0 or (text_mode and settings.prior_cfg_scale > 1.0)
        texts = [request.negative_prompt, request.prompt]
        text = encode_prior_text(model.tokenizer, model.text_encoder, texts, batch, guided, model.device)
        # 2. The image embedding: from the prior, or from the image prompts.
        if text_mode:
            embeddings = run_prior(model.prior, model.scheduler_configs["prior_scheduler"], text,
                                   steps=settings.prior_steps, cfg_scale=settings.prior_cfg_scale, guided=guided,
                                   seeds=seeds, generators=generators, tick=tick)
        else:
            embeddings = image_embedding(model.feature_extractor, model.image_encoder, request, model.device,
                                         model.dtype).repeat(batch, 1)
        timings["embedding"] = time.perf_counter() - started
        # 3. Decoder, then 4. super-resolution.
        small = decoder(model, embeddings, text, settings, guided, seeds, generators, tick)
        timings["decoder"] = time.perf_counter() - started - timings["embedding"]
        images = super_resolution(model, small, settings, seeds, generators, tick)
    timings["total"] = time.perf_counter() - started
    return result(model, request, settings, to_pictures((images.float() * 0.5 + 0.5).clamp(0, 1).cpu()), timings)


# --- stages ----------------------------------------------------------------------------------
def decoder(model: UnCLIPModel, embeddings: torch.Tensor, text: dict[str, torch.Tensor], settings: Settings, guided: bool,
            seeds: list[int], generators: list[torch.Generator], tick: Tick) -> torch.Tensor:
    import torch.nn.functional as F

    hidden, additive = model.text_proj(image_embeddings=embeddings, prompt_embeds=text["embeds"],
                                       text_encoder_hidden_states=text["hidden"], do_classifier_free_guidance=guided)
    mask = F.pad(text["mask"], (model.text_proj.clip_extra_context_tokens, 0), value=True)
    scheduler = make_scheduler(model.scheduler_configs["decoder_scheduler"])
    scheduler.set_timesteps(settings.steps, device=model.device)
    timesteps = scheduler.timesteps
    unet = model.decoder
    size = unet.config.sample_size
    channels = unet.config.in_channels
    x = (initial_noise(seeds, (channels, size, size), generators) * scheduler.init_noise_sigma).to(model.device, model.dtype)
    cfg = settings.cfg_scale
    for i, t in enumerate(timesteps):
        model_input = torch.cat([x] * 2) if guided else x
        out = unet(sample=model_input, timestep=t, encoder_hidden_states=hidden, class_labels=additive,
                   attention_mask=mask).sample
        if guided:
            uncond, cond = out.chunk(2)
            eps_uncond, eps_cond, variance = uncond[:, :channels], cond[:, :channels], cond[:, channels:]
            out = torch.cat([eps_uncond + cfg * (eps_cond - eps_uncond), variance], dim=1)
        previous = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = scheduler.step(out, t, x, prev_timestep=previous, generator=scheduler_generator(generators)).prev_sample
        tick()
    return x.clamp(-1, 1)


def super_resolution(model: UnCLIPModel, small: torch.Tensor, settings: Settings, seeds: list[int],
                     generators: list[torch.Generator], tick: Tick) -> torch.Tensor:
    import torch.nn.functional as F

    scheduler = make_scheduler(model.scheduler_configs["super_res_scheduler"])
    scheduler.set_timesteps(settings.super_res_steps, device=model.device)
    timesteps = scheduler.timesteps
    first, last = model.super_res_first, model.super_res_last
    size = first.config.sample_size
    channels = first.config.in_channels // 2
    x = (initial_noise(seeds, (channels, size, size), generators) * scheduler.init_noise_sigma).to(model.device, model.dtype)
    upscaled = F.interpolate(small, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    for i, t in enumerate(timesteps):
        unet = last if i == len(timesteps) - 1 else first
        out = unet(sample=torch.cat([x, upscaled], dim=1), timestep=t).sample
        previous = timesteps[i + 1] if i + 1 < len(timesteps) else None
        x = scheduler.step(out, t, x, prev_timestep=previous, generator=scheduler_generator(generators)).prev_sample
        tick()
    return x


# --- result ----------------------------------------------------------------------------------
def result(model: UnCLIPModel, request: GenerationRequest, settings: Settings, pictures: list[Any],
           timings: dict[str, float]) -> Result:
    width, height = pictures[0].size
    infotexts = []
    for seed in request.seeds:
        values: dict[str, Any] = {"Steps": settings.steps, "CFG scale": settings.cfg_scale, "Seed": seed,
                                  "Size": f"{width}x{height}", "Model": model.name, "unCLIP mode": request.mode}
        if request.mode == "txt2img":
            values["Prior steps"] = settings.prior_steps
            values["Prior CFG scale"] = settings.prior_cfg_scale
        values["Super-resolution steps"] = settings.super_res_steps
        if request.mode == "blend":
            values["Blend weights"] = " ".join(f"{w:g}" for w in blend_weights(request))
        values["Version"] = f"aipaint {__version__}"
        infotexts.append(Infotext(request.prompt, request.negative_prompt, build_params(values)).to_text())
    return Result(images=pictures, seeds=request.seeds, infotexts=infotexts, request=request, timings=timings)
