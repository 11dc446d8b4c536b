"""Hires fix, as in A1111: generate at the base size, upscale, then denoise again.

The second pass is an img2img over the upscaled picture with its own steps and
denoising strength. When :func:`hires_fix` runs the generation itself (it is given a
txt2img request), a latent upscaler resizes the first pass's own latents, which are never
decoded (A1111's way: no decode/encode round trip). On a finished picture (a
:class:`~aipaint.api.result.Result`, or the ``hires`` post-processor in a chain) only the
pixels are left, so a latent upscaler resizes the picture's latents as encoded again by
the VAE. A pixel or model upscaler works on the decoded picture, which img2img encodes. As
in A1111, the PNG parameters keep the *base* size and add
``Hires upscale``, ``Hires upscaler``, ``Hires steps`` and ``Denoising strength``, which is
what a regeneration needs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aipaint_plugins.upscale.upscalers import DEFAULT_TILE, UpscaleSettings, get_upscaler

from aipaint.api.request import GenerationRequest
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.kit.diffusion import GENERATION_OPTIONS, generation_settings, require_mode
from aipaint.plugin.kit.options import number, option_bool, parse_size

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

Progress = Callable[[int, int], None]

@dataclass(frozen=True)
class HiresSettings:
    """The second pass. ``hires_steps=0`` means "the base steps" (A1111's default); the
    ``hires_*`` prompt and sampler default to the base generation's."""

    scale: float = 2.0
    resize_to: tuple[int, int] | None = None
    upscaler: str = "Latent"
    hires_steps: int = 0
    denoising_strength: float = 0.6
    hires_prompt: str | None = None
    hires_negative_prompt: str | None = None
    hires_sampler: str | None = None
    tile: int = DEFAULT_TILE
    overlap: int | None = None
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        number({"scale": self.scale}, "scale", 2.0, 1.0, 8.0)
        number({"hires_steps": self.hires_steps}, "hires_steps", 0, 0, 1000, integer=True)
        number({"denoising_strength": self.denoising_strength}, "denoising_strength", 0.6, 0.0, 1.0, low_open=True)
        if self.resize_to is not None:
            parse_size(self.resize_to, "resize_to")
        if not isinstance(self.allow_pickle, bool):  # a string such as "no" must not count as yes
            raise InvalidParameter("allow_pickle", self.allow_pickle, "must be True or False")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> HiresSettings:
        return cls(
            scale=number(options, "scale", 2.0, 1.0, 8.0),
            resize_to=parse_size(options.get("resize_to"), "resize_to"),
            upscaler=str(options.get("upscaler") or "Latent"),
            hires_steps=number(options, "hires_steps", 0, 0, 1000, integer=True),
            denoising_strength=number(options, "denoising_strength", 0.6, 0.0, 1.0, low_open=True),
            hires_prompt=options.get("hires_prompt"),
            hires_negative_prompt=options.get("hires_negative_prompt"),
            hires_sampler=options.get("hires_sampler"),
            tile=number(options, "tile", DEFAULT_TILE, 0, 1 << 16, integer=True),
            overlap=None if options.get("overlap") is None else number(options, "overlap", 0, 0, 1 << 15, integer=True),
            allow_pickle=option_bool(options, "allow_pickle"),
        )

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The hires size: ``resize_to`` if given, else base × scale; rounded down to a
        multiple of 8 (as A1111's latent size forces)."""
        from aipaint.imageutil import check_pixels

        if self.resize_to is not None:
            width, height = self.resize_to
        else:
            width, height = int(width * self.scale), int(height * self.scale)
        width, height = max(8, width - width % 8), max(8, height - height % 8)
        check_pixels("hires size", width, height)
        return width, height

    def infotext(self, hires_steps: int, upscaler_name: str) -> dict[str, str]:
        info = {
            "Denoising strength": f"{self.denoising_strength:g}",
            "Hires upscale": f"{self.scale:g}",
            "Hires steps": str(hires_steps),
            "Hires upscaler": upscaler_name,
        }
        if self.resize_to is not None:
            info["Hires resize"] = f"{self.resize_to[0]}x{self.resize_to[1]}"
            del info["Hires upscale"]
        if self.hires_prompt is not None:
            info["Hires prompt"] = self.hires_prompt
        if self.hires_negative_prompt is not None:
            info["Hires negative prompt"] = self.hires_negative_prompt
        if self.hires_sampler is not None:
            info["Hires sampler"] = self.hires_sampler
        return info


def _check_model(pipe: Pipeline) -> None:
    from aipaint.models.latent import LatentDiffusionModel

    model = pipe.model
    if not isinstance(model, LatentDiffusionModel):
        raise UnsupportedFeature(f"hires fix works on latent diffusion models; {type(model).__name__} is not one")
    if model.unet_in_channels != model.latent_channels:
        raise UnsupportedFeature(
            f"hires fix runs a plain img2img pass, which an inpainting model ({model.unet_in_channels}-channel UNet) "
            "cannot do; use SD upscale or a non-inpainting model"
        )


def _latent_pass(pipe: Pipeline, request: GenerationRequest, upscaled: torch.Tensor, strength: float,
                 progress: Progress | None) -> tuple[list[Image.Image], dict[str, str]]:
    """img2img from latents (the latent upscalers' second pass): the core's engine noises them
    to the level of the first step the strength leaves and runs the remaining steps."""
    from aipaint.engine.modes import LatentImg2Img
    from aipaint.engine.run import generate

    result = generate(pipe.model, pipe.check(request), host=pipe.host, progress=progress,
                      mode=LatentImg2Img(upscaled, strength))
    return list(result.images), dict(result.added_parameters)


def hires_pass(
    pipe: Pipeline,
    request: GenerationRequest,
    settings: HiresSettings,
    base: list[Image.Image] | torch.Tensor,
    *,
    progress: Progress | None = None,
) -> tuple[list[Image.Image], dict[str, str]]:
    """The second pass over the ``base`` of ``request`` (item ``i`` has seed ``seed + i``).

    ``base`` is the first pass's pictures, or its latents (NCHW, one row per picture) when
    the caller still has them. Returns the hires images and the infotext entries to add. A
    pixel or model upscaler hands the upscaled picture to the pipeline's img2img; a latent
    upscaler resizes the latents (given, or encoded from the picture) and denoises them here.
    """
    import torch

    from aipaint.plugin.kit.image_models import pil_to_tensor

    _check_model(pipe)
    model = pipe.model
    factor = model.vae_scale_factor
    request = request.with_defaults(model.defaults).with_seed()
    upscaler = get_upscaler(settings.upscaler)
    if isinstance(base, torch.Tensor) and not upscaler.is_latent:
        base = pipe.decode(base)  # a pixel or model upscaler needs the pictures
    base_size = base[0].size if isinstance(base, list) else (base.shape[-1] * factor, base.shape[-2] * factor)
    width, height = settings.target_size(*base_size)
    steps = settings.hires_steps or request.steps
    out: list[Image.Image] = []
    info: dict[str, str] = {}
    for index, seed in enumerate(request.seeds[: len(base)]):
        hires_request = dataclasses.replace(
            request,
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            batch_size=1,
            prompt=request.prompt if settings.hires_prompt is None else settings.hires_prompt,
            negative_prompt=request.negative_prompt if settings.hires_negative_prompt is None else settings.hires_negative_prompt,
            sampler=settings.hires_sampler or request.sampler,
            **{name: None for name in ("init_image", "mask") if name in GenerationRequest.__dataclass_fields__},
        )
        if upscaler.is_latent:
            if model.unet_in_channels != model.latent_channels:
                raise UnsupportedFeature(
                    f"latent upscalers need an ordinary UNet; this inpainting model takes {model.unet_in_channels} "
                    "channels: pick a pixel upscaler such as 'Lanczos'"
                )
            with torch.inference_mode():
                if isinstance(base, list):
                    latents = model.encode(pil_to_tensor(base[index].convert("RGB")))
                else:
                    latents = base[index : index + 1]
                upscaled = upscaler.upscale_latents(latents, (height // factor, width // factor))
            pictures, info = _latent_pass(pipe, hires_request, upscaled, settings.denoising_strength, progress)
        else:
            up_settings = UpscaleSettings(tile=settings.tile, overlap=settings.overlap, allow_pickle=settings.allow_pickle)
            big = upscaler.upscale(base[index].convert("RGB"), (width, height), up_settings)
            img2img = require_mode(pipe, "img2img", "hires fix with a pixel upscaler")
            if start_of(steps, settings.denoising_strength) >= steps:
                raise InvalidParameter("denoising_strength", settings.denoising_strength,
                                       f"runs no step of {steps} hires steps", "raise the strength or the hires steps")
            fields = {k: v for k, v in vars(hires_request).items()
                      if k not in ("prompt", "negative_prompt", "init_image", "denoising_strength", "mask")}
            result = img2img(big, hires_request.prompt, hires_request.negative_prompt,
                             denoising_strength=settings.denoising_strength, progress=progress,
                             **{k: v for k, v in fields.items() if _is_set(hires_request, k)})
            pictures = list(result.images)
        out.extend(pictures)
    entries = dict(info)
    entries.update(settings.infotext(steps, upscaler.name))
    return out, entries


def start_of(steps: int, strength: float) -> int:
    """The first step img2img runs at ``strength`` (diffusers' and the core's rule)."""
    return steps - min(int(steps * strength), steps)


def _is_set(request: GenerationRequest, name: str) -> bool:
    """Pass on only fields that differ from the request's defaults, so img2img fills the rest."""
    field = GenerationRequest.__dataclass_fields__[name]
    default = field.default if field.default is not dataclasses.MISSING else (
        field.default_factory() if field.default_factory is not dataclasses.MISSING else None)
    return getattr(request, name) != default


def _txt2img_keeping_latents(pipe: Pipeline, request: GenerationRequest,
                             progress: Progress | None) -> tuple[Result, torch.Tensor]:
    """The first pass as ``Pipeline.generate`` runs txt2img, but it keeps the final latents
    instead of decoding them: the result carries the seeds and infotexts, and no images."""
    from aipaint.engine.run import generate

    result = generate(pipe.model, pipe.check(request), host=pipe.host, progress=progress, decode=False)
    return result, result.latents


def hires_fix(
    pipe: Pipeline,
    source: GenerationRequest | Result,
    *,
    progress: Progress | None = None,
    **settings: Any,
) -> Result:
    """Hires fix for a request (generate, then the second pass) or a finished :class:`Result`.

    Settings are :class:`HiresSettings` fields (``scale=2.0``, ``upscaler="Latent"``,
    ``hires_steps=0``, ``denoising_strength=0.6``, ``resize_to=(w, h)``, …). The result keeps
    the base request and records the hires settings in its PNG parameters.
    """
    from aipaint.api.result import Result
    from aipaint.plugin.postprocess import merge_infotext

    hires = HiresSettings(**settings)
    started = time.perf_counter()
    latents: torch.Tensor | None = None
    if isinstance(source, GenerationRequest):
        _check_model(pipe)
        if source.init_image is None and get_upscaler(hires.upscaler).is_latent:
            source, latents = _txt2img_keeping_latents(pipe, source, progress)
        else:
            source = pipe.generate(source, progress=progress)
    if not isinstance(source, Result):
        raise InvalidParameter("source", type(source).__name__, "must be a GenerationRequest or a Result",
                               "for a bare image use the 'hires' post-processor with a prompt")
    request = source.request
    if not isinstance(request, GenerationRequest):
        raise InvalidParameter("source", source, "must carry the GenerationRequest it was made from")
    request = dataclasses.replace(request, seed=source.seeds[0], batch_size=len(source.seeds))
    base = latents if latents is not None else list(source.images)
    images, entries = hires_pass(pipe, request, hires, base, progress=progress)
    infotexts = [merge_infotext(text, entries) for text in source.infotexts]
    timings = {**source.timings, "hires": time.perf_counter() - started}
    return dataclasses.replace(source, images=images, infotexts=infotexts, timings=timings)


def run_hires_postprocessor(image: Image.Image, options: dict[str, Any], pipe: Pipeline | None) -> Any:
    """The ``hires`` post-processor: a second pass over one image."""
    from aipaint.plugin.postprocess import PostProcessOutput

    if pipe is None:
        raise UnsupportedFeature("hires fix diffuses with a model: load one first")
    settings = HiresSettings.from_options(options)
    request = options.get("request")
    if request is None or any(options.get(k) is not None for k in GENERATION_OPTIONS):
        prompt, negative, params = generation_settings(options, request, what="hires fix")
        params = {k: v for k, v in params.items() if k in GenerationRequest.__dataclass_fields__}
        request = GenerationRequest(prompt=prompt, negative_prompt=negative, **params)
    request = dataclasses.replace(request, width=image.width - image.width % 8, height=image.height - image.height % 8,
                                  batch_size=1)
    images, entries = hires_pass(pipe, request, settings, [image.convert("RGB")])
    return PostProcessOutput(images[0], entries)
