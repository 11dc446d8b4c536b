"""Stable unCLIP's share of a latent job: the UNet's class label, per image, before the loop.

The core engine runs Stable unCLIP like any latent model (prompt syntax, samplers, seeds,
infotext); :meth:`StableUnCLIPModel.job_contributors` calls :func:`image_embedding_labels`:

1. The CLIP image embedding: the prior's from the prompt (``txt2img``), the image encoder's
   of the request's image prompt (``variations``), or the weighted interpolation of 2-5
   image prompts' (``blend``).
2. Noise augmentation: normalise, noise to ``unclip.noise_level`` on the DDPM schedule, undo
   the normalisation, and append the sinusoidal embedding of the noise level.
3. The loop gets it as ``class_labels``: zeros for the negative half, as diffusers does.

The engine calls it after adapters activate and before it draws the starting noise, so each
image's generator draws the prior's noise, then the augmentation's, then the latents: the
order of diffusers' ``StableUnCLIPPipeline`` and ``StableUnCLIPImg2ImgPipeline``. Every image
depends on its own seed only (diffusers draws one image's augmentation for a whole batch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from aipaint_plugins.unclip.options import UnCLIPOptions
from aipaint_plugins.unclip.shared import blend_weights, encode_prior_text, image_embedding, run_prior
from aipaint_plugins.unclip.stable_model import DEFAULT_PRIOR_CFG_SCALE, DEFAULT_PRIOR_STEPS

from aipaint.api.request import check_range
from aipaint.engine.loop import LoopContributor
from aipaint.engine.noise import initial_noise
from aipaint.errors import InvalidParameter
from aipaint.models.family import make_scheduler

if TYPE_CHECKING:
    from aipaint_plugins.unclip.stable_model import StableUnCLIPModel

    from aipaint.api.request import GenerationRequest
    from aipaint.prompt import ParsedPrompt


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


def noise_augment(model: StableUnCLIPModel, embeddings: torch.Tensor, noise_level: int, seeds: list[int],
                  generators: list[torch.Generator]) -> torch.Tensor:
    """diffusers' ``noise_image_embeddings``, one noise draw per image from its generator."""
    from diffusers.models.embeddings import get_timestep_embedding

    normalizer = model.image_normalizer
    noise = initial_noise(seeds, (embeddings.shape[-1],), generators).to(embeddings)
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


def image_embedding_labels(model: StableUnCLIPModel, request: GenerationRequest, prompt: ParsedPrompt,
                           generators: list[torch.Generator]) -> tuple[list[LoopContributor], dict[str, str]]:
    """The class-label contributor of a settled request, and its infotext entries."""
    options = request.option(UnCLIPOptions)
    if options.super_res_steps is not None:
        raise InvalidParameter("unclip.super_res_steps", options.super_res_steps,
                               "is a Karlo option; Stable unCLIP has no super-resolution stage")
    noise_level = options.noise_level or 0
    check_range("unclip.noise_level", noise_level, 0, model.max_noise_level, int)
    prior_steps = options.prior_steps or DEFAULT_PRIOR_STEPS
    prior_cfg = float(options.prior_cfg_scale if options.prior_cfg_scale is not None else DEFAULT_PRIOR_CFG_SCALE)
    seeds = request.seeds
    batch = len(generators)
    with torch.inference_mode():
        if request.mode == "txt2img":
            guided = prior_cfg > 1.0
            # The prior's negative is the empty text, whatever the UNet's negative prompt (as in diffusers).
            texts = ["", prior_text(prompt, request.steps)]
            text = encode_prior_text(model.prior_tokenizer, model.prior_text_encoder, texts, batch, guided, model.device)
            embeddings = run_prior(model.prior, model.prior_scheduler_config, text, steps=prior_steps, cfg_scale=prior_cfg,
                                   guided=guided, seeds=seeds, generators=generators, tick=lambda: None)
        else:
            embeddings = image_embedding(model.feature_extractor, model.image_encoder, request, model.device,
                                         model.dtype).expand(batch, -1)
        labels = noise_augment(model, embeddings, noise_level, seeds, generators).to(model.device, model.dtype)
    info = {"unCLIP mode": request.mode, "Noise level": str(noise_level)}
    if request.mode == "txt2img":
        info["Prior steps"] = str(prior_steps)
        info["Prior CFG scale"] = f"{prior_cfg:g}"
    if request.mode == "blend":
        info["Blend weights"] = " ".join(f"{w:g}" for w in blend_weights(request))
    return [ImageEmbeddingLabels(labels, guided=float(request.cfg_scale) > 1.0)], info
