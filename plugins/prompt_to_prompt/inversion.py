"""DDIM inversion and null-text inversion (Mokady et al. 2023) of a real image under its caption.

1. The image is encoded by the VAE and run *up* the DDIM schedule, conditioned on the caption
   without guidance: ``x_{t_i}`` from ``x_{t_{i+1}}`` with the model's noise estimate at ``t_i``
   (the usual approximation). That gives the pivot trajectory ``x*_T … x*_0``.
2. Sampling back down from ``x*_T`` with classifier-free guidance drifts away from the pivots.
   Null-text optimisation fixes it per step: starting from the empty prompt's embedding, the
   unconditional embedding of step ``i`` is optimised (Adam, a few inner iterations) so that one
   guided DDIM step from the current latent lands on the pivot ``x*_{i+1}``; the latent then
   steps on with the optimised embedding. The per-step embeddings are what the paper saves.
3. Sampling down the same DDIM schedule, with the same CFG scale and guidance rescale, and those
   negative embeddings reconstructs the image; a Prompt-to-Prompt edit from the inversion runs the
   same loop with prompt B on the edit row.

The guided step here is the core loop's own combination (CFG, then guidance rescale) and the
DDIM sampler's scheduler's ``step``, so what is optimised is what the loop later runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.errors import InvalidParameter, UnsupportedFeature

if TYPE_CHECKING:
    from aipaint.pipeline import Pipeline

FORMAT = "aipaint-null-text-inversion/1"
SAMPLER = "DDIM"


@dataclass
class Inversion:
    """A saved inversion: the start latents, the per-step negatives (None: plain DDIM inversion)
    and what the loop must repeat to reconstruct the image."""

    latents: torch.Tensor  # 1 × C × h × w: x*_T
    null_embeds: torch.Tensor | None  # steps × L × D, or None for the empty prompt at every step
    caption: str
    steps: int
    cfg_scale: float
    guidance_rescale: float
    width: int
    height: int
    schedule: str
    timesteps: list[int]
    model: str = ""
    seconds: float = 0.0
    final_loss: float = 0.0

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file: the tensors and a JSON metadata entry."""
        from safetensors.torch import save_file

        tensors = {"latents": self.latents.detach().float().cpu().contiguous()}
        if self.null_embeds is not None:
            tensors["null_embeds"] = self.null_embeds.detach().float().cpu().contiguous()
        meta = {"format": FORMAT, "caption": self.caption, "steps": self.steps, "cfg_scale": self.cfg_scale,
                "guidance_rescale": self.guidance_rescale, "width": self.width, "height": self.height,
                "schedule": self.schedule, "sampler": SAMPLER, "timesteps": self.timesteps, "model": self.model,
                "seconds": round(self.seconds, 3), "final_loss": self.final_loss}
        path = Path(path)
        save_file(tensors, str(path), metadata={"aipaint": json.dumps(meta)})
        return path


