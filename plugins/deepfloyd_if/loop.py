"""The DeepFloyd IF loop: a pixel-space cascade, run stage by stage from one core request.

1. Encode the prompt and the negative prompt with T5 (lower-cased, 77 tokens, as IF was trained).
2. Stage I: denoise 64×64 pixels from the seed's noise, with classifier-free guidance on the
   noise half of the UNet's output (the other half is the learned variance the DDPM scheduler uses).
3. Stage II: upscale the result ×4 (bilinear), noise it to ``noise_level`` and denoise a new
   image conditioned on it (the noise level is the UNet's class label).
4. Stage III: Stable Diffusion's ×4 upscaler: the same idea in a VAE's latent space, with
   its own CLIP text encoder.

Stage I takes the request's ``steps``, ``cfg_scale``, ``width`` and ``height``; the later
stages take the ``if`` options (:class:`aipaint_plugins.deepfloyd_if.options.IFOptions`).
One CPU generator per image (the core's seeds, variation seed and seed resize for stage I's
noise) runs through all stages, so a seed fixes the whole cascade, and the numbers match
diffusers' IF pipelines given the same generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from aipaint_plugins.deepfloyd_if.options import IFOptions

from aipaint import __version__
from aipaint.api.result import Result
from aipaint.engine.noise import initial_noise, request_noise, seed_infotext
from aipaint.engine.preview import to_pictures
from aipaint.engine.run import job_scope, make_generators, scheduler_generator
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext, build_params
from aipaint.models.family import make_scheduler, refuse_unused

if TYPE_CHECKING:
    from aipaint_plugins.deepfloyd_if.model import IFCascade, IFStage

    from aipaint.api.request import GenerationRequest

Progress = Callable[[int, int], None]
Tick = Callable[[], None]
T5_MAX_LENGTH = 77  # IF's T5 was trained on 77 tokens
UNUSED_FIELDS = ("sampler", "schedule", "clip_skip", "guidance_rescale", "skip_early_cfg", "emphasis")
"""Request fields of the latent loop that IF's schedulers and T5 encoder have no use for."""


@dataclass(frozen=True)
class StageSettings:
    steps: int
    cfg_scale: float
    noise_level: int | None


def run_cascade(model: IFCascade, request: GenerationRequest, *, progress: Progress | None = None) -> Result:
    """Run ``request`` (checked by the pipeline: txt2img, typed options) through the cascade."""
    refuse_unused(model, request, UNUSED_FIELDS)
    options = request.option(IFOptions)
    stages = model.stages[: stage_count(model, options)]
    settings = [stage_settings(options, index, stage, request) for index, stage in enumerate(stages)]
    request = request.with_seed()
    width = request.width or stages[0].sample_size
    height = request.height or stages[0].sample_size
    total = sum(s.steps for s in settings)
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    generators = make_generators(request.seeds)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with job_scope(model), torch.inference_mode():
        # 1. T5 embeddings of the negative and the positive prompt.
        t5 = t5_embeddings(model, request)
        images: torch.Tensor | None = None
        for index, (stage, setting) in enumerate(zip(stages, settings, strict=True)):
            begun = time.perf_counter()
            if stage.kind == "base":
                channels = stage.unet.config.in_channels
                noise = request_noise(request, (channels, height, width), generators, 1)
                images = base(model, stage, setting, t5, noise, generators, tick)
            elif stage.kind == "super_resolution":
                assert images is not None
                factor = stage.sample_size // stages[0].sample_size
                height, width = height * factor, width * factor
                images = super_resolution(model, stage, setting, t5, images, (height, width), request.seeds, generators, tick)
            else:
                assert images is not None
                images = upscaler(model, stage, setting, request, images, generators, tick)
                height, width = images.shape[-2:]
            timings[f"stage{index + 1}"] = time.perf_counter() - begun
    timings["total"] = time.perf_counter() - started
    assert images is not None
    pictures = to_pictures((images.float() / 2 + 0.5).clamp(0, 1).cpu())
    return result(model, request, settings, pictures, timings)


