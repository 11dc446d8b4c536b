"""What both unCLIP families (Karlo; Stable unCLIP) do the same way: check parameters, encode
text for a prior, run the prior, encode input images with CLIP, and blend 2-5 images'
embeddings (Midjourney's ``/blend``).

Randomness comes from one CPU generator per image (seed + i), drawn in diffusers' order, so
the numbers match diffusers' pipelines given the same generators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from aipaint.errors import ImageError, InvalidParameter

BLEND_RANGE = (2, 5)  # Midjourney's /blend takes 2 to 5 images
MIN_UNCLIP_STEPS = 2  # unCLIP's scheduler spaces its timesteps over steps - 1 intervals: one step is undefined
Tick = Callable[[], None]


def check_int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidParameter(name, value, f"must be a whole number from {lo} to {hi}")


def check_number(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidParameter(name, value, f"must be a number from {lo} to {hi}")


def check_blend(images: Sequence[Any], weights: Sequence[Any]) -> None:
    """A blend takes 2 to 5 images and one non-negative weight per image, not all zero."""
    lo, hi = BLEND_RANGE
    if not lo <= len(images) <= hi:
        raise InvalidParameter("images", f"{len(images)} images", f"a blend takes {lo} to {hi} images")
    if len(weights) != len(images):
        raise InvalidParameter("weights", list(weights), f"must give one weight per image ({len(images)})")
    for w in weights:
        check_number("weights", w, 0.0, 1e6)
    if sum(weights) <= 0:
        raise InvalidParameter("weights", list(weights), "must not all be zero")


# --- randomness and schedulers ------------------------------------------------------------------
def draw_noise(shape: Sequence[int], generators: list[torch.Generator]) -> torch.Tensor:
    """One ``shape`` draw per image, each from that image's generator."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])


def make_scheduler(config: dict[str, Any]) -> Any:
    import diffusers

    return getattr(diffusers, config["_class_name"]).from_config(config)


def generator_arg(generators: list[torch.Generator]) -> Any:
    return generators if len(generators) > 1 else generators[0]


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
def image_embedding(feature_extractor: Any, image_encoder: torch.nn.Module, images: Sequence[Any],
                    weights: Sequence[float] | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The CLIP image embedding (``[1, dim]``) of one image, or the blend of several with ``weights``."""
    from aipaint.imageutil import load_image

    pictures = [load_image(image, what=f"image {i + 1}") for i, image in enumerate(images)]
    if any(min(p.size) < 1 for p in pictures):
        raise ImageError("an input image is empty")
    pixels = feature_extractor(images=pictures, return_tensors="pt").pixel_values
    embeddings = image_encoder(pixels.to(device, dtype)).image_embeds
    if weights is not None:
        return blend_embeddings(embeddings, weights)[None]
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
              cfg_scale: float, guided: bool, generators: list[torch.Generator], tick: Tick) -> torch.Tensor:
    """Denoise one CLIP image embedding per image from text features (``[batch, dim]``)."""
    from diffusers import UnCLIPScheduler

    device = text["embeds"].device
    scheduler = make_scheduler(scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    timesteps = scheduler.timesteps
    # unCLIP's own scheduler must be told the previous timestep (Karlo's pipeline does so); others know it.
    spaced = isinstance(scheduler, UnCLIPScheduler)
    latents = (draw_noise((prior.config.embedding_dim,), generators) * scheduler.init_noise_sigma).to(device, prior.dtype)
    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        predicted = prior(model_input, timestep=t, proj_embedding=text["embeds"], encoder_hidden_states=text["hidden"],
                          attention_mask=text["mask"]).predicted_image_embedding
        if guided:
            uncond, cond = predicted.chunk(2)
            predicted = uncond + cfg_scale * (cond - uncond)
        options = {"prev_timestep": timesteps[i + 1] if i + 1 < len(timesteps) else None} if spaced else {}
        latents = scheduler.step(predicted, timestep=t, sample=latents, generator=generator_arg(generators),
                                 **options).prev_sample
        tick()
    return prior.post_process_latents(latents)