def load_inversion(path: str | Path) -> Inversion:
    """Read an inversion written by :meth:`Inversion.save` (safetensors: no code is run)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InvalidParameter("inversion", str(path), "must be an existing .safetensors file written by `aipaint invert`")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("aipaint", "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors has its own error type for a bad header
        raise InvalidParameter("inversion", str(path), f"is not a readable inversion file ({exc})") from None
    if meta.get("format") != FORMAT or "latents" not in tensors:
        raise InvalidParameter("inversion", str(path), f"must be an inversion file ({FORMAT}) with latents")
    steps = int(meta["steps"])
    null = tensors.get("null_embeds")
    if null is not None and (null.dim() != 3 or null.shape[0] != steps):
        raise InvalidParameter("inversion", str(path), f"holds {tuple(null.shape)} null embeddings for {steps} steps")
    return Inversion(latents=tensors["latents"], null_embeds=null, caption=str(meta["caption"]), steps=steps,
                     cfg_scale=float(meta["cfg_scale"]), guidance_rescale=float(meta["guidance_rescale"]),
                     width=int(meta["width"]), height=int(meta["height"]), schedule=str(meta["schedule"]),
                     timesteps=[int(t) for t in meta["timesteps"]], model=str(meta.get("model", "")),
                     seconds=float(meta.get("seconds", 0.0)), final_loss=float(meta.get("final_loss", 0.0)))


@contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """No gradients for ``module``'s weights while the null embedding is optimised (restored after)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _DDIM:
    """The DDIM schedule the ``DDIM`` sampler runs, and its deterministic step both ways."""

    def __init__(self, pipe: Pipeline, steps: int, schedule: str) -> None:
        model = pipe.model
        plan = pipe.host.registry.samplers.get(SAMPLER).plan(model.scheduler_config, schedule, steps,
                                                               device=model.device, seeds=[0])
        self.scheduler = plan.scheduler
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        self.alphas = self.scheduler.alphas_cumprod.double()
        self.final = float(self.scheduler.final_alpha_cumprod)
        self.ratio = self.scheduler.config.num_train_timesteps // steps
        self.prediction = model.prediction_type

    def alpha(self, t: int) -> float:
        return float(self.alphas[t]) if t >= 0 else self.final

    def x0_eps(self, x: torch.Tensor, out: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean-latent and noise estimates from the model output at noise level ``a`` (ᾱ)."""
        sa, sb = a**0.5, (1 - a) ** 0.5
        if self.prediction == "v_prediction":
            return sa * x - sb * out, sa * out + sb * x
        if self.prediction == "epsilon":
            return (x - sb * out) / max(sa, 1e-8), out
        if self.prediction == "sample":
            return out, (x - sa * out) / max(sb, 1e-8)
        raise UnsupportedFeature(f"inversion knows epsilon, v_prediction and sample models, not {self.prediction!r}")

    def down(self, out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One sampling step from ``t``, exactly as the loop's DDIM scheduler takes it."""
        return self.scheduler.step(out, t, x, return_dict=False)[0]

    def up(self, out: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """One inversion step: ``x`` at the level below ``t`` to the level of ``t``, with the model's
        output at ``t`` read at ``t``'s level (DDIM inversion's approximation)."""
        a = self.alpha(t)
        x0, eps = self.x0_eps(x, out, a)
        return a**0.5 * x0 + (1 - a) ** 0.5 * eps


def _guided(negative: torch.Tensor, positive: torch.Tensor, cfg: float, rescale: float) -> torch.Tensor:
    from aipaint.engine.loop import rescale_guidance

    guided = negative + cfg * (positive - negative)
    return rescale_guidance(guided, positive, rescale) if rescale > 0 else guided


def invert(
    pipe: Pipeline,
    image: Any,
    caption: str,
    *,
    steps: int = 20,
    cfg_scale: float | None = None,
    guidance_rescale: float | None = None,
    null_text: bool = True,
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    schedule: str = "Automatic",
    progress: Callable[[int, int], None] | None = None,
) -> Inversion:
    """Invert ``image`` (a path, PIL image or array) under ``caption``; with ``null_text`` the
    per-step negatives are optimised (``inner_steps`` Adam iterations at most per step, stopping
    early as the paper does). CFG scale and guidance rescale default to the model's.
    ``progress(done, total)`` counts the inversion steps then the optimisation steps."""
    from aipaint import imageutil
    from aipaint.engine.run import job_lock
    from aipaint.models.latent import LatentDiffusionModel
    from aipaint.prompt import parse_prompt, prompt_at_step

    model = pipe.model
    if not isinstance(model, LatentDiffusionModel):
        raise UnsupportedFeature(f"{model.name}: null-text inversion needs a latent diffusion model")
    if model.runtime != "torch":
        raise UnsupportedFeature(f"null-text inversion back-propagates through the UNet: load {model.name} "
                                 f"on the torch runtime, not {model.runtime!r}")
    if not 1 <= steps <= 1000:
        raise InvalidParameter("steps", steps, "must be from 1 to 1000")
    if not 0 <= inner_steps <= 1000:
        raise InvalidParameter("inner_steps", inner_steps, "must be from 0 to 1000")
    if not 0 < learning_rate <= 1:
        raise InvalidParameter("learning_rate", learning_rate, "must be above 0 and at most 1")
    cfg = float(model.defaults.cfg_scale if cfg_scale is None else cfg_scale)
    rescale = float(model.defaults.guidance_rescale if guidance_rescale is None else guidance_rescale)
    if not 1.0 <= cfg <= 30.0:
        raise InvalidParameter("cfg_scale", cfg, "must be from 1 to 30 for an inversion")
    parts = prompt_at_step(parse_prompt(caption), 0, steps)
    if len(parts) != 1:
        raise UnsupportedFeature("an inversion's caption is one prompt: AND is not supported")
    started = time.perf_counter()
    picture = imageutil.load_image(image, "image").convert("RGB")
    factor = model.vae_scale_factor
    width, height = picture.width - picture.width % factor, picture.height - picture.height % factor
    if (width, height) != picture.size:
        raise InvalidParameter("image", f"{picture.width}x{picture.height}", f"must have sides that are multiples of {factor}")
    import numpy as np

    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    ddim = _DDIM(pipe, steps, schedule)
    total = steps * (2 if null_text else 1)
    from aipaint.api.request import GenerationRequest
    from aipaint.models.latent import Conditioning

    request = GenerationRequest(prompt=caption, steps=steps, cfg_scale=cfg, sampler=SAMPLER, schedule=schedule, seed=0,
                                width=width, height=height, guidance_rescale=rescale).with_defaults(model.defaults)
    with job_lock(model), torch.inference_mode():
        clean = model.encode(pixels)
        cond, empty = model.encode_texts([parts[0][0], ""], 1, request.emphasis)
        cond = model.request_conditioning(cond, text=parts[0][0], negative=False, request=request)
        empty = model.request_conditioning(empty, text="", negative=True, request=request)
        # 1. DDIM inversion under the caption, unguided: the pivots x*_0 … x*_T.
        pivots = [clean]
        x = clean
        for i, t in enumerate(reversed(ddim.timesteps)):
            out = model.predict(x, torch.tensor(t, device=model.device), cond).float()
            x = ddim.up(out, t, x.float()).to(model.dtype)
            pivots.append(x)
            if progress is not None:
                progress(i + 1, total)
    pivots = pivots[::-1]  # pivots[i] is the latent before sampling step i; pivots[-1] is clean
    pivots = [p.clone() for p in pivots]  # out of inference mode, for autograd
    if not null_text:
        inv = Inversion(pivots[0], None, caption, steps, cfg, rescale, width, height, schedule, ddim.timesteps,
                        model.name, time.perf_counter() - started)
        return inv
    # 2. Null-text optimisation, step by step down the schedule.
    cond = Conditioning(cond.embeds.clone(), {k: v.clone() for k, v in cond.extras.items()})
    extras = {k: v.clone() for k, v in empty.extras.items()}
    null = empty.embeds.clone().float()
    nulls: list[torch.Tensor] = []
    x = pivots[0]
    loss_value = 0.0
    with job_lock(model), frozen(model.unet):
        for i, t in enumerate(ddim.timesteps):
            tt = torch.tensor(t, device=model.device)
            with torch.no_grad():
                positive = model.predict(x, tt, cond).float()
            null = null.detach().requires_grad_(True)
            optimiser = torch.optim.Adam([null], lr=learning_rate * (1.0 - i / 100.0) if i < 100 else learning_rate * 0.01)
            target = pivots[i + 1].float()
            threshold = 1e-5 + i * 2e-5
            for _ in range(inner_steps):
                with torch.enable_grad():
                    negative = model.predict(x, tt, Conditioning(null.to(model.dtype), extras)).float()
                    stepped = ddim.down(_guided(negative, positive, cfg, rescale), t, x.float())
                    loss = torch.nn.functional.mse_loss(stepped, target)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                loss_value = float(loss.detach())
                if loss_value < threshold:
                    break
            null = null.detach()
            nulls.append(null[0].clone())
            with torch.no_grad():
                negative = model.predict(x, tt, Conditioning(null.to(model.dtype), extras)).float()
                x = ddim.down(_guided(negative, positive, cfg, rescale), t, x.float()).to(model.dtype)
            if progress is not None:
                progress(steps + i + 1, total)
    return Inversion(pivots[0], torch.stack(nulls), caption, steps, cfg, rescale, width, height, schedule,
                     ddim.timesteps, model.name, time.perf_counter() - started, loss_value)
