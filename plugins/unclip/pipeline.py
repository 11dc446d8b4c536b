"""The unCLIP loop (DALL·E 2 / Karlo): text → image embedding → pixels → super-resolution.

1. Encode the prompt with CLIP (pooled ``text_embeds`` and token states).
2. Prior: denoise a CLIP *image* embedding conditioned on the text (text-to-image only).
   Variations start instead from the CLIP image encoder's embedding of an input image, and
   a blend from the weighted spherical interpolation of 2-5 images' embeddings.
3. Decoder: denoise 64×64 pixels conditioned on the image embedding (projected to extra
   context tokens and added to the time embedding) and the text.
4. Super-resolution ×4 (two UNets: one for every step but the last, one for the last).

One CPU generator per image runs through every stage, so a seed fixes the whole run
(and the numbers match diffusers' UnCLIP pipelines given the same generator).
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from aipaint_plugins.unclip.shared import (
    MIN_UNCLIP_STEPS,
    check_blend,
    check_int,
    check_number,
    draw_noise,
    encode_prior_text,
    generator_arg,
    image_embedding,
    make_scheduler,
    run_prior,
)

from aipaint import __version__
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.infotext import Infotext, build_params
from aipaint.api.result import Result

if TYPE_CHECKING:
    from aipaint_plugins.unclip.model import UnCLIPModel

    from aipaint.plugin.host import PluginHost

Progress = Callable[[int, int], None]
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class UnCLIPRequest:
    """One unCLIP run. ``mode`` is ``txt2img``, ``variations`` or ``blend``; ``None`` fields
    take the model's defaults. ``images``/``weights`` are the inputs of variations and blends."""

    prompt: str = ""
    negative_prompt: str = ""
    mode: str = "txt2img"
    seed: int = -1
    batch_size: int = 1
    prior_steps: int | None = None
    steps: int | None = None
    super_res_steps: int | None = None
    prior_cfg_scale: float | None = None
    cfg_scale: float | None = None
    images: tuple[Any, ...] = ()
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InvalidParameter(name, getattr(self, name), "must be a string")
        if self.mode not in ("txt2img", "variations", "blend"):
            raise InvalidParameter("mode", self.mode, "must be txt2img, variations or blend")
        check_int("seed", self.seed, -1, MAX_SEED)
        check_int("batch_size", self.batch_size, 1, 64)
        for name in ("prior_steps", "steps", "super_res_steps"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), MIN_UNCLIP_STEPS, 1000)
        for name in ("prior_cfg_scale", "cfg_scale"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), 1.0, 30.0)
        if self.mode == "blend":
            check_blend(self.images, self.weights)

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.batch_size)]


