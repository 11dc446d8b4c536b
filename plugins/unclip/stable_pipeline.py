"""Stable unCLIP in the core's latent loop: text-to-image, image variations and blends.

The core pipeline's prompt syntax, samplers, seeds and infotext are used unchanged; this
class only decides the UNet's class label, per image, before the loop:

1. The CLIP image embedding: the prior's from the prompt (``txt2img``), the image encoder's
   of the input (``variations``), or the weighted interpolation of 2-5 inputs' (``blend``).
2. Noise augmentation: normalise, noise to ``noise_level`` on the DDPM schedule, undo the
   normalisation, and append the sinusoidal embedding of ``noise_level``.
3. The loop gets it as ``class_labels``: zeros for the negative half, as diffusers does.

Each image's generator draws the prior's noise, then the augmentation's, then the latents,
the order of diffusers' ``StableUnCLIPPipeline`` and ``StableUnCLIPImg2ImgPipeline``; every
image depends on its own seed only (diffusers draws one image's augmentation for a whole batch).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    image_embedding,
    make_scheduler,
    run_prior,
)
from aipaint_plugins.unclip.stable_model import (
    DEFAULT_PRIOR_CFG_SCALE,
    DEFAULT_PRIOR_STEPS,
    StableUnCLIPModel,
)

from aipaint.engine.loop import LoopContributor
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.api.request import GenerationRequest
from aipaint.pipeline import Pipeline, PreparedRun, Progress
from aipaint.api.result import Result

if TYPE_CHECKING:
    from aipaint.prompt import ParsedPrompt

IMAGE_PROMPT = "unclip_image_prompt"  # the GenerationRequest.extra key this pipeline reads
MODES = ("txt2img", "variations", "blend")


@dataclass(frozen=True)
class ImagePrompt:
    """Where the UNet's image embedding comes from (``mode``), and how much noise it gets.

    ``images``/``weights``: one image for variations, 2-5 and their weights for a blend.
    ``prior_steps``/``prior_cfg_scale`` (Karlo's 25 and 4.0) drive the prior of ``txt2img``.
    ``noise_level`` (0 = none) is checked against the model's noising schedule on use.
    """

    mode: str
    images: tuple[Any, ...] = ()
    weights: tuple[float, ...] = ()
    noise_level: int = 0
    prior_steps: int = DEFAULT_PRIOR_STEPS
    prior_cfg_scale: float = DEFAULT_PRIOR_CFG_SCALE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidParameter("mode", self.mode, "must be txt2img, variations or blend")
        if self.mode == "blend":
            check_blend(self.images, self.weights)
        check_int("prior_steps", self.prior_steps, MIN_UNCLIP_STEPS, 1000)
        check_number("prior_cfg_scale", self.prior_cfg_scale, 1.0, 30.0)


class ImageEmbeddingLabels(LoopContributor):
    """The noise-augmented image embeddings (``[batch, 2 * dim]``) as the UNet's ``class_labels``:
    zeros for the negative part when guiding, the embeddings for every positive part."""

    def __init__(self, labels: torch.Tensor, guided: bool) -> None:
        self.labels = labels
        self.guided = guided

    def before_call(self, step: int, guided: bool) -> None:
        self.guided = guided  # Skip Early CFG leaves the negative rows out of early calls

    def unet_kwargs(self, step: int, latent_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor) -> dict[str, Any]:
        parts = latent_input.shape[0] // self.labels.shape[0]
        rows = [torch.zeros_like(self.labels)] if self.guided else []
        rows += [self.labels] * (parts - len(rows))
        return {"class_labels": torch.cat(rows)}


def noise_augment(model: StableUnCLIPModel, embeddings: torch.Tensor, noise_level: int,
                  generators: list[torch.Generator]) -> torch.Tensor:
    """diffusers' ``noise_image_embeddings``, one noise draw per image from its generator."""
    from diffusers.models.embeddings import get_timestep_embedding

    normalizer = model.image_normalizer
    noise = draw_noise((embeddings.shape[-1],), generators).to(embeddings)
    levels = torch.tensor([noise_level] * embeddings.shape[0], device=embeddings.device)
    noised = make_scheduler(model.noising_scheduler_config).add_noise(normalizer.scale(embeddings), noise=noise,
                                                                      timesteps=levels)
    level_embedding = get_timestep_embedding(levels, embeddings.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0)
    return torch.cat([normalizer.unscale(noised), level_embedding.to(noised.dtype)], dim=1)


def prior_text(parsed: ParsedPrompt, steps: int) -> str:
    """The prompt as the prior's CLIP tokenizer should read it: the text in force at the first
    of ``steps``, without emphasis brackets and LoRA tags, ``AND``-ed parts joined."""
    from aipaint.prompt import parse_attention, prompt_at_step

    parts = prompt_at_step(parsed, 0, steps)
    return " ".join("".join(piece.text for piece in parse_attention(text)).strip() for text, _ in parts)


class StableUnCLIPPipeline(Pipeline):
    """Stable unCLIP: the latent pipeline, with the UNet conditioned on a CLIP image embedding.

    >>> pipe = aipaint.load("stable-diffusion-2-1-unclip")
    >>> pipe.variations("fox.png", n=4, seed=2, noise_level=100).save_all("fox-variation.png")
    >>> pipe.blend(["fox.png", "city.png"], [0.7, 0.3], seed=3).save("blend.png")
    >>> small = aipaint.load("stable-diffusion-2-1-unclip-small")   # with Karlo's prior, from its card
    >>> small.txt2img("a watercolour fox", seed=1).save("fox.png")
    """

    model: StableUnCLIPModel

    # --- public modes ----------------------------------------------------------------------
    def txt2img(self, prompt: str, negative_prompt: str = "", *, noise_level: int = 0,
                prior_steps: int = DEFAULT_PRIOR_STEPS, prior_cfg_scale: float = DEFAULT_PRIOR_CFG_SCALE,
                progress: Progress | None = None, **params: Any) -> Result:
        """Text → prior → image embedding → latent loop. ``params``: :class:`GenerationRequest` fields."""
        image_prompt = ImagePrompt("txt2img", noise_level=noise_level, prior_steps=prior_steps,
                                   prior_cfg_scale=prior_cfg_scale)
        return self._generate(image_prompt, progress, prompt=prompt, negative_prompt=negative_prompt, **params)

    def variations(self, image: Any, n: int = 1, *, prompt: str = "", negative_prompt: str = "", noise_level: int = 0,
                   progress: Progress | None = None, **params: Any) -> Result:
        """``n`` new images that keep the content and style of ``image`` (its CLIP image embedding);
        a higher ``noise_level`` strays further. The prompt is optional (empty, as in diffusers)."""
        image_prompt = ImagePrompt("variations", images=(image,), noise_level=noise_level)
        return self._generate(image_prompt, progress, prompt=prompt, negative_prompt=negative_prompt, batch_size=n,
                              **params)

    def blend(self, images: Sequence[Any], weights: Sequence[float] | None = None, *, n: int = 1, prompt: str = "",
              negative_prompt: str = "", noise_level: int = 0, progress: Progress | None = None,
              **params: Any) -> Result:
        """One picture from 2-5 images (Midjourney's ``/blend``): their CLIP image embeddings
        interpolated with ``weights`` (equal by default), then generated ``n`` times."""
        images = tuple(images)
        weights = tuple(weights) if weights is not None else tuple(1.0 for _ in images)
        image_prompt = ImagePrompt("blend", images=images, weights=weights, noise_level=noise_level)
        return self._generate(image_prompt, progress, prompt=prompt, negative_prompt=negative_prompt, batch_size=n,
                              **params)

    def _generate(self, image_prompt: ImagePrompt, progress: Progress | None, **fields: Any) -> Result:
        extra = {**fields.pop("extra", {}), IMAGE_PROMPT: image_prompt}
        return self.generate(GenerationRequest(extra=extra, **fields), progress=progress)

    # --- the seam: every mode of the core pipeline runs through activate() -----------------------
    @contextmanager
    def activate(self, request: GenerationRequest, extra_contributors: list[LoopContributor] | None = None
                 ) -> Iterator[tuple[PreparedRun, list[LoopContributor], dict[str, str]]]:
        image_prompt = request.extra.get(IMAGE_PROMPT)
        if not isinstance(image_prompt, ImagePrompt):
            raise UnsupportedFeature(
                f"{self.model.name} is a Stable unCLIP model: its UNet needs a CLIP image embedding. "
                "Use txt2img (with a prior), variations(image) or blend(images)"
            )
        self._check_components(image_prompt)
        with super().activate(request, extra_contributors) as (prepared, contributors, info):
            labels = self._class_labels(image_prompt, prepared)
            contributors.append(ImageEmbeddingLabels(labels, guided=float(prepared.request.cfg_scale) > 1.0))
            info.update(self._infotext(image_prompt))
            yield prepared, contributors, info

    def _check_components(self, image_prompt: ImagePrompt) -> None:
        model = self.model
        check_int("noise_level", image_prompt.noise_level, 0, model.max_noise_level)
        if image_prompt.mode == "txt2img" and model.prior is None:
            raise UnsupportedFeature(
                f"{model.name} has no prior, so no text-to-image: use variations() or blend(), or load it with "
                "prior=<a Karlo UnCLIPPipeline or StableUnCLIPPipeline folder> (Karlo's prior fits the ViT-L -small model)"
            )
        if image_prompt.mode != "txt2img" and model.image_encoder is None:
            raise UnsupportedFeature(
                f"{model.name} has no CLIP image encoder: load it with image_encoder=<a StableUnCLIPImg2ImgPipeline folder>"
            )

    def _class_labels(self, image_prompt: ImagePrompt, prepared: PreparedRun) -> torch.Tensor:
        model = self.model
        generators = prepared.generators
        batch = len(generators)
        with torch.inference_mode():
            if image_prompt.mode == "txt2img":
                guided = image_prompt.prior_cfg_scale > 1.0
                # The prior's negative is the empty text, whatever the UNet's negative prompt (as in diffusers).
                texts = ["", prior_text(prepared.prompt, prepared.request.steps)]
                text = encode_prior_text(model.prior_tokenizer, model.prior_text_encoder, texts, batch, guided, model.device)
                embeddings = run_prior(model.prior, model.prior_scheduler_config, text, steps=image_prompt.prior_steps,
                                       cfg_scale=float(image_prompt.prior_cfg_scale), guided=guided, generators=generators,
                                       tick=lambda: None)
            else:
                weights = image_prompt.weights if image_prompt.mode == "blend" else None
                embeddings = image_embedding(model.feature_extractor, model.image_encoder, image_prompt.images, weights,
                                             model.device, model.dtype).expand(batch, -1)
            return noise_augment(model, embeddings, image_prompt.noise_level, generators).to(model.device, model.dtype)

    @staticmethod
    def _infotext(image_prompt: ImagePrompt) -> dict[str, str]:
        values = {"unCLIP mode": image_prompt.mode, "Noise level": str(image_prompt.noise_level)}
        if image_prompt.mode == "txt2img":
            values["Prior steps"] = str(image_prompt.prior_steps)
            values["Prior CFG scale"] = f"{float(image_prompt.prior_cfg_scale):g}"
        if image_prompt.mode == "blend":
            values["Blend weights"] = " ".join(f"{w:g}" for w in image_prompt.weights)
        return values

    def __repr__(self) -> str:
        return f"<aipaint StableUnCLIPPipeline {self.model!r}>"

