"""Live preview: each step's predicted clean image (x0), and cheap ways to look at it.

The loop hands a :class:`StepPreview` to the ``preview`` callback of a generation after
every step. Its ``x0`` is the model's current guess of the finished latents, computed from
the (guided) model output with the model's own noise schedule, so it works for every
sampler. :meth:`StepPreview.image` turns it into pictures:

* ``"cheap"`` (A1111's "Approx cheap"): a linear map from latent channels to RGB. It is
  fitted once per model from the model's own VAE (random flat patches encoded), so it
  needs no table per family, and costs a matrix product per step. Where a VAE's latents
  are not linear in colour (the embedded toy model's are not), ``"auto"`` uses the VAE.
* ``"full"``: the model's VAE decoder (exact, and as slow as the final decode).
* a tiny autoencoder (TAESD and friends, diffusers' ``AutoencoderTiny``) when the caller
  loads one: ``preview.image(decoder=tiny)``; ``"auto"`` uses the one an adapter put on the
  model for the job (``model.preview_decoder``), if any.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from PIL import Image

    from aipaint.models.latent import LatentDiffusionModel

CHEAP_MAX_ERROR = 0.08
"""The most mean error (in [0, 1] colour) at which "auto" trusts the linear preview of a model."""
_fit_lock = threading.Lock()


class X0Estimator:
    """The clean-latent estimate from a model output at a timestep, for eps-, v- and sample-prediction."""

    def __init__(self, scheduler_config: dict[str, Any]) -> None:
        from diffusers import DDPMScheduler

        from aipaint.engine.plans import zero_snr_betas
        from aipaint.engine.samplers import is_flow_config

        # Flow matching (SD 3, FLUX): x_t = (1 - sigma) x0 + sigma noise, the output is the
        # velocity noise - x0, and the timestep is sigma * num_train_timesteps.
        self.flow_steps = float(scheduler_config.get("num_train_timesteps", 1000)) if is_flow_config(scheduler_config) else 0.0
        if self.flow_steps:
            self.prediction_type = "flow_prediction"
            return

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        config = {k: scheduler_config[k] for k in keys if k in scheduler_config}
        if scheduler_config.get("rescale_betas_zero_snr"):
            config["trained_betas"] = zero_snr_betas(scheduler_config)
        self.alphas_cumprod = DDPMScheduler.from_config(config).alphas_cumprod.double()
        self.prediction_type = str(scheduler_config.get("prediction_type", "epsilon"))

    def __call__(self, scaled_input: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``scaled_input`` is what the UNet saw (the variance-preserving x_t, whatever the sampler)."""
        position = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        if self.flow_steps:
            sigma = position / self.flow_steps
            return scaled_input[:, : output.shape[1]].float() - sigma * output.float()
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


@dataclass(frozen=True)
class LatentColourMap:
    """A linear map from a latent pixel (and 1) to the mean colour of the pixels it covers,
    and its mean error on held-out patches (how far a cheap preview can be trusted)."""

    matrix: torch.Tensor  # (channels + 1) × 3
    error: float


def latent_colour_map(model: LatentDiffusionModel) -> LatentColourMap:
    """The model's :class:`LatentColourMap`, fitted once per loaded model from its own VAE:
    images of random flat patches, one patch per latent pixel, are encoded, and each latent
    pixel is matched to its patch's colour by least squares (A1111 ships such tables for SD's
    VAEs; fitting makes one for any VAE). Deterministic: the patches come from a fixed seed."""
    with _fit_lock:
        found = getattr(model, "_latent_colour_map", None)
        if found is not None:
            return found
        factor = model.vae_scale_factor
        generator = torch.Generator().manual_seed(0)
        colours = torch.rand(20, 3, 8, 8, generator=generator)
        colours[:4] = (colours[:4] > 0.5).float()  # the corners of the colour cube, as flat patches
        images = colours.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
        with torch.inference_mode():
            latents = model.encode(images).float().cpu()

        def rows(x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

        features = torch.cat([rows(latents), torch.ones(latents.shape[0] * 64, 1)], dim=1)
        targets = rows(colours)
        fit, held = slice(0, 16 * 64), slice(16 * 64, None)
        matrix = torch.linalg.lstsq(features[fit], targets[fit]).solution
        error = float((features[held] @ matrix - targets[held]).abs().mean())
        found = LatentColourMap(matrix, error)
        model._latent_colour_map = found
        return found


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

    def image(self, method: str = "auto", *, decoder: Any = None, index: int = 0) -> Image.Image:
        """The ``index``-th picture of the estimate: ``"cheap"`` (a linear latent→RGB map at latent
        resolution, scaled up), ``"full"`` (the VAE), ``"auto"`` (cheap where the model's linear
        map reads its latents within :data:`CHEAP_MAX_ERROR`, else full), or ``decoder`` (a diffusers
        autoencoder returning [-1, 1] images: a tiny one, whose scaling factor is 1, reads the
        latents as the UNet sees them; one with the model's factor reads them unscaled). With
        ``"auto"`` and no ``decoder``, the model's ``preview_decoder`` (set by an adapter) is used."""
        from PIL import Image

        x0 = self.x0[index : index + 1]
        if decoder is None and method == "auto":
            decoder = getattr(self.model, "preview_decoder", None)
        if decoder is not None:
            config = getattr(decoder, "config", None)
            factor = float(getattr(config, "scaling_factor", self.model.scaling_factor))
            # SD 3's and FLUX's latents are (z - shift) * scale; their tiny decoders (TAESD3, TAEF1)
            # carry the same shift in their config, and read z.
            shift = float(getattr(config, "shift_factor", None) or 0.0)
            with torch.inference_mode():
                out = decoder.decode(x0.to(decoder.device, decoder.dtype) / factor + shift, return_dict=False)[0]
            return to_pictures((out.float() / 2 + 0.5).clamp(0, 1).cpu())[0]
        if method == "auto":
            method = "cheap" if latent_colour_map(self.model).error <= CHEAP_MAX_ERROR else "full"
        if method == "full":
            with torch.inference_mode():
                return to_pictures(self.model.decode(x0.to(self.model.device, self.model.dtype)))[0]
        if method != "cheap":
            from aipaint.errors import InvalidParameter

            raise InvalidParameter("preview method", method, "must be 'auto', 'cheap' or 'full' (or pass decoder=)")
        picture = to_pictures(cheap_rgb(x0, latent_colour_map(self.model).matrix))[0]
        factor = self.model.vae_scale_factor
        return picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.BILINEAR)
