"""Running a Prompt-to-Prompt edit through the core's one ``generate``.

The edit is an ordinary generation of prompt A with two items: a mode (:class:`EditStart`) starts
both from the same latents (the seed's noise, or an inversion's ``x*_T``) and adds the loop
contributor that tells the processors which step runs; the processors are put on the UNet for
this job only, under the model's job lock. Adapters (LoRA weight patches, ControlNet residuals)
join the job as they join any other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.engine.modes import Mode, ModeStart, needs_inpaint_channels
from aipaint.errors import InvalidParameter, UnsupportedFeature

from .attention import (
    EditController,
    StepTracker,
    align_prompts,
    install_processors,
    restore_processors,
    word_weights,
)
from .inversion import SAMPLER, Inversion, load_inversion

if TYPE_CHECKING:
    from aipaint.api.result import Result
    from aipaint.pipeline import Pipeline

RECORDED_KEYS = ("P2P source prompt", "P2P cross steps", "P2P self steps", "P2P reweight", "P2P negative rows",
                 "P2P inversion")


def format_reweight(reweight: Mapping[str, float]) -> str:
    return " ".join(f"{word}={factor:g}" for word, factor in reweight.items())


def check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise InvalidParameter(name, value, "must be a fraction of the steps from 0 to 1")
    return value


def check_reweight(reweight: Mapping[str, float] | None) -> dict[str, float]:
    found: dict[str, float] = {}
    for word, factor in (reweight or {}).items():
        if not str(word).strip() or " " in str(word).strip():
            raise InvalidParameter("reweight", word, "must name one word of the edit's prompt")
        if not -10.0 <= float(factor) <= 10.0:
            raise InvalidParameter(f"reweight {word}", factor, "must be a factor from -10 to 10")
        found[str(word).strip()] = float(factor)
    return found


class EditStart(Mode):
    """Both items start from the same latents; the step tracker joins the loop."""

    def __init__(self, controller: EditController, inversion: Inversion | None, infotext: dict[str, str]) -> None:
        self.controller = controller
        self.inversion = inversion
        self.entries = infotext

    def capability(self, request: Any) -> str:
        return "txt2img"

    def begin(self, model, request, plan, noise):
        if needs_inpaint_channels(model):
            raise UnsupportedFeature(f"{model.name} is an inpainting model; Prompt-to-Prompt edits need an ordinary one")
        from .attention import EditProcessor

        others = sorted({type(p).__name__ for p in model.unet.attn_processors.values() if not isinstance(p, EditProcessor)})
        if others:  # an adapter of this job put its own processors on the UNet after ours
            raise UnsupportedFeature(f"Prompt-to-Prompt cannot be combined with an adapter that replaces the UNet's "
                                     f"attention processors ({', '.join(others)}); leave that adapter out of the edit")
        if self.inversion is not None:
            planned = [int(t) for t in getattr(getattr(plan, "scheduler", None), "timesteps", [])]
            if planned != self.inversion.timesteps:
                raise InvalidParameter("inversion", "timesteps", "do not match this model's DDIM schedule",
                                       "invert the image again with this model")
            start = self.inversion.latents.to(model.device, model.dtype)
            latents = torch.cat([start, start])
        else:
            latents = plan.initial_latents(torch.cat([noise[:1], noise[:1]])).to(model.device, model.dtype)
        return ModeStart(latents, 0, [StepTracker(self.controller)])

    def infotext(self, request: Any) -> dict[str, str]:
        return dict(self.entries)


def edit(
    pipe: Pipeline,
    prompt: str | None = None,
    target: str | None = None,
    *,
    cross_steps: float = 0.8,
    self_steps: float = 0.4,
    reweight: Mapping[str, float] | None = None,
    inversion: Inversion | str | Path | None = None,
    self_max_positions: int = 256,
    negative_rows: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **fields: Any,
) -> Result:
    """Generate ``prompt`` (A) and its edit ``target`` (B) side by side, B keeping A's layout.

    ``cross_steps`` and ``self_steps`` are the fractions of the steps (from the start) during
    which the edit takes the source's cross- and self-attention; ``reweight`` multiplies the
    attention of words of B (``{"red": 2.0}``); ``negative_rows`` also gives the edit's unconditional
    row the source's unconditional maps (the paper leaves that row alone). With ``inversion`` (an :class:`Inversion` or its
    file) the source is the inverted real image: the caption is the default A, and the steps, CFG
    scale, guidance rescale, size and the DDIM sampler are the inversion's. ``fields`` are
    :class:`aipaint.GenerationRequest` fields (seed, steps, cfg_scale, negative_prompt, adapters…).

    Returns a result whose ``images[0]`` is the edit and ``images[1]`` the source, each with its own
    PNG parameters (the edit's record the source prompt and the edit's settings).
    """
    from aipaint.api.request import GenerationRequest
    from aipaint.engine.run import generate, job_lock, settle
    from aipaint.infotext import Infotext
    from aipaint.models.latent import LatentDiffusionModel
    from aipaint.prompt import parse_prompt, prompt_at_step

    model = pipe.model
    if not isinstance(model, LatentDiffusionModel):
        raise UnsupportedFeature(f"{model.name}: Prompt-to-Prompt needs a latent diffusion model with a UNet")
    if model.runtime != "torch":
        raise UnsupportedFeature(f"Prompt-to-Prompt replaces the UNet's attention processors: load {model.name} "
                                 f"on the torch runtime, not {model.runtime!r}")
    cross_steps, self_steps = check_fraction("cross_steps", cross_steps), check_fraction("self_steps", self_steps)
    weights = check_reweight(reweight)
    if not 1 <= int(self_max_positions) <= 1 << 24:
        raise InvalidParameter("self_max_positions", self_max_positions, "must be a number of query positions from 1")
    inv: Inversion | None = None
    inversion_name = ""
    if inversion is not None:
        inv = inversion if isinstance(inversion, Inversion) else load_inversion(inversion)
        inversion_name = "" if isinstance(inversion, Inversion) else Path(inversion).name
        if inv.model and inv.model != model.name:
            raise InvalidParameter("inversion", inv.model, f"was made with another model than {model.name!r}")
        prompt = inv.caption if prompt is None else prompt
        fields = {**fields, "steps": inv.steps, "cfg_scale": inv.cfg_scale, "guidance_rescale": inv.guidance_rescale,
                  "sampler": SAMPLER, "schedule": inv.schedule, "width": inv.width, "height": inv.height,
                  "seed": int(fields.get("seed", 0)) if int(fields.get("seed", 0)) >= 0 else 0}
        if fields.get("negative_prompt"):
            raise InvalidParameter("negative_prompt", fields["negative_prompt"], "must be empty with an inversion",
                                   "its per-step null embeddings are the negative")
    if prompt is None:
        raise InvalidParameter("prompt", None, "must be given (the source prompt A), or come from an inversion")
    target = prompt if target is None else target
    if target == prompt and not weights and inv is None:
        raise InvalidParameter("target", target, "must differ from the source prompt, or come with a re-weighted word",
                               "(from an inversion, the caption itself reconstructs the image)")
    if fields.get("batch_size", 1) != 1:
        raise InvalidParameter("batch_size", fields["batch_size"], "must be 1: an edit runs the source and the edit as a pair")
    request = pipe.check(GenerationRequest(prompt=prompt, **{**fields, "batch_size": 2}))
    request = settle(model, request, host=pipe.host)
    texts = []
    for name, text in (("prompt", prompt), ("target", target)):
        parsed = parse_prompt(text)
        resolved = {prompt_at_step(parsed, s, request.steps) for s in range(request.steps)}
        if len(resolved) != 1 or len(next(iter(resolved))) != 1:
            raise UnsupportedFeature(f"the {name} of a Prompt-to-Prompt edit must be one text without AND, "
                                     "alternation or prompt editing ([a:b:when])")
        texts.append(next(iter(resolved))[0][0])
    embeds = model.encode_texts(texts, request.clip_skip, request.emphasis)
    length = embeds[1].embeds.shape[1]
    alignment = align_prompts(model.tokenizer, texts[0], texts[1], length)
    controller = EditController(
        target_embeds=embeds[1].embeds, alignment=alignment, factors=word_weights(model.tokenizer, texts[1], weights, length),
        total_steps=request.steps, cross_steps=cross_steps, self_steps=self_steps,
        self_max_positions=int(self_max_positions), null_embeds=None if inv is None else inv.null_embeds,
        negative_rows=bool(negative_rows),
    )
    entries = {"P2P source prompt": prompt, "P2P cross steps": f"{cross_steps:g}", "P2P self steps": f"{self_steps:g}"}
    if weights:
        entries["P2P reweight"] = format_reweight(weights)
    if negative_rows:
        entries["P2P negative rows"] = "True"
    if inv is not None:
        entries["P2P inversion"] = (inversion_name or "in memory") + (" (null-text)" if inv.null_embeds is not None else " (DDIM)")
    mode = EditStart(controller, inv, entries)
    with job_lock(model):
        originals = install_processors(model.unet, controller)
        try:
            result = generate(model, request, host=pipe.host, progress=progress, mode=mode)
        finally:
            restore_processors(model.unet, originals)
    seed = request.seeds[0]
    base = Infotext.from_text(result.infotexts[0])
    params = {k: v for k, v in base.params.items() if k not in RECORDED_KEYS}
    params["Seed"] = str(seed)
    edited = Infotext(target, base.negative_prompt, {**params, **{k: base.params[k] for k in RECORDED_KEYS
                                                                    if k in base.params}}).to_text()
    source = Infotext(prompt, base.negative_prompt, params).to_text()
    latents = None if result.latents is None else result.latents.flip(0)
    return dataclasses.replace(result, images=result.images[::-1], seeds=[seed, seed], infotexts=[edited, source],
                               latents=latents, request=dataclasses.replace(result.request, prompt=target))

