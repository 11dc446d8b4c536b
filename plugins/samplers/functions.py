"""Function-style samplers (k-diffusion's calling convention).

``fn(denoiser, x, sigmas, *, noise_sampler, callback)``: ``denoiser(x, sigma)`` returns
the model's estimate of the clean latents; ``callback({"i", "x", "sigma", "denoised"})``
is called after each step with the updated ``x`` (the loop may modify it in place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a sampler runs, so registering stays quick
    import torch


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigma to step down to, and the noise to add back, for an ancestral step."""
    import torch

    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sample_dpmpp_2s_ancestral(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise_sampler: Callable[[Any, Any], torch.Tensor],
    callback: Callable[[dict[str, Any]], None] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) with ancestral noise (Lu et al. 2022; k-diffusion's formulation)."""
    import torch


    def sigma_fn(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def t_fn(sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log().neg()

    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - torch.expm1(-h * 0.5) * denoised
            denoised_2 = denoiser(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - torch.expm1(-h) * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x


def sample_euler_ancestral_cfg_pp(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise_sampler: Callable[[Any, Any], torch.Tensor],
    callback: Callable[[dict[str, Any]], None] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral with CFG++ (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free
    Guidance"), as ComfyUI's ``euler_ancestral_cfg_pp``: the step starts from the guided clean
    estimate and re-noises along the *unconditional* prediction's direction,
    ``x = denoised + (x - uncond_denoised) / sigma * sigma_down``, instead of the guided one.

    Needs ``denoiser.unconditional`` (the sampler is registered with ``needs_unconditional``).
    CFG++ wants low CFG scales (about 0.5-2 where plain Euler wants 5-8)."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        unconditional = getattr(denoiser, "unconditional", denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = denoised + (x - unconditional) / sigmas[i] * sigma_down
        if sigmas[i + 1] > 0 and eta:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x


def sample_euler_cfg_pp(
    denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise_sampler: Callable[[Any, Any], torch.Tensor],
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> torch.Tensor:
    """Euler with CFG++ (ComfyUI's ``euler_cfg_pp``): ``x = denoised + (x - uncond_denoised) /
    sigma * sigma_next``; deterministic (no noise is drawn)."""
    return sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback,
                                         eta=0.0, s_noise=0.0)
