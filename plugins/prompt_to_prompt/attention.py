"""Prompt-to-Prompt's attention control: one processor class on every attention layer of the UNet.

The source image (prompt A) and the edit (prompt B) denoise side by side as the two items of one
batch, from the same noise. The UNet is called with the rows ``[negative × 2, positive × 2]``
(``[positive × 2]`` at unguided steps), each row pair ``(source, edit)``. :class:`EditProcessor`
then, at every attention layer:

* gives the edit's positive row prompt B's text embedding (the loop conditions every item on A),
  and, from a null-text inversion, gives both negative rows that step's optimised null embedding;
* in cross-attention, during the first ``cross_steps`` of the run, replaces the edit's attention
  probabilities by the source's for the tokens the two prompts share (aligned word by word), keeps
  the edit's own for added words, and multiplies re-weighted words' columns;
* in self-attention, during the first ``self_steps``, replaces the edit's probabilities by the
  source's at layers with at most ``self_max_positions`` query positions (Hertz et al. inject
  self-attention at 16×16 and coarser).

Only the positive rows are edited, as in the authors' code, unless ``negative_rows`` asks to give
the edit's negative row the source's negative maps too (same text, token to token).
Imports torch: loaded when an edit runs.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from aipaint.engine.loop import LoopContributor
from aipaint.errors import InvalidParameter


@dataclass(frozen=True)
class TokenAlignment:
    """How prompt B's token positions map onto prompt A's.

    ``source_index[j]`` is the A position whose attention B's position ``j`` takes, and
    ``mapped[j]`` is 1 where B's position takes A's map (shared and swapped words, start and
    padding tokens) and 0 where B keeps its own (words a refinement added).
    """

    source_index: torch.Tensor
    mapped: torch.Tensor
    swapped: tuple[tuple[str, str], ...] = ()
    added: tuple[str, ...] = ()


def align_prompts(tokenizer: Any, source: str, target: str, length: int) -> TokenAlignment:
    """Align ``target``'s words with ``source``'s (difflib over the word lists).

    Equal words map token to token; a replaced run of as many words is a word swap (each new
    word takes the old word's map, spread over its tokens proportionally); any other replaced or
    inserted run keeps its own attention (refinement). Tokens outside words (start, end, padding)
    map to the same offset from the prompt's end, so the end token keeps the source's map.
    """
    from aipaint.explain.crossattn import prompt_words

    words_a, words_b = prompt_words(tokenizer, source), prompt_words(tokenizer, target)
    index = torch.arange(length)
    mapped = torch.ones(length)
    end_a = max((p for w in words_a for p in w.positions), default=0) + 1
    end_b = max((p for w in words_b for p in w.positions), default=0) + 1
    in_words_b = {p for w in words_b for p in w.positions}
    for j in range(length):
        if j not in in_words_b and j >= end_b:
            index[j] = min(max(j - end_b + end_a, 0), length - 1)
    swapped: list[tuple[str, str]] = []
    added: list[str] = []
    matcher = difflib.SequenceMatcher(a=[w.text.lower() for w in words_a], b=[w.text.lower() for w in words_b],
                                      autojunk=False)
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal" or (op == "replace" and a1 - a0 == b1 - b0):
            for wa, wb in zip(words_a[a0:a1], words_b[b0:b1], strict=True):
                for k, pos in enumerate(wb.positions):
                    if pos < length:
                        index[pos] = wa.positions[min(k * len(wa.positions) // len(wb.positions), len(wa.positions) - 1)]
                if op == "replace":
                    swapped.append((wa.text, wb.text))
        elif op in ("replace", "insert"):
            for wb in words_b[b0:b1]:
                added.append(wb.text)
                for pos in wb.positions:
                    if pos < length:
                        mapped[pos] = 0.0
    return TokenAlignment(index.clamp(0, length - 1), mapped, tuple(swapped), tuple(added))


def word_weights(tokenizer: Any, target: str, reweight: Mapping[str, float], length: int) -> torch.Tensor:
    """A per-token factor for prompt B's positions: each re-weighted word's tokens get its factor."""
    from aipaint.explain.crossattn import prompt_words

    factors = torch.ones(length)
    words = prompt_words(tokenizer, target)
    for name, factor in reweight.items():
        hits = [w for w in words if w.text.lower() == name.lower()]
        if not hits:
            raise InvalidParameter("reweight", name, "must be a word of the edit's prompt",
                                   "words: " + ", ".join(dict.fromkeys(w.text for w in words)))
        for word in hits:
            for pos in word.positions:
                if pos < length:
                    factors[pos] = float(factor)
    return factors


@dataclass
class EditController:
    """What every :class:`EditProcessor` of one edit shares: the step in progress and the edit's data."""

    target_embeds: torch.Tensor  # 1 × L × D: prompt B's token embeddings
    alignment: TokenAlignment
    factors: torch.Tensor  # L: re-weighting of B's tokens
    total_steps: int
    cross_steps: float = 0.8
    self_steps: float = 0.4
    self_max_positions: int = 256
    null_embeds: torch.Tensor | None = None  # steps × L × D: a null-text inversion's per-step negatives
    negative_rows: bool = False  # also give the edit's negative row the source's negative maps
    step: int = 0
    guided: bool = True
    calls: dict[str, int] = field(default_factory=lambda: {"cross": 0, "self": 0, "cross_edited": 0, "self_edited": 0})

    def in_cross_range(self) -> bool:
        return self.step < self.cross_steps * self.total_steps

    def in_self_range(self) -> bool:
        return self.step < self.self_steps * self.total_steps

    def rows(self, n: int) -> tuple[list[int], int, int]:
        """``(negative rows, source positive row, edit positive row)`` of an ``n``-row UNet call."""
        if n == 4 and self.guided:
            return [0, 1], 2, 3
        if n == 2 and not self.guided:
            return [], 0, 1
        raise InvalidParameter("batch", n, "a Prompt-to-Prompt edit runs two items (source and edit) with one "
                               "positive prompt; AND-ed prompts are not supported")

    def text_rows(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The call's text embeddings with the edit's positive row on prompt B, and the negative rows
        on the inversion's null embedding of this step."""
        negatives, _source, edit = self.rows(encoder_hidden_states.shape[0])
        rows = list(encoder_hidden_states.unbind(0))
        target = self.target_embeds[0].to(encoder_hidden_states)
        if target.shape != rows[edit].shape:
            raise InvalidParameter("target", tuple(target.shape), f"must encode to the source prompt's shape {tuple(rows[edit].shape)}",
                                   "keep both prompts under 75 tokens, or of the same number of 75-token chunks")
        rows[edit] = target
        if self.null_embeds is not None and negatives:
            null = self.null_embeds[min(self.step, self.null_embeds.shape[0] - 1)].to(encoder_hidden_states)
            for r in negatives:
                rows[r] = null
        return torch.stack(rows)

    def edit_cross(self, probs: torch.Tensor) -> torch.Tensor:
        """``probs``: batch × heads × queries × tokens. The edit's positive row, edited."""
        self.calls["cross"] += 1
        _negatives, source, edit = self.rows(probs.shape[0])
        reweighted = not bool(torch.all(self.factors == 1))
        if not self.in_cross_range():
            return probs
        self.calls["cross_edited"] += 1
        out = probs.clone()
        if self.negative_rows and _negatives:
            out[_negatives[1]] = probs[_negatives[0]]  # the same (null) text: token to token
        index = self.alignment.source_index.to(probs.device)
        mapped = self.alignment.mapped.to(probs)
        taken = probs[source].index_select(-1, index)
        new = taken * mapped + probs[edit] * (1 - mapped)
        if reweighted:
            new = new * self.factors.to(probs)
        out[edit] = new
        return out

    def edit_self(self, probs: torch.Tensor) -> torch.Tensor:
        self.calls["self"] += 1
        if not self.in_self_range() or probs.shape[-2] > self.self_max_positions:
            return probs
        self.calls["self_edited"] += 1
        negatives, source, edit = self.rows(probs.shape[0])
        out = probs.clone()
        out[edit] = probs[source]
        if self.negative_rows and negatives:
            out[negatives[1]] = probs[negatives[0]]
        return out


class EditProcessor:
    """A diffusers attention processor that computes attention as ``AttnProcessor`` does and lets
    an :class:`EditController` change the text rows and the probabilities before they are used."""

    def __init__(self, controller: EditController, name: str) -> None:
        self.controller = controller
        self.name = name

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        controller = self.controller
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        if is_cross:
            encoder_hidden_states = controller.text_rows(encoder_hidden_states)
        batch_size, sequence_length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        query = attn.head_to_batch_dim(query)
        probs = attn.get_attention_scores(query, key, attention_mask)
        rows = probs.shape[0] // attn.heads
        shaped = probs.view(rows, attn.heads, probs.shape[1], probs.shape[2])
        shaped = controller.edit_cross(shaped) if is_cross else controller.edit_self(shaped)
        hidden_states = torch.bmm(shaped.reshape_as(probs).to(value.dtype), value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class StepTracker(LoopContributor):
    """Tells the controller which step the loop is at and whether the call carries negative rows."""

    def __init__(self, controller: EditController) -> None:
        self.controller = controller

    def before_call(self, step: int, guided: bool) -> None:
        self.controller.step = step
        self.controller.guided = guided


def install_processors(unet: torch.nn.Module, controller: EditController) -> dict[str, Any]:
    """Put an :class:`EditProcessor` on every attention layer of ``unet``; returns the processors
    it had, for :func:`restore_processors`."""
    originals = dict(unet.attn_processors)
    unet.set_attn_processor({name: EditProcessor(controller, name) for name in originals})
    return originals


def restore_processors(unet: torch.nn.Module, originals: dict[str, Any]) -> None:
    unet.set_attn_processor(originals)
