"""Classifier-free guidance: one seed across CFG scales, and where guidance pushes.

At every step the model is asked twice: with the prompt (conditional) and with the negative
prompt (unconditional). CFG takes ``uncond + scale · (cond − uncond)``: the difference is the
direction the prompt adds, and the scale how far to go along it (scale 1: the conditional
prediction alone, no second call). The sheet shows, per scale, the image; how far it moved from
the lowest scale's image; and the size of ``cond − uncond`` over the image (in the model's
predicted clean latents, averaged over the steps), read from the UNet's own outputs by a
forward hook that is removed when the run ends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aipaint.errors import InvalidParameter
from aipaint.explain.common import (
    MAX_COLUMNS,
    ExplainResult,
    latent_model,
    parameters_text,
    run_watched,
    settled_request,
    torch_unet,
)

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.pipeline import Pipeline

DEFAULT_SCALES = (1.0, 3.0, 7.0, 12.0)


class GuidanceRecord:
    """Per UNet call with the negative prompt in the batch: the map (h × w) and the RMS of
    ``x0(cond) − x0(uncond)``, the AND parts' differences weighted as the loop weights them."""

    def __init__(self, scheduler_config: dict[str, Any], weights: Sequence[float]) -> None:
        from aipaint.engine.preview import X0Estimator

        self.estimate = X0Estimator(scheduler_config)
        self.weights = [float(w) for w in weights]
        self.maps: list[torch.Tensor] = []
        self.rms: list[float] = []
        self.step = 0
        self.steps: list[int] = []

    def advance(self, *_: Any) -> None:
        self.step += 1

    def add(self, sample: torch.Tensor, timestep: Any, output: torch.Tensor) -> None:
        parts = len(self.weights)
        if sample.shape[0] != parts + 1:  # no negative rows: CFG is off for this call (scale 1, skip early CFG)
            return
        t = timestep if isinstance(timestep, torch.Tensor) else torch.tensor(float(timestep))
        x0 = self.estimate(sample.float(), t.flatten()[:1].float(), output.float()).cpu()
        negative, positives = x0[:1], x0[1:]
        delta = sum(w * (p[None] - negative) for w, p in zip(self.weights, positives, strict=True)) / sum(self.weights)
        self.maps.append(delta[0].norm(dim=0))
        self.rms.append(float(delta.pow(2).mean().sqrt()))
        self.steps.append(self.step + 1)


@contextmanager
def record_guidance(unet: torch.nn.Module, record: GuidanceRecord) -> Iterator[GuidanceRecord]:
    """Feed every call of ``unet`` to ``record`` while the context is open (a forward hook, removed on exit)."""

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        out = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        with torch.no_grad():
            record.add(sample.detach(), timestep, out.detach())

    handle = unet.register_forward_hook(hook, with_kwargs=True)
    try:
        yield record
    finally:
        handle.remove()