# --- settings ------------------------------------------------------------------------------------
def stage_count(model: IFCascade, options: IFOptions) -> int:
    loaded = len(model.stages)
    if options.stages is None:
        return loaded
    if options.stages > loaded:
        raise InvalidParameter("if.stages", options.stages, f"must be from 1 to {loaded}: {model.name!r} has {loaded} "
                               "stage(s) loaded", "load stage II and III with stage2= and stage3=")
    return options.stages


def stage_settings(options: IFOptions, index: int, stage: IFStage, request: GenerationRequest) -> StageSettings:
    """Stage I's settings from the request, the others' from the ``if`` options; the stage's defaults fill the rest."""
    if index == 0:
        steps, cfg, noise_level = request.steps, request.cfg_scale, None
    else:
        steps, cfg, noise_level = (options.stage_setting(index + 1, name) for name in ("steps", "cfg_scale", "noise_level"))
        noise_level = noise_level if noise_level is not None else stage.defaults.noise_level
    if stage.max_noise_level is not None and noise_level is not None and noise_level > stage.max_noise_level:
        raise InvalidParameter(f"if.stage{index + 1}_noise_level", noise_level,
                               f"must be at most {stage.max_noise_level} for this upscaler")
    return StageSettings(int(steps or stage.defaults.steps), float(cfg if cfg is not None else stage.defaults.cfg_scale),
                         noise_level)


# --- stages --------------------------------------------------------------------------------------
def t5_embeddings(model: IFCascade, request: GenerationRequest) -> dict[str, torch.Tensor]:
    texts = [request.negative_prompt.lower().strip(), request.prompt.lower().strip()]
    tokens = model.tokenizer(
        texts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, add_special_tokens=True, return_tensors="pt"
    )
    device = model.device
    out = model.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
    negative, positive = out.to(model.dtype).chunk(2)
    batch = request.batch_size
    return {"negative": negative.repeat(batch, 1, 1), "positive": positive.repeat(batch, 1, 1)}


def guided_output(stage_out: torch.Tensor, cfg: float, channels: int) -> torch.Tensor:
    """CFG on the noise half of the output; the variance half is the text-conditioned one."""
    if cfg <= 1.0:
        return stage_out
    uncond, text = stage_out.chunk(2)
    uncond_eps = uncond[:, :channels]
    text_eps, variance = text[:, :channels], text[:, channels:]
    return torch.cat([uncond_eps + cfg * (text_eps - uncond_eps), variance], dim=1)


def pixel_loop(stage: IFStage, setting: StageSettings, t5: dict[str, torch.Tensor], x: torch.Tensor, scheduler: Any,
               generators: list[torch.Generator], tick: Tick, condition: torch.Tensor | None = None,
               class_labels: torch.Tensor | None = None) -> torch.Tensor:
    cfg = setting.cfg_scale
    guided = cfg > 1.0
    embeds = torch.cat([t5["negative"], t5["positive"]]) if guided else t5["positive"]
    labels = torch.cat([class_labels] * 2) if guided and class_labels is not None else class_labels
    channels = x.shape[1]
    learned = scheduler.config.get("variance_type") in ("learned", "learned_range")
    for t in scheduler.timesteps:
        model_input = x if condition is None else torch.cat([x, condition], dim=1)
        model_input = torch.cat([model_input] * 2) if guided else model_input
        model_input = scheduler.scale_model_input(model_input, t)
        out = stage.unet(model_input, t, encoder_hidden_states=embeds, class_labels=labels, return_dict=False)[0]
        out = guided_output(out, cfg, channels)
        if not learned:
            out = out[:, :channels]
        x = scheduler.step(out, t, x, generator=scheduler_generator(generators), return_dict=False)[0]
        tick()
    return x


def _timesteps(stage_config: dict[str, Any], steps: int) -> Any:
    scheduler = make_scheduler(stage_config)
    scheduler.set_timesteps(steps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)
    return scheduler


def base(model: IFCascade, stage: IFStage, setting: StageSettings, t5: dict[str, torch.Tensor], noise: torch.Tensor,
         generators: list[torch.Generator], tick: Tick) -> torch.Tensor:
    # 2. Stage I: pixels from the seed's noise.
    scheduler = _timesteps(stage.scheduler_config, setting.steps)
    x = (noise * scheduler.init_noise_sigma).to(model.device, model.dtype)
    return pixel_loop(stage, setting, t5, x, scheduler, generators, tick)


