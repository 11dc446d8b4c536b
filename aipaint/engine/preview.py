"""Live preview: each step's predicted clean image (x0), and cheap ways to look at it.

The loop hands a :class:`StepPreview` to the ``preview`` callback of a generation after
every step. Its ``x0`` is the model's current guess of the finished latents, computed from
the (guided) model output with the model's own noise schedule, so it works for every
sampler. :meth:`StepPreview.image` turns it into pictures:

* ``"cheap"`` (A1111's "Approx cheap"): a linear map from latent channels to RGB. It is
  fitted once per model from the model's own VAE (a handful of flat colours encoded), so
  it needs no table per family, and costs a matrix product per step.
* ``"full"``: the model's VAE decoder (exact, and as slow as the final decode).
* a tiny autoencoder (TAESD and friends, diffusers' ``AutoencoderTiny``) when the caller
  loads one: ``preview.image(decoder=tiny)``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.models.latent import LatentDiffusionModel

# Flat colours whose VAE latents fit the cheap preview: the corners of the RGB cube and grey.
_FIT_COLOURS = [(r, g, b) for r in (0.0, 1.0) for g in (0.0, 1.0) for b in (0.0, 1.0)] + [(0.5, 0.5, 0.5)]
_fits: dict[int, torch.Tensor] = {}
_fits_lock = threading.Lock()


class X0Estimator:
    """The clean-latent estimate from a model output at a timestep, for eps-, v- and sample-prediction."""

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        from diffusers import DDPMScheduler

        from aipaint.engine.plans import zero_snr_betas

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        config = {k: scheduler_config[k] for k in keys if k in scheduler_config}
        if scheduler_config.get("rescale_betas_zero_snr"):
            config["trained_betas"] = zero_snr_betas(scheduler_config)
        self.alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod.double()
        self.prediction_type = str(scheduler_config.get("prediction_type", "epsilon"))

    def __call__(self, scaled_input: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``scaled_input`` is what the UNet saw (the variance-preserving x_t, whatever the sampler)."""
        position = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        last = len(self.alphas_cumprod) - 1
        low = min(max(int(position), 0), last)
        high = min(low + 1, last)
        frac = min(max(position - low, 0.0), 1.0)
        alpha = float(self.alphas_cumprod[low] * (1 - frac) + self.alphas_cumprod[high] * frac)
        a, s = alpha**0.5, (1 - alpha) ** 0.5
        x = scaled_input[:, : output.shape[1]].float()
        out = output.float()
        if self.prediction_type == "v_prediction":
            return a * x - s * out
        if self.prediction_type == "sample":
            return out
        return (x - s * out) / max(a, 1e-4)


def latent_rgb_map(model: LatentDiffusionModel) -> torch.Tensor:
    """The (channels + 1) × 3 least-squares map from a latent pixel (and 1) to its RGB in [0, 1],
    fitted once per loaded model from its VAE's latents of flat colours."""
    key = id(model)
    with _fits_lock:
        if key in _fits:
            return _fits[key]
    size = 8 * model.vae_scale_factor
    images = torch.tensor(_FIT_COLOURS, dtype=torch.float32)[:, :, None, None].expand(-1, -1, size, size)
    with torch.inference_mode():
        latents = model.encode(images.contiguous()).float().cpu()  # N × C × 8 × 8
    features = latents.mean(dim=(2, 3))
    features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
    targets = torch.tensor(_FIT_COLOURS, dtype=torch.float32)
    solution = torch.linalg.lstsq(features, targets).solution
    with _fits_lock:
        _fits[key] = solution
    return solution


def cheap_rgb(latents: torch.Tensor, mapping: torch.Tensor) -> torch.Tensor:
    """Latents (N × C × h × w) → RGB (N × 3 × h × w) in [0, 1] through a linear map."""
    x = latents.float().cpu()
    rgb = torch.einsum("nchw,cd->ndhw", x, mapping[:-1]) + mapping[-1][None, :, None, None]
    return rgb.clamp(0, 1)


def to_pictures(images: torch.Tensor) -> list[Image.Image]:
    """N × 3 × H × W in [0, 1] → PIL images."""
    from PIL import Image

    array = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


@dataclass
class StepPreview:
    """One step of a running generation, as the preview callback receives it."""

    step: int  # steps done, 1-based
    total: int
    latents: torch.Tensor  # the loop's latents after this step
    x0: torch.Tensor  # the model's current estimate of the finished latents
    model: LatentDiffusionModel

    def image(self, method: str = "cheap", *, decoder: Any = None, index: int = 0) -> Image.Image:
        """The ``index``-th picture of the estimate: ``"cheap"`` (a linear latent→RGB map at latent
        resolution, scaled up), ``"full"`` (the VAE), or ``decoder`` (e.g. a tiny autoencoder
        taking unscaled latents and returning [-1, 1] images)."""
        from PIL import Image

        x0 = self.x0[index : index + 1]
        if decoder is not None:
            with torch.inference_mode():
                out = decoder.decode(x0.to(decoder.device, decoder.dtype) / self.model.scaling_factor, return_dict=False)[0]
            return to_pictures((out.float() / 2 + 0.5).clamp(0, 1).cpu())[0]
        if method == "full":
            with torch.inference_mode():
                return to_pictures(self.model.decode(x0.to(self.model.device, self.model.dtype)))[0]
        if method != "cheap":
            from aipaint.errors import InvalidParameter

            raise InvalidParameter("preview method", method, "must be 'cheap' or 'full' (or pass decoder=)")
        picture = to_pictures(cheap_rgb(x0, latent_rgb_map(self.model)))[0]
        factor = self.model.vae_scale_factor
        return picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.BILINEAR)
