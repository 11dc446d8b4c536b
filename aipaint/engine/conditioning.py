"""The conditioning of every step: the prompts parsed once, each distinct text encoded once.

Prompt editing (``[a:b:0.5]``), alternation (``[a|b]``) and ``AND`` make the text in force
change from step to step; :func:`conditioning_schedule` returns ``conditioning_at(step)``,
which resolves the texts of a step, encodes the ones not seen yet, and lets the model add
what depends on the request rather than the text (SDXL's size conditioning).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aipaint.engine.loop import StepConditioning

if TYPE_CHECKING:
    from aipaint.api.request import GenerationRequest
    from aipaint.models.latent import Conditioning, LatentDiffusionModel
    from aipaint.prompt import ParsedPrompt


def parse_prompts(request: GenerationRequest, *, stacklevel: int = 3) -> tuple[ParsedPrompt, ParsedPrompt]:
    """The request's prompt and negative prompt parsed; what the parser kept as text is said."""
    from aipaint.prompt import PromptWarning, parse_negative_prompt, parse_prompt

    parsed = parse_prompt(request.prompt)
    negative = parse_negative_prompt(request.negative_prompt)
    for message in (*parsed.warnings, *negative.warnings):
        warnings.warn(f"aipaint: {message}", PromptWarning, stacklevel=stacklevel)
    return parsed, negative


def conditioning_schedule(
    model: LatentDiffusionModel,
    parsed: ParsedPrompt,
    negative: ParsedPrompt,
    request: GenerationRequest,
    rewrite: Callable[[str], str] | None = None,
) -> Callable[[int], StepConditioning]:
    """``conditioning_at(step)`` over ``request.steps`` steps. ``rewrite`` (from active adapters)
    changes each resolved text just before it is encoded. The first step is encoded at once,
    so errors surface before the loop."""
    from aipaint.prompt import prompt_at_step

    def encode_texts(texts: list[str]) -> list[Conditioning]:
        texts = [rewrite(t) for t in texts] if rewrite is not None else texts
        return model.encode_texts(texts, request.clip_skip, request.emphasis)

    steps = request.steps
    cache: dict[tuple[Any, ...], StepConditioning] = {}
    texts_cache: dict[str, Conditioning] = {}

    def encode(texts: list[str]) -> list[Conditioning]:
        missing = [t for t in dict.fromkeys(texts) if t not in texts_cache]
        if missing:
            for text, cond in zip(missing, encode_texts(missing), strict=True):
                texts_cache[text] = cond
        return [texts_cache[t] for t in texts]

    def conditioning_at(step: int) -> StepConditioning:
        positive_parts = prompt_at_step(parsed, step, steps) or (("", 1.0),)
        ((negative_text, _),) = prompt_at_step(negative, step, steps)  # a negative prompt is one text
        key = (positive_parts, negative_text)
        if key not in cache:
            texts = [t for t, _ in positive_parts] + [negative_text]
            conds = encode(texts)
            length = max(c.embeds.shape[1] for c in conds)
            if any(c.embeds.shape[1] != length for c in conds):  # pad to a common length by re-encoding
                texts_cache.clear()
                conds = encode_texts(texts)
                for text, cond in zip(texts, conds, strict=True):
                    texts_cache[text] = cond
            positives = [
                (model.request_conditioning(c, text=t, negative=False, request=request), w)
                for c, (t, w) in zip(conds[:-1], positive_parts, strict=True)
            ]
            negative_cond = model.request_conditioning(conds[-1], text=texts[-1], negative=True, request=request)
            cache[key] = StepConditioning(positives, negative_cond)
        return cache[key]

    conditioning_at(0)
    return conditioning_at
