"""The DeepFloyd IF loop: a pixel-space cascade, run stage by stage.

1. Encode the prompt and the negative prompt with T5 (lower-cased, 77 tokens, as IF was trained).
2. Stage I: denoise 64×64 pixels from noise, with classifier-free guidance on the noise half
   of the UNet's output (the other half is the learned variance the DDPM scheduler uses).
3. Stage II: upscale the result ×4 (bilinear), noise it to ``noise_level`` and denoise a new
   image conditioned on it (the noise level is the UNet's class label).
4. Stage III: Stable Diffusion's ×4 upscaler: the same idea in a VAE's latent space, with
   its own CLIP text encoder.

One CPU generator per image runs through all stages, so a seed fixes the whole cascade
(and the numbers match diffusers' IF pipelines given the same generator).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from aipaint import __version__
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext, build_params
from aipaint.api.result import Result

if TYPE_CHECKING:
    from aipaint_plugins.deepfloyd_if.model import IFCascade, IFStage

    from aipaint.plugin.host import PluginHost

Progress = Callable[[int, int], None]
MAX_SEED = 2**32 - 1
T5_MAX_LENGTH = 77  # IF's T5 was trained on 77 tokens


def _check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidParameter(name, value, f"must be a whole number from {lo} to {hi}")


def _check_number(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidParameter(name, value, f"must be a number from {lo} to {hi}")


@dataclass(frozen=True)
class IFRequest:
    """One cascade run. ``None`` takes the stage's default; ``width``/``height`` are stage I's."""

    prompt: str
    negative_prompt: str = ""
    seed: int = -1
    batch_size: int = 1
    width: int | None = None
    height: int | None = None
    stages: int | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    stage2_steps: int | None = None
    stage2_cfg_scale: float | None = None
    stage2_noise_level: int | None = None
    stage3_steps: int | None = None
    stage3_cfg_scale: float | None = None
    stage3_noise_level: int | None = None

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidParameter(name, getattr(self, name), "must be a string")
        _check_int("seed", self.seed, -1, MAX_SEED)
        _check_int("batch_size", self.batch_size, 1, 64)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, 8, 1024)
                if value % 8:
                    raise InvalidParameter(name, value, "must be a multiple of 8")
        for prefix in ("", "stage2_", "stage3_"):
            steps, cfg = getattr(self, f"{prefix}steps"), getattr(self, f"{prefix}cfg_scale")
            if steps is not None:
                _check_int(f"{prefix}steps", steps, 1, 1000)
            if cfg is not None:
                _check_number(f"{prefix}cfg_scale", cfg, 1.0, 30.0)
        if self.stage2_noise_level is not None:
            _check_int("stage2_noise_level", self.stage2_noise_level, 0, 999)
        if self.stage3_noise_level is not None:
            _check_int("stage3_noise_level", self.stage3_noise_level, 0, 999)

    def stage_setting(self, index: int, name: str) -> Any:
        """The request's ``name`` (steps, cfg_scale, noise_level) for stage ``index`` (0-based)."""
        return getattr(self, name if index == 0 else f"stage{index + 1}_{name}", None)

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size)]


def _noise(shape: Sequence[int], generators: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def _scheduler(config: dict[str, Any]) -> Any:
    import diffusers

    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config)


def _generator_arg(generators: list[torch.Generator]) -> Any:
    return generators if len(generators) > 1 else generators[0]