def super_resolution(model: IFCascade, stage: IFStage, setting: StageSettings, t5: dict[str, torch.Tensor],
                     low_res: torch.Tensor, size: tuple[int, int], seeds: list[int], generators: list[torch.Generator],
                     tick: Tick) -> torch.Tensor:
    # 3. Stage II: a new image at ×4, conditioned on the noised, upscaled stage I image.
    import torch.nn.functional as F

    scheduler = _timesteps(stage.scheduler_config, setting.steps)
    channels = stage.unet.config.in_channels // 2
    device, dtype = model.device, model.dtype
    x = (initial_noise(seeds, (channels, *size), generators) * scheduler.init_noise_sigma).to(device, dtype)
    upscaled = F.interpolate(low_res.to(device, dtype), size, mode="bilinear", align_corners=True)
    level = torch.tensor([setting.noise_level] * upscaled.shape[0], device=device)
    noise = initial_noise(seeds, upscaled.shape[1:], generators).to(device, dtype)
    upscaled = make_scheduler(stage.noise_scheduler_config).add_noise(upscaled, noise, timesteps=level)
    return pixel_loop(stage, setting, t5, x, scheduler, generators, tick, condition=upscaled, class_labels=level)


def upscaler(model: IFCascade, stage: IFStage, setting: StageSettings, request: GenerationRequest, low_res: torch.Tensor,
             generators: list[torch.Generator], tick: Tick) -> torch.Tensor:
    # 4. Stage III: Stable Diffusion's x4 upscaler, in latent space, with CLIP text.
    from aipaint.prompt import PromptEncoder

    device, dtype = model.device, model.dtype
    cfg = setting.cfg_scale
    guided = cfg > 1.0
    encoder = PromptEncoder(stage.tokenizer, stage.text_encoder)
    positive, negative = encoder.encode_pair(request.prompt, request.negative_prompt)
    batch = low_res.shape[0]
    embeds = positive.repeat(batch, 1, 1)
    if guided:
        embeds = torch.cat([negative.repeat(batch, 1, 1), embeds])
    scheduler = make_scheduler(stage.scheduler_config)
    scheduler.set_timesteps(setting.steps)
    level = torch.tensor([setting.noise_level], dtype=torch.long, device=device)
    noise = initial_noise(request.seeds, low_res.shape[1:], generators).to(device, dtype)
    image = make_scheduler(stage.noise_scheduler_config).add_noise(low_res.to(device, dtype), noise, level)
    image = torch.cat([image] * (2 if guided else 1))
    labels = torch.cat([level] * image.shape[0])
    latents_shape = (stage.vae.config.latent_channels, *image.shape[-2:])
    latents = (initial_noise(request.seeds, latents_shape, generators) * scheduler.init_noise_sigma).to(device, dtype)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = torch.cat([scheduler.scale_model_input(model_input, t), image], dim=1)
        out = stage.unet(model_input, t, encoder_hidden_states=embeds.to(dtype), class_labels=labels, return_dict=False)[0]
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + cfg * (text - uncond)
        latents = scheduler.step(out, t, latents, generator=scheduler_generator(generators), return_dict=False)[0]
        tick()
    return stage.vae.decode(latents / stage.vae.config.scaling_factor, return_dict=False)[0]


# --- result --------------------------------------------------------------------------------------
def result(model: IFCascade, request: GenerationRequest, settings: list[StageSettings], pictures: list[Any],
           timings: dict[str, float]) -> Result:
    width, height = pictures[0].size
    infotexts = []
    for seed in request.seeds:
        values: dict[str, Any] = {
            "Steps": settings[0].steps,
            "CFG scale": settings[0].cfg_scale,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": model.name,
            **seed_infotext(request, seed),
            "Stages": len(settings),
        }
        for index, setting in enumerate(settings[1:], start=2):
            values[f"Stage {index} steps"] = setting.steps
            values[f"Stage {index} CFG scale"] = setting.cfg_scale
            values[f"Stage {index} noise level"] = setting.noise_level
        values["Version"] = f"aipaint {__version__}"
        infotexts.append(Infotext(request.prompt, request.negative_prompt, build_params(values)).to_text())
    return Result(images=pictures, seeds=request.seeds, infotexts=infotexts, request=request, timings=timings)
