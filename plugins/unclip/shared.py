"""What both unCLIP families (Karlo; Stable unCLIP) do the same way: encode text for a prior,
run the prior, encode image prompts with CLIP, and blend 2-5 images' embeddings
(Midjourney's ``/blend``).

Randomness comes from the core's generators, one per image (seed + i), drawn in diffusers'
order, so the numbers match diffusers' pipelines given the same generators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from aipaint.engine.noise import initial_noise
from aipaint.engine.run import scheduler_generator
from aipaint.models.family import make_scheduler

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest

Tick = Callable[[], None]


def blend_weights(request: GenerationRequest) -> tuple[float, ...]:
    """The weights of a request's image prompts: its own, else equal."""
    return request.image_prompt_weights or tuple(1.0 for _ in request.image_prompts)


# --- embedding interpolation ----------------------------------------------------------------
def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two embeddings' directions; the norm is interpolated linearly."""
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.arccos((ua * ub).sum().clamp(-1.0, 1.0))
    if float(omega) < 1e-6:
        direction = (1 - t) * ua + t * ub
    else:
        direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    return direction / direction.norm() * ((1 - t) * na + t * nb)


def blend_embeddings(embeddings: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Weighted interpolation of CLIP image embeddings (``[n, dim]``) into one ``[dim]``.

    Two images: exact slerp at the second image's share of the weight. More: the weighted
    mean of the unit directions, renormalised, at the weighted mean norm (the spherical
    mean's usual approximation). A single non-zero weight returns that image's embedding.
    """
    w = torch.tensor([float(x) for x in weights], dtype=embeddings.dtype)
    w = w / w.sum()
    if len(w) == 2:
        return slerp(embeddings[0], embeddings[1], float(w[1]))
    norms = embeddings.norm(dim=-1)
    direction = (w[:, None] * embeddings / norms[:, None]).sum(0)
    return direction / direction.norm() * (w * norms).sum()


# --- CLIP encoders and the prior --------------------------------------------------------------
def image_embedding(feature_extractor: Any, image_encoder: torch.nn.Module, request: GenerationRequest,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The CLIP image embedding (``[1, dim]``) of a variations request's image, or the blend of a
    blend request's images by their weights."""
    pixels = feature_extractor(images=list(request.image_prompts), return_tensors="pt").pixel_values
    embeddings = image_encoder(pixels.to(device, dtype)).image_embeds
    if request.mode == "blend":
        return blend_embeddings(embeddings, blend_weights(request))[None]
    return embeddings[:1]


def encode_prior_text(tokenizer: Any, text_encoder: torch.nn.Module, texts: list[str], batch: int, guided: bool,
                      device: torch.device) -> dict[str, torch.Tensor]:
    """CLIP text features of ``[negative, positive]`` for a prior (and Karlo's decoder): pooled
    ``embeds``, token ``hidden`` states and the attention ``mask``, each ``batch`` times, the
    negative first when ``guided``."""
    tokens = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                       return_tensors="pt")
    out = text_encoder(tokens.input_ids.to(device))
    mask = tokens.attention_mask.bool().to(device)

    def arrange(x: torch.Tensor) -> torch.Tensor:
        negative, positive = x.chunk(2)
        reps = [batch] + [1] * (x.dim() - 1)
        return torch.cat([negative.repeat(*reps), positive.repeat(*reps)]) if guided else positive.repeat(*reps)

    return {"embeds": arrange(out.text_embeds), "hidden": arrange(out.last_hidden_state), "mask": arrange(mask)}


def run_prior(prior: torch.nn.Module, scheduler_config: dict[str, Any], text: dict[str, torch.Tensor], *, steps: int,
              cfg_scale: float, guided: bool, seeds: list[int], generators: list[torch.Generator], tick: Tick
              ) -> torch.Tensor:
    """Denoise one CLIP image embedding per image from text features (``[batch, dim]``)."""
    from diffusers import UnCLIPScheduler

    device = text["embeds"].device
    scheduler = make_scheduler(scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    # unCLIP's own scheduler must be told the previous timestep (Karlo's pipeline does so); others know it.
    spaced = isinstance(scheduler, UnCLIPScheduler)
    noise = initial_noise(seeds, (prior.config.embedding_dim,), generators)
    latents = (noise * scheduler.init_noise_sigma).to(device, prior.dtype)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        predicted = prior(model_input, timestep=t, proj_embedding=text["embeds"], encoder_hidden_states=text["hidden"],
                          attention_mask=text["mask"]).predicted_image_embedding
        if guided:
            uncond, cond = predicted.chunk(2)
            predicted = uncond + cfg_scale * (cond - uncond)
        options = {"prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None} if spaced else {}
        latents = scheduler.step(predicted, timestep=t, sample=latents, generator=scheduler_generator(generators),
                                 **options).prev_sample
        tick()
    return prior.post_process_latents(latents)
