"""The forward process: an image noised to chosen timesteps under the model's own noise schedule.

The image is encoded by the model's VAE to latents ``x0``; one seeded noise ``eps`` is drawn,
and for each timestep ``t`` the latents become ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``
(the scheduler's ``add_noise``), which the VAE decodes for the picture. Under each frame: the
signal-to-noise ratio ``alpha_bar_t / (1 - alpha_bar_t)``, how much of the picture is left.
The schedule is the model's (its betas, and zero terminal SNR where it was trained so: then
the last timestep is pure noise).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aipaint.errors import InvalidParameter
from aipaint.explain.common import MAX_COLUMNS, ExplainResult, decode, latent_model

if TYPE_CHECKING:
    from aipaint.pipeline import Pipeline

DEFAULT_TIMESTEPS = (0, 100, 250, 400, 550, 700, 850, 999)


def noise_scheduler(scheduler_config: dict[str, Any]) -> Any:
    """The model's training noise schedule as a diffusers ``DDPMScheduler`` (whose ``add_noise``
    is the forward process the model was trained on)."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr", "prediction_type")
    return DDPMScheduler.from_config({k: scheduler_config[k] for k in keys if k in scheduler_config})


def snr_text(snr: float) -> str:
    if snr == 0:
        return "SNR 0"
    if snr >= 1000 or snr < 0.01:
        return f"SNR {snr:.1e}".replace("e+0", "e").replace("e-0", "e-")
    return f"SNR {snr:.3g}"


def noise(
    pipe: Pipeline,
    image: Any,
    *,
    timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    width: int | None = None,
    height: int | None = None,
    cell: int = 128,
) -> ExplainResult:
    """``image`` (PIL image, array or path) under the forward process at ``timesteps``.

    Returns an :class:`ExplainResult` whose ``images["noised"]`` are the decoded ``x_t`` and whose
    ``data`` holds ``timesteps``, ``clean_latents`` (1 × C × h × w), ``noise`` (the same shape),
    ``latents`` (T × C × h × w, each ``add_noise(clean_latents, noise, t)``), ``alpha_bar``
    and ``snr`` at each timestep, and the whole schedule's ``alphas_cumprod``. The image is
    resized to ``width`` × ``height`` (default: the model's size).
    """
    from aipaint import imageutil
    from aipaint.api.request import MAX_SEED
    from aipaint.explain import drawing

    model = latent_model(pipe)
    scheduler = noise_scheduler(model.scheduler_config)
    train_steps = int(scheduler.config.num_train_timesteps)
    chosen = _check_timesteps(timesteps, train_steps)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidParameter("seed", seed, f"must be a whole number from 0 to {MAX_SEED}")
    factor = model.vae_scale_factor
    width = model.defaults.width if width is None else width
    height = model.defaults.height if height is None else height
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < factor or value % factor:
            raise InvalidParameter(name, value, f"must be a positive multiple of {factor} for this model")
    imageutil.check_pixels("width x height", width, height)
    picture = imageutil.resize_image(imageutil.load_image(image), width, height)
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        clean = model.encode(pixels).float().cpu()
    eps = torch.randn(clean.shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    t = torch.tensor(chosen, dtype=torch.long)
    latents = scheduler.add_noise(clean.repeat(len(chosen), 1, 1, 1), eps.repeat(len(chosen), 1, 1, 1), t)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    alpha_bar = alphas_cumprod[t].numpy()
    with np.errstate(divide="ignore"):
        snr = np.where(alpha_bar < 1, alpha_bar / np.maximum(1 - alpha_bar, 1e-300), np.inf)
    frames = [decode(model, latents[i : i + 1]) for i in range(len(chosen))]
    columns = [f"t {v}" for v in chosen]
    panel = drawing.line_plot(
        [("", list(range(train_steps)), _snr_curve(alphas_cumprod))],
        title="signal-to-noise ratio over the model's timesteps (log scale)", xlabel="timestep t",
        ylabel="SNR", log_y=True, markers=False, points=list(zip(chosen, snr.tolist())), size=(max(420, min(720, len(chosen) * (cell + 8))), 220),
    )
    sheet = drawing.contact_sheet(
        [("x_t decoded", [picture, *frames])],
        title=f"forward process of {model.name} (noise seed {seed})",
        captions=[["the image", *(f"t {v} · {snr_text(float(s))}" for v, s in zip(chosen, snr))]],
        cell=cell, panels=[panel],
        notes=["x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · noise, in the VAE's latent space, decoded for each frame",
               "SNR = ᾱ_t / (1 − ᾱ_t): the signal's power against the noise's; circles: the frames above"],
    )
    return ExplainResult(
        view="noise",
        images={"noised": frames},
        columns=columns,
        data={
            "timesteps": np.array(chosen),
            "clean_latents": clean.numpy(),
            "noise": eps.numpy(),
            "latents": latents.numpy(),
            "alpha_bar": alpha_bar,
            "snr": snr,
            "alphas_cumprod": alphas_cumprod.numpy(),
            "seed": seed,
        },
        sheet=sheet,
        plot=_plot,
    )


def _snr_curve(alphas_cumprod: torch.Tensor) -> list[float]:
    a = alphas_cumprod.numpy()
    return [float(x / (1 - x)) if 0 < x < 1 else float("nan") for x in a]


def _check_timesteps(timesteps: Sequence[int], train_steps: int) -> list[int]:
    try:
        values = list(timesteps)
    except TypeError:
        raise InvalidParameter("timesteps", timesteps, "must be a list of whole numbers") from None
    if not values or len(values) > MAX_COLUMNS:
        raise InvalidParameter("timesteps", values, f"give 1 to {MAX_COLUMNS} timesteps")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < train_steps:
            raise InvalidParameter("timesteps", value, f"timesteps are whole numbers from 0 to {train_steps - 1}")
    return sorted({int(v) for v in values})


def _plot(fig: Any, result: ExplainResult) -> None:
    data = result.data
    axes = fig.subplots(1, 2)
    a = data["alphas_cumprod"]
    t = np.arange(len(a))
    axes[0].plot(t, np.sqrt(a), label="√ᾱ (signal)")
    axes[0].plot(t, np.sqrt(1 - a), label="√(1 − ᾱ) (noise)")
    axes[0].set_xlabel("timestep t")
    axes[0].set_title("how much signal and noise x_t holds")
    axes[0].legend()
    with np.errstate(divide="ignore"):
        axes[1].semilogy(t, a / (1 - a))
    finite = np.isfinite(data["snr"]) & (data["snr"] > 0)
    axes[1].scatter(data["timesteps"][finite], data["snr"][finite], color="C3", zorder=3, label="shown frames")
    axes[1].set_xlabel("timestep t")
    axes[1].set_title("signal-to-noise ratio")
    axes[1].legend()