class IFPipeline:
    """Text to image with DeepFloyd IF.

    >>> pipe = aipaint.load("deepfloyd-if-i-xl")          # plus stages II and III from its card
    >>> pipe.txt2img("a photo of a corgi", seed=1, steps=50, stage2_steps=30).save("corgi.png")
    """

    def __init__(self, model: IFCascade, host: PluginHost | None = None) -> None:
        self.model = model
        self.host = host

    # --- public ------------------------------------------------------------------------------
    def txt2img(self, prompt: str, negative_prompt: str = "", *, progress: Progress | None = None, **params: Any) -> Result:
        """Run the cascade. Parameters are the fields of :class:`IFRequest`."""
        return self.generate(IFRequest(prompt=prompt, negative_prompt=negative_prompt, **params), progress=progress)

    def generate(self, request: IFRequest, progress: Progress | None = None) -> Result:
        import random

        model = self.model
        stages = model.stages[: self._stage_count(request)]
        if request.seed == -1:
            request = _replace(request, seed=random.randint(0, MAX_SEED - request.batch_size))
        settings = [self._settings(request, i, stage) for i, stage in enumerate(stages)]
        total = sum(s["steps"] for s in settings)
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with torch.inference_mode():
            # 1. T5 embeddings, [negative, positive] when any T5 stage guides.
            t5 = self._t5_embeddings(request)
            width = request.width or stages[0].sample_size
            height = request.height or stages[0].sample_size
            images: torch.Tensor | None = None
            for index, (stage, setting) in enumerate(zip(stages, settings, strict=True)):
                begun = time.perf_counter()
                if stage.kind == "base":
                    images = self._base(stage, setting, t5, (height, width), request.batch_size, generators, tick)
                elif stage.kind == "super_resolution":
                    assert images is not None
                    factor = stage.sample_size // stages[0].sample_size
                    height, width = height * factor, width * factor
                    images = self._super_resolution(stage, setting, t5, images, (height, width), generators, tick)
                else:
                    assert images is not None
                    images = self._upscaler(stage, setting, request, images, generators, tick)
                    height, width = images.shape[-2:]
                timings[f"stage{index + 1}"] = time.perf_counter() - begun
        timings["total"] = time.perf_counter() - started
        assert images is not None
        pictures = _to_pil(images)
        return self._result(request, stages, settings, pictures, timings)

    # --- stages ----------------------------------------------------------------------------------
    def _stage_count(self, request: IFRequest) -> int:
        loaded = len(self.model.stages)
        if request.stages is None:
            return loaded
        _check_int("stages", request.stages, 1, loaded)
        return request.stages

    def _settings(self, request: IFRequest, index: int, stage: IFStage) -> dict[str, Any]:
        steps = request.stage_setting(index, "steps") or stage.defaults.steps
        cfg = request.stage_setting(index, "cfg_scale")
        cfg = float(cfg if cfg is not None else stage.defaults.cfg_scale)
        noise_level = request.stage_setting(index, "noise_level") if index else None
        noise_level = noise_level if noise_level is not None else stage.defaults.noise_level
        if stage.max_noise_level is not None and noise_level is not None and noise_level > stage.max_noise_level:
            raise InvalidParameter(f"stage{index + 1}_noise_level", noise_level, f"must be at most {stage.max_noise_level} for this upscaler")
        return {"steps": int(steps), "cfg_scale": cfg, "noise_level": noise_level}

    def _t5_embeddings(self, request: IFRequest) -> dict[str, torch.Tensor]:
        model = self.model
        texts = [request.negative_prompt.lower().strip(), request.prompt.lower().strip()]
        tokens = model.tokenizer(
            texts, padding="max_length", max_length=T5_MAX_LENGTH, truncation=True, add_special_tokens=True, return_tensors="pt"
        )
        device = model.device
        out = model.text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))[0]
        negative, positive = out.to(model.dtype).chunk(2)
        batch = request.batch_size
        return {"negative": negative.repeat(batch, 1, 1), "positive": positive.repeat(batch, 1, 1)}

    @staticmethod
    def _guided(stage_out: torch.Tensor, cfg: float, channels: int) -> torch.Tensor:
        """CFG on the noise half of the output; the variance half is the text-conditioned one."""
        if cfg <= 1.0:
            return stage_out
        uncond, text = stage_out.chunk(2)
        uncond_eps = uncond[:, :channels]
        text_eps, variance = text[:, :channels], text[:, channels:]
        return torch.cat([uncond_eps + cfg * (text_eps - uncond_eps), variance], dim=1)

    def _pixel_loop(
        self,
        stage: IFStage,
        setting: dict[str, Any],
        t5: dict[str, torch.Tensor],
        x: torch.Tensor,
        scheduler: Any,
        generators: list[torch.Generator],
        tick: Callable[[], None],
        condition: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = setting["cfg_scale"]
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
            out = self._guided(out, cfg, channels)
            if not learned:
                out = out[:, :channels]
            x = scheduler.step(out, t, x, generator=_generator_arg(generators), return_dict=False)[0]
            tick()
        return x

    def _base(self, stage, setting, t5, size, batch, generators, tick) -> torch.Tensor:
        # 2. Stage I: pixels from noise.
        scheduler = _scheduler(stage.scheduler_config)
        scheduler.set_timesteps(setting["steps"])
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        channels = stage.unet.config.in_channels
        x = (_noise((channels, *size), generators) * scheduler.init_noise_sigma).to(self.model.device, self.model.dtype)
        return self._pixel_loop(stage, setting, t5, x, scheduler, generators, tick)

    def _super_resolution(self, stage, setting, t5, low_res, size, generators, tick) -> torch.Tensor:
        # 3. Stage II: a new image at ×4, conditioned on the noised, upscaled stage I image.
        import torch.nn.functional as F

        scheduler = _scheduler(stage.scheduler_config)
        scheduler.set_timesteps(setting["steps"])
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        channels = stage.unet.config.in_channels // 2
        device, dtype = self.model.device, self.model.dtype
        x = (_noise((channels, *size), generators) * scheduler.init_noise_sigma).to(device, dtype)
        upscaled = F.interpolate(low_res.to(device, dtype), size, mode="bilinear", align_corners=True)
        level = torch.tensor([setting["noise_level"]] * upscaled.shape[0], device=device)
        noising = _scheduler(stage.noise_scheduler_config)
        noise = _noise(upscaled.shape[1:], generators).to(device, dtype)
        upscaled = noising.add_noise(upscaled, noise, timesteps=level)
        return self._pixel_loop(stage, setting, t5, x, scheduler, generators, tick, condition=upscaled, class_labels=level)

    def _upscaler(self, stage, setting, request, low_res, generators, tick) -> torch.Tensor:
        # 4. Stage III: Stable Diffusion's x4 upscaler, in latent space, with CLIP text.
        from aipaint.prompt import PromptEncoder

        device, dtype = self.model.device, self.model.dtype
        cfg = setting["cfg_scale"]
        guided = cfg > 1.0
        encoder = PromptEncoder(stage.tokenizer, stage.text_encoder)
        positive, negative = encoder.encode_pair(request.prompt, request.negative_prompt)
        batch = low_res.shape[0]
        embeds = positive.repeat(batch, 1, 1)
        if guided:
            embeds = torch.cat([negative.repeat(batch, 1, 1), embeds])
        scheduler = _scheduler(stage.scheduler_config)
        scheduler.set_timesteps(setting["steps"])
        level = torch.tensor([setting["noise_level"]], dtype=torch.long, device=device)
        noise = _noise(low_res.shape[1:], generators).to(device, dtype)
        image = _scheduler(stage.noise_scheduler_config).add_noise(low_res.to(device, dtype), noise, level)
        image = torch.cat([image] * (2 if guided else 1))
        labels = torch.cat([level] * image.shape[0])
        latents_shape = (stage.vae.config.latent_channels, *image.shape[-2:])
        latents = (_noise(latents_shape, generators) * scheduler.init_noise_sigma).to(device, dtype)
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = torch.cat([scheduler.scale_model_input(model_input, t), image], dim=1)
            out = stage.unet(model_input, t, encoder_hidden_states=embeds.to(dtype), class_labels=labels, return_dict=False)[0]
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + cfg * (text - uncond)
            latents = scheduler.step(out, t, latents, generator=_generator_arg(generators), return_dict=False)[0]
            tick()
        return stage.vae.decode(latents / stage.vae.config.scaling_factor, return_dict=False)[0]

    # --- result ------------------------------------------------------------------------------
    def _result(self, request: IFRequest, stages: list[IFStage], settings: list[dict[str, Any]], pictures: list[Any],
                timings: dict[str, float]) -> Result:
        width, height = pictures[0].size
        infotexts = []
        for seed in request.seeds:
            values: dict[str, Any] = {
                "Steps": settings[0]["steps"],
                "CFG scale": settings[0]["cfg_scale"],
                "Seed": seed,
                "Size": f"{width}x{height}",
                "Model": self.model.name,
                "Stages": len(stages),
            }
            for index, setting in enumerate(settings[1:], start=2):
                values[f"Stage {index} steps"] = setting["steps"]
                values[f"Stage {index} CFG scale"] = setting["cfg_scale"]
                values[f"Stage {index} noise level"] = setting["noise_level"]
            values["Version"] = f"aipaint {__version__}"
            infotexts.append(Infotext(request.prompt, request.negative_prompt, build_params(values)).to_text())
        return Result(images=pictures, seeds=request.seeds, infotexts=infotexts, request=request, timings=timings)

    def __repr__(self) -> str:
        return f"<aipaint IFPipeline {self.model!r}>"


def _replace(request: IFRequest, **changes: Any) -> IFRequest:
    import dataclasses

    return dataclasses.replace(request, **changes)


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    array = ((images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]