def cfg(
    pipe: Pipeline,
    prompt: str | GenerationRequest,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    cell: int = 128,
    progress: Any = None,
    **params: Any,
) -> ExplainResult:
    """Generate ``prompt`` (with ``params``) at each CFG scale in ``scales``, with one seed.

    ``images``: ``images`` (the results), ``change`` (the per-pixel colour distance to the lowest
    scale's image) and ``guidance`` (heat maps of ``cond − uncond``; None at scale 1, which makes
    no unconditional call). ``data``: ``scales``, ``change`` (S × H × W, 0–1), ``guidance_maps``
    (S × h × w, latent units, NaN where there was no CFG), ``guidance_rms`` (per scale, one value
    per guided model call) and ``guidance_steps`` (the 1-based step of each).
    """
    from aipaint.api.request import CFG_RANGE
    from aipaint.engine.run import job_lock
    from aipaint.explain import drawing
    from aipaint.prompt import parse_prompt

    model = latent_model(pipe)
    unet = torch_unet(model, "cfg")
    chosen = _check_scales(scales, CFG_RANGE)
    base = settled_request(pipe, prompt, params)
    weights = [sub.weight for sub in parse_prompt(base.prompt).subprompts] or [1.0]
    images, maps, rms, steps_of, texts = [], [], [], [], []
    for scale in chosen:
        request = dataclasses.replace(base, cfg_scale=scale)
        record = GuidanceRecord(model.scheduler_config, weights)
        with job_lock(model), record_guidance(unet, record):
            result, _ = run_watched(pipe, request, record.advance, progress=progress)
        images.append(result.images[0])
        texts.append(parameters_text(result))
        maps.append(torch.stack(record.maps).mean(0).numpy() if record.maps else None)
        rms.append(np.array(record.rms))
        steps_of.append(np.array(record.steps))
    reference = np.asarray(images[0], dtype=np.float32) / 255.0
    change = np.stack([np.linalg.norm(np.asarray(im, dtype=np.float32) / 255.0 - reference, axis=2) / np.sqrt(3)
                       for im in images])
    shape = next((m.shape for m in maps if m is not None), (images[0].height // model.vae_scale_factor,
                                                           images[0].width // model.vae_scale_factor))
    guidance_maps = np.stack([m if m is not None else np.full(shape, np.nan, dtype=np.float32) for m in maps])
    top_change = float(change.max()) or 1.0
    top_guidance = float(np.nanmax(guidance_maps)) if np.isfinite(guidance_maps).any() else 1.0
    change_row = [drawing.heatmap(c, images[0].size, vmax=top_change) for c in change]
    guidance_row = [None if m is None else drawing.heatmap(m, images[0].size, vmax=top_guidance) for m in maps]
    labels = [f"CFG {s:g}" for s in chosen]
    panel = drawing.line_plot(
        [(label, list(s), list(r)) for label, s, r in zip(labels, steps_of, rms, strict=True) if len(r)],
        title="size of cond − uncond at each step (RMS, in predicted x0)", xlabel="step",
        ylabel="RMS", size=(520, 220),
    )
    sheet = drawing.contact_sheet(
        [("image", images), (f"change from CFG {chosen[0]:g}", change_row), ("cond − uncond", guidance_row)],
        title=f"classifier-free guidance: {base.prompt}", columns=labels,
        captions=[[""] * len(chosen), [f"mean {c.mean():.3f}" for c in change],
                  ["no CFG call" if m is None else f"mean {m.mean():.3f}" for m in maps]],
        cell=cell, panels=[panel],
        notes=[f"{base.sampler}, {base.steps} steps, seed {base.seed}, guidance rescale {base.guidance_rescale}, "
               f"{model.name}",
               "guided = uncond + scale·(cond − uncond); the heat maps share one scale per row (bright: more)"],
    )
    return ExplainResult(
        view="cfg",
        images={"images": images, "change": change_row, "guidance": guidance_row},
        columns=labels,
        data={"scales": np.array(chosen), "change": change, "guidance_maps": guidance_maps,
              "guidance_rms": rms, "guidance_steps": steps_of, "seed": base.seed, "request": base},
        sheet=sheet,
        plot=_plot,
        parameters=texts[0],
    )


def _check_scales(scales: Sequence[float], bounds: tuple[float, float]) -> list[float]:
    try:
        values = list(scales)
    except TypeError:
        raise InvalidParameter("scales", scales, "must be a list of numbers") from None
    if not values or len(values) > MAX_COLUMNS:
        raise InvalidParameter("scales", values, f"give 1 to {MAX_COLUMNS} CFG scales")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not bounds[0] <= value <= bounds[1]:
            raise InvalidParameter("scales", value, f"CFG scales are numbers from {bounds[0]:g} to {bounds[1]:g}")
    return sorted({float(v) for v in values})


def _plot(fig: Any, result: ExplainResult) -> None:
    data = result.data
    axes = fig.subplots(1, 2)
    for scale, steps, rms in zip(data["scales"], data["guidance_steps"], data["guidance_rms"], strict=True):
        if len(rms):
            axes[0].plot(steps, rms, marker="o", markersize=3, label=f"CFG {scale:g}")
    axes[0].set_xlabel("step")
    axes[0].set_title("size of cond − uncond (x0 RMS)")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    axes[1].plot(data["scales"], data["change"].mean(axis=(1, 2)), marker="o")
    axes[1].set_xlabel("CFG scale")
    axes[1].set_title(f"mean change from CFG {data['scales'][0]:g}")