class UnCLIPPipeline:
    """Text to image, image variations and multi-image blends with an unCLIP model.

    >>> pipe = aipaint.load("karlo-v1-alpha")             # with the image encoder from its card
    >>> pipe.txt2img("a watercolour fox", seed=1).save("fox.png")
    >>> pipe.variations("fox.png", n=4, seed=2).save_all("fox-variation.png")
    >>> pipe.blend(["fox.png", "city.png"], [0.7, 0.3], seed=3).save("blend.png")
    """

    def __init__(self, model: UnCLIPModel, host: PluginHost | None = None) -> None:
        self.model = model
        self.host = host

    # --- public modes ----------------------------------------------------------------------
    def txt2img(self, prompt: str, negative_prompt: str = "", *, progress: Progress | None = None, **params: Any) -> Result:
        """Text → prior → decoder → super-resolution. Parameters: :class:`UnCLIPRequest` fields."""
        return self.generate(UnCLIPRequest(prompt=prompt, negative_prompt=negative_prompt, **params), progress)

    def variations(self, image: Any, n: int = 1, *, progress: Progress | None = None, **params: Any) -> Result:
        """``n`` new images that keep the content and style of ``image`` (its CLIP image embedding)."""
        request = UnCLIPRequest(mode="variations", images=(image,), batch_size=n, **params)
        return self.generate(request, progress)

    def blend(self, images: Sequence[Any], weights: Sequence[float] | None = None, *, n: int = 1,
              progress: Progress | None = None, **params: Any) -> Result:
        """One picture from 2-5 images (Midjourney's ``/blend``): their CLIP image embeddings
        interpolated with ``weights`` (equal by default), then decoded ``n`` times."""
        images = tuple(images)
        weights = tuple(weights) if weights is not None else tuple(1.0 for _ in images)
        request = UnCLIPRequest(mode="blend", images=images, weights=weights, batch_size=n, **params)
        return self.generate(request, progress)

    def generate(self, request: UnCLIPRequest, progress: Progress | None = None) -> Result:
        model = self.model
        defaults = model.unclip_defaults
        if request.seed == -1:
            request = dataclasses.replace(request, seed=random.randint(0, MAX_SEED - request.batch_size))
        if request.mode == "txt2img" and model.prior is None:
            raise UnsupportedFeature(f"{model.name} has no prior (an image-variations model): use variations() or blend()")
        if request.mode != "txt2img" and model.image_encoder is None:
            raise UnsupportedFeature(
                f"{model.name} has no CLIP image encoder: load it with image_encoder=<an UnCLIPImageVariationPipeline folder>"
            )
        text_mode = request.mode == "txt2img"
        settings = {
            "prior_steps": request.prior_steps or defaults.prior_steps,
            "steps": request.steps or defaults.decoder_steps,
            "super_res_steps": request.super_res_steps or defaults.super_res_steps,
            "prior_cfg_scale": float(request.prior_cfg_scale if request.prior_cfg_scale is not None else defaults.prior_cfg_scale),
            "cfg_scale": float(request.cfg_scale if request.cfg_scale is not None else defaults.decoder_cfg_scale),
        }
        total = (settings["prior_steps"] if text_mode else 0) + settings["steps"] + settings["super_res_steps"]
        done = 0

        def tick() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        generators = [torch.Generator("cpu").manual_seed(s) for s in request.seeds]
        batch = request.batch_size
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with torch.inference_mode():
            # 1. Text: [negative, positive] when guiding (the image modes condition on empty text, as Karlo does).
            if text_mode:
                guided = settings["prior_cfg_scale"] > 1.0 or settings["cfg_scale"] > 1.0
                texts = [request.negative_prompt, request.prompt]
            else:
                guided = settings["cfg_scale"] > 1.0
                texts = ["", ""]
            text = encode_prior_text(model.tokenizer, model.text_encoder, texts, batch, guided, model.device)
            # 2. The image embedding: from the prior, or from input images.
            if text_mode:
                embeddings = run_prior(model.prior, model.scheduler_configs["prior_scheduler"], text,
                                       steps=settings["prior_steps"], cfg_scale=settings["prior_cfg_scale"], guided=guided,
                                       generators=generators, tick=tick)
            else:
                weights = request.weights if request.mode == "blend" else None
                embeddings = image_embedding(model.feature_extractor, model.image_encoder, request.images, weights,
                                             model.device, model.dtype).repeat(batch, 1)
            timings["embedding"] = time.perf_counter() - started
            # 3. Decoder, then 4. super-resolution.
            small = self._decoder(embeddings, text, settings, guided, generators, tick)
            timings["decoder"] = time.perf_counter() - started - timings["embedding"]
            images = self._super_resolution(small, settings, generators, tick)
        timings["total"] = time.perf_counter() - started
        return self._result(request, settings, _to_pil(images), timings)

    # --- stages ----------------------------------------------------------------------------
    def _decoder(self, embeddings, text, settings, guided, generators, tick) -> torch.Tensor:
        import torch.nn.functional as F

        model = self.model
        hidden, additive = model.text_proj(image_embeddings=embeddings, prompt_embeds=text["embeds"],
                                           text_encoder_hidden_states=text["hidden"], do_classifier_free_guidance=guided)
        mask = F.pad(text["mask"], (model.text_proj.clip_extra_context_tokens, 0), value=True)
        scheduler = make_scheduler(model.scheduler_configs["decoder_scheduler"])
        scheduler.set_timesteps(settings["steps"], device=model.device)
        timesteps = scheduler.timesteps
        decoder = model.decoder
        size = decoder.config.sample_size
        channels = decoder.config.in_channels
        x = (draw_noise((channels, size, size), generators) * scheduler.init_noise_sigma).to(model.device, model.dtype)
        cfg = settings["cfg_scale"]
        for i, t in enumerate(timesteps):
            model_input = torch.cat([x] * 2) if guided else x
            out = decoder(sample=model_input, timestep=t, encoder_hidden_states=hidden, class_labels=additive,
                          attention_mask=mask).sample
            if guided:
                uncond, cond = out.chunk(2)
                eps_uncond, eps_cond, variance = uncond[:, :channels], cond[:, :channels], cond[:, channels:]
                out = torch.cat([eps_uncond + cfg * (eps_cond - eps_uncond), variance], dim=1)
            previous = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x = scheduler.step(out, t, x, prev_timestep=previous, generator=generator_arg(generators)).prev_sample
            tick()
        return x.clamp(-1, 1)

    def _super_resolution(self, small, settings, generators, tick) -> torch.Tensor:
        import torch.nn.functional as F

        model = self.model
        scheduler = make_scheduler(model.scheduler_configs["super_res_scheduler"])
        scheduler.set_timesteps(settings["super_res_steps"], device=model.device)
        timesteps = scheduler.timesteps
        first, last = model.super_res_first, model.super_res_last
        size = first.config.sample_size
        channels = first.config.in_channels // 2
        x = (draw_noise((channels, size, size), generators) * scheduler.init_noise_sigma).to(model.device, model.dtype)
        upscaled = F.interpolate(small, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
        for i, t in enumerate(timesteps):
            unet = last if i == len(timesteps) - 1 else first
            out = unet(sample=torch.cat([x, upscaled], dim=1), timestep=t).sample
            previous = timesteps[i + 1] if i + 1 < len(timesteps) else None
            x = scheduler.step(out, t, x, prev_timestep=previous, generator=generator_arg(generators)).prev_sample
            tick()
        return x

    # --- result ------------------------------------------------------------------------------
    def _result(self, request: UnCLIPRequest, settings: dict[str, Any], pictures: list[Any], timings: dict[str, float]) -> Result:
        width, height = pictures[0].size
        infotexts = []
        for seed in request.seeds:
            values: dict[str, Any] = {"Steps": settings["steps"], "CFG scale": settings["cfg_scale"], "Seed": seed,
                                      "Size": f"{width}x{height}", "Model": self.model.name, "unCLIP mode": request.mode}
            if request.mode == "txt2img":
                values["Prior steps"] = settings["prior_steps"]
                values["Prior CFG scale"] = settings["prior_cfg_scale"]
            values["Super-resolution steps"] = settings["super_res_steps"]
            if request.mode == "blend":
                values["Blend weights"] = " ".join(f"{w:g}" for w in request.weights)
            values["Version"] = f"aipaint {__version__}"
            infotexts.append(Infotext(request.prompt, request.negative_prompt, build_params(values)).to_text())
        return Result(images=pictures, seeds=request.seeds, infotexts=infotexts, request=request, timings=timings)

    def __repr__(self) -> str:
        return f"<aipaint UnCLIPPipeline {self.model!r}>"


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    array = ((images.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]
