"""Which word paints where: the cross-attention of each prompt word over the image.

In every cross-attention layer of the UNet, each latent pixel spreads one unit of attention
over the prompt's token positions (a softmax). :func:`record_cross_attention` sets an
attention processor on each cross-attention layer of the real UNet that keeps those
probabilities (averaged over heads) for the conditional rows of the batch, then hands the
call on to the layer's own processor, so the picture is the same as without it; the original
processors come back when the context closes. :func:`attention` averages the maps over the
layers (each resized to the latent grid) and over the chosen steps, groups CLIP tokens into
the prompt's words (``red``, or ``polka</w>dots`` split by BPE), and overlays each word's map
on the result. Emphasis shows in the word's weight and its map; prompt editing
(``[red:blue:0.5]``) gives one row per text that was in force, each averaged over its own steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from aipaint.errors import InvalidParameter
from aipaint.explain.common import (
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


@dataclass
class CrossAttentionRecord:
    """What :func:`record_cross_attention` collects.

    ``maps[step]``: rows × T × h × w, the attention probabilities of the conditional rows of the
    UNet batch at that step, averaged over heads and summed over the recorded layers (each
    resized to the latent grid ``h × w``), and ``calls[step]`` how many layer calls were summed.
    ``step`` counts the loop's reports (0 until the first step is done); :meth:`advance` moves it.
    """

    latent_size: tuple[int, int]
    # The rows to keep: the last ``conditional_rows`` of each call's batch, which the loop lays out
    # as [negative (with CFG), positive part 1, …]; None keeps every row.
    conditional_rows: int | None = None
    steps: set[int] | None = None  # steps to record (None: all)
    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    layers: set[str] = field(default_factory=set)
    step: int = 0
    # With ``by_layer``, also ``layer_maps[(step, layer)]``: rows × T × g × g at the layer's own
    # grid, summed over the layer's calls in that step (what ``combine="standardised"`` reads).
    by_layer: bool = False
    layer_maps: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)

    def advance(self, *_: Any) -> None:
        self.step += 1

    def add(self, name: str, probs: torch.Tensor) -> None:
        """``probs``: batch × N × T (heads averaged) from layer ``name``, N a grid of the latent's shape."""
        if self.steps is not None and self.step not in self.steps:
            return
        if self.conditional_rows is not None:
            probs = probs[-self.conditional_rows :]
        probs = probs.float()
        h, w = self.latent_size
        n = probs.shape[1]
        factor = round((h * w / n) ** 0.5)
        grid = (max(1, h // factor), max(1, w // factor)) if factor > 0 else (h, w)
        if grid[0] * grid[1] != n:
            raise InvalidParameter("latent size", f"{h}x{w}", f"a cross-attention layer of {n} positions does not tile it")
        spatial = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], *grid)
        if self.by_layer:
            key = (self.step, name)
            native = spatial.cpu()
            self.layer_maps[key] = self.layer_maps[key] + native if key in self.layer_maps else native.clone()
        if grid != (h, w):
            # bilinear weights sum to one: each pixel's attention still sums to one over the tokens
            spatial = F.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=False)
        spatial = spatial.cpu()
        if self.step in self.maps and self.maps[self.step].shape == spatial.shape:
            self.maps[self.step] += spatial
            self.calls[self.step] += 1
        else:
            self.maps[self.step] = spatial.clone()
            self.calls[self.step] = 1
        self.layers.add(name)


class RecordingProcessor:
    """Wraps a cross-attention layer's processor: computes the attention probabilities of the
    call for the record, then returns what the wrapped processor returns."""

    def __init__(self, original: Any, record: CrossAttentionRecord, name: str) -> None:
        self.original = original
        self.record = record
        self.name = name

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if encoder_hidden_states is not None:
            with torch.no_grad():
                self.record.add(self.name, self.probabilities(attn, hidden_states, encoder_hidden_states,
                                                              attention_mask, temb))
        return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                             attention_mask=attention_mask, temb=temb, **kwargs)

    @staticmethod
    def probabilities(attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                      attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        """batch × N × T: softmax(QKᵀ·scale) over the tokens, averaged over heads (as diffusers'
        ``AttnProcessor`` computes it)."""
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if hidden_states.ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
        probs = attn.get_attention_scores(query, key, mask)
        return probs.view(batch, attn.heads, probs.shape[1], probs.shape[2]).mean(1)


ROW_CELLS = 8
"""Pictures per row of the attention sheet (the result, then the words; longer prompts wrap)."""

LAYER_CHOICES = ("all", "down", "mid", "up", "finest")
COMBINE_CHOICES = ("probability", "standardised")
"""How :func:`attention` combines the layers' maps of a word: ``probability`` averages the
attention probabilities (a word's map is its share of each pixel's attention); ``standardised``
first rescales each layer's map of the word to mean 0 and standard deviation 1 over the image,
so that every layer's picture of where the word goes counts the same, however much attention
the layer gives the word."""
"""Which cross-attention layers :func:`attention` averages: every one, the encoder's
(``down_blocks``), the middle block's, the decoder's (``up_blocks``), or ``finest``: the
decoder's layers at the latent grid's own resolution (the last up block's)."""


def cross_attention_layers(unet: torch.nn.Module, layers: str | Sequence[str] = "all") -> list[str]:
    """The processor names of ``unet``'s cross-attention layers that ``layers`` selects: one of
    :data:`LAYER_CHOICES`, or processor-name prefixes (e.g. ``["up_blocks.2"]``)."""
    names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    if not names:
        raise InvalidParameter("unet", type(unet).__name__, "has no cross-attention layers (attn2) to record")
    if isinstance(layers, str):
        if layers not in LAYER_CHOICES:
            raise InvalidParameter("layers", layers, "must be one of " + ", ".join(LAYER_CHOICES) + " or name prefixes")
        if layers == "all":
            return names
        if layers == "finest":
            decoder = [n for n in names if n.startswith("up_blocks.")]
            last = max((int(n.split(".")[1]) for n in decoder), default=None)
            return [n for n in decoder if int(n.split(".")[1]) == last]
        prefix = {"down": "down_blocks.", "mid": "mid_block.", "up": "up_blocks."}[layers]
        chosen = [n for n in names if n.startswith(prefix)]
    else:
        prefixes = [str(p) for p in layers]
        chosen = [n for n in names if any(n.startswith(p) for p in prefixes)]
    if not chosen:
        raise InvalidParameter("layers", layers, "selects no cross-attention layer of this UNet",
                               f"its layers: {', '.join(n.removesuffix('.processor') for n in names)}")
    return chosen


@contextmanager
def record_cross_attention(unet: torch.nn.Module, record: CrossAttentionRecord,
                           layers: str | Sequence[str] = "all") -> Iterator[CrossAttentionRecord]:
    """Record the cross-attention probabilities of ``unet``'s calls into ``record`` while the
    context is open, from the ``layers`` :func:`cross_attention_layers` selects; the UNet's own
    processors are put back when it closes (also on errors). Hold the model's job lock around
    it (:func:`aipaint.engine.run.job_lock`) when other threads may run jobs on the same model."""
    crossing = set(cross_attention_layers(unet, layers))
    originals = dict(unet.attn_processors)
    replaced = {name: RecordingProcessor(p, record, name) if name in crossing else p for name, p in originals.items()}
    unet.set_attn_processor(replaced)
    try:
        yield record
    finally:
        unet.set_attn_processor(originals)


@dataclass(frozen=True)
class Word:
    """A prompt word: its text, emphasis weight and token positions in the encoder's sequence."""

    text: str
    weight: float
    positions: tuple[int, ...]

    @property
    def label(self) -> str:
        return self.text if self.weight == 1.0 else f"{self.text} ×{self.weight:g}"


def prompt_words(tokenizer: Any, text: str) -> list[Word]:
    """The words of one resolved prompt text (emphasis syntax allowed) with their token positions,
    as :func:`aipaint.prompt.tokenize_chunks` lays them out (chunk ``c`` starts at ``77·c``, after BOS)."""
    from aipaint.prompt import tokenize_chunks

    words: list[Word] = []
    for c, chunk in enumerate(tokenize_chunks(tokenizer, text)):
        start = c * len(chunk.tokens)
        pieces: list[str] = []
        positions: list[int] = []
        weight = 1.0
        ids = chunk.tokens[1 : 1 + chunk.length]
        for j, token in enumerate(tokenizer.convert_ids_to_tokens(ids)):
            if not pieces:
                weight = chunk.weights[1 + j]
            pieces.append(token.removesuffix("</w>"))
            positions.append(start + 1 + j)
            if token.endswith("</w>") or j == len(ids) - 1:
                words.append(Word("".join(pieces), float(weight), tuple(positions)))
                pieces, positions = [], []
    return words


STOP_WORDS = frozenset("a an the on in at of to and or with by for from is are its it this that".split())
"""Words the attention sheet leaves out unless asked for (``words="all"``): their maps are in the data."""


def _shown(word: Word, wanted: set[str] | None) -> bool:
    if wanted is None:
        return any(ch.isalnum() for ch in word.text) and word.text.lower() not in STOP_WORDS
    return "all" in wanted and any(ch.isalnum() for ch in word.text) or word.text.lower() in wanted


def attention(
    pipe: Pipeline,
    prompt: str | GenerationRequest | Sequence[str],
    *,
    at: Sequence[int] | None = None,
    layers: str | Sequence[str] = "auto",
    combine: str = "auto",
    words: str | Sequence[str] | None = None,
    cell: int = 128,
    progress: Any = None,
    **params: Any,
) -> ExplainResult:
    """Generate ``prompt`` (with ``params``) and map each word's cross-attention over the image.

    ``prompt`` may be a list of prompts, run with the same seed and settings, to compare them
    (``a red circle`` against ``a (red:1.5) circle``). ``at``: the 1-based steps to average over
    (default: all). ``layers``: the cross-attention layers to average (see :data:`LAYER_CHOICES`,
    or name prefixes); ``combine``: how (see :data:`COMBINE_CHOICES`). ``"auto"`` for either takes
    what the model's zoo card names under ``explain.attention`` (the layers that locate objects
    best on that model, measured), else ``"up"`` (the decoder's layers) and ``"probability"``. ``words``: the words the sheet shows (default: those with a letter or
    digit, less :data:`STOP_WORDS`; ``"all"``: every one); ``data`` has every word's map.

    ``data["runs"]`` holds one entry per prompt, each with ``phases``: one per text in force (prompt
    editing makes several), with ``text``, ``steps`` (1-based), ``token_maps`` (T × h × w at the
    latent grid: each pixel's attention over all T token positions, summing to 1), ``words``
    (:class:`Word`), ``word_maps`` (W × H × W' at the image's size, each the sum of its tokens'
    maps) and ``peaks`` ((x, y) in pixels of each word's maximum). ``images["result"]`` holds each
    run's image and ``images[text]`` the overlays of a phase.
    """
    from aipaint.engine.run import job_lock
    from aipaint.explain import drawing
    from aipaint.prompt import parse_prompt, prompt_at_step

    model = latent_model(pipe)
    unet = torch_unet(model, "attention")
    layers, combine = attention_settings(model, layers, combine)
    prompts = [prompt] if isinstance(prompt, str) or not isinstance(prompt, Sequence) else list(prompt)
    if not prompts or len(prompts) > 8:
        raise InvalidParameter("prompt", prompt, "give 1 to 8 prompts to compare")
    runs: list[dict[str, Any]] = []
    rows: list[tuple[str, list[Any]]] = []
    captions: list[list[str]] = []
    notes: list[str] = []
    wanted = None if words is None else ({words.lower()} if isinstance(words, str) else {w.lower() for w in words})
    for one in prompts:
        same_seed = {"seed": runs[0]["seed"]} if runs and "seed" not in params and isinstance(one, str) else {}
        request = settled_request(pipe, one, {**params, **same_seed})
        parsed = parse_prompt(request.prompt)
        factor = model.vae_scale_factor
        latent_size = (request.height // factor, request.width // factor)
        record = CrossAttentionRecord(latent_size, conditional_rows=max(1, len(parsed.subprompts)),
                                      by_layer=combine == "standardised")
        with job_lock(model), record_cross_attention(unet, record, layers):
            result, steps = run_watched(pipe, request, record.advance, progress=progress)
        total = len(steps)
        chosen = _check_steps(at, total)
        image = result.images[0]
        phases = _phases(model, parsed, request, record, chosen, total, image.size, wanted, prompt_at_step, combine)
        run = {"prompt": request.prompt, "request": request, "seed": request.seed, "image": image,
               "layers": sorted(record.layers), "combine": combine, "phases": phases, "parameters": parameters_text(result)}
        runs.append(run)
        for phase in phases:
            shown = [i for i, w in enumerate(phase["words"]) if phase["shown"][i]]
            base = drawing.grey(image)
            overlays = [drawing.overlay(base, phase["word_maps"][i], stretch=True, alpha=0.7) for i in shown]
            label = phase["text"] if len(phases) == 1 else f"{phase['text']} (steps {_span(phase['steps'])})"
            cells: list[Any] = [image, *overlays]
            names = ["result", *(phase["words"][i].label for i in shown)]
            for start in range(0, len(cells), ROW_CELLS):  # long prompts wrap; the label stays on the first row
                rows.append((label if start == 0 else "", cells[start : start + ROW_CELLS]))
                captions.append(names[start : start + ROW_CELLS])
            phase["overlays"] = overlays
    notes.append(f"{runs[0]['request'].sampler}, {runs[0]['request'].steps} steps, CFG {runs[0]['request'].cfg_scale}, "
                 f"seed {runs[0]['seed']}, {model.name}; maps averaged over {len(runs[0]['layers'])} cross-attention "
                 f"layers ({layers if isinstance(layers, str) else ', '.join(layers)}"
                 f"{', each standardised' if combine == 'standardised' else ''}) and the steps of each row")
    notes.append("each word's map is stretched from its own minimum (dark) to its maximum (bright); "
                 "emphasis (word:1.3) shows as ×1.3")
    sheet = drawing.contact_sheet(
        rows, title="cross-attention: which word paints where", captions=captions, cell=cell, notes=notes,
        labels_above=True,
    )
    images: dict[str, list[Any]] = {"result": [r["image"] for r in runs]}
    for run in runs:
        for phase in run["phases"]:
            images.setdefault(phase["text"], phase["overlays"])
    return ExplainResult(
        view="attention",
        images=images,
        columns=["result"],
        data={"runs": runs},
        sheet=sheet,
        plot=_plot,
        parameters=runs[0]["parameters"],
    )


def _check_steps(at: Sequence[int] | None, total: int) -> list[int]:
    if at is None:
        return list(range(1, total + 1))
    values = list(at)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= total]
    if not values or bad:
        raise InvalidParameter("at", bad[0] if bad else values, f"steps to average over are whole numbers from 1 to {total}")
    return sorted(set(values))


def _span(steps: Sequence[int]) -> str:
    return f"{steps[0]}–{steps[-1]}" if len(steps) > 1 else str(steps[0])


def attention_settings(model: Any, layers: str | Sequence[str], combine: str) -> tuple[str | Sequence[str], str]:
    """``layers`` and ``combine`` with ``"auto"`` resolved from the model's zoo card
    (``explain.attention.layers`` / ``.combine``), else ``"up"`` and ``"probability"``."""
    card = getattr(model, "card", None) or {}
    settings = card.get("explain", {}).get("attention", {}) if isinstance(card, dict) else {}
    if isinstance(layers, str) and layers == "auto":
        layers = settings.get("layers", "up")
    if combine == "auto":
        combine = settings.get("combine", "probability")
    if combine not in COMBINE_CHOICES:
        raise InvalidParameter("combine", combine, "must be one of " + ", ".join(("auto", *COMBINE_CHOICES)))
    return layers, combine


def _standardised_word_maps(record: CrossAttentionRecord, ks: list[int], part: int, positions: list[list[int]],
                            pixel_size: tuple[int, int]) -> torch.Tensor:
    """W × H × W' at the image's size (``pixel_size`` is (height, width)): per layer, each word's map
    summed over the steps ``ks`` (1-based), resized from the layer's own grid straight to the image
    (resizing through the latent grid first moves a coarse layer's peaks towards the border), and
    rescaled to mean 0 and standard deviation 1; then averaged over the layers."""
    per_layer = []
    for layer in sorted(record.layers):
        maps = [record.layer_maps[(k - 1, layer)][part] for k in ks if (k - 1, layer) in record.layer_maps]
        if not maps:
            continue
        summed = torch.stack(maps).sum(0)  # T × g × g
        words = torch.stack([summed[p].sum(0) for p in positions])  # W × g × g
        if words.shape[-2:] != pixel_size:
            words = F.interpolate(words[None], size=pixel_size, mode="bilinear", align_corners=False)[0]
        flat = words.flatten(1)
        spread = flat.std(1, keepdim=True).clamp_min(1e-12)
        per_layer.append(((flat - flat.mean(1, keepdim=True)) / spread).view_as(words))
    return torch.stack(per_layer).mean(0)


def _phases(model: Any, parsed: Any, request: Any, record: CrossAttentionRecord, chosen: list[int], total: int,
            size: tuple[int, int], wanted: set[str] | None, prompt_at_step: Any,
            combine: str = "probability") -> list[dict[str, Any]]:
    """Group the recorded steps by the text in force (sub-prompt ``AND`` parts are rows of their own)."""
    steps = int(request.steps)
    groups: dict[tuple[int, str], list[int]] = {}
    for k in chosen:  # k: 1-based report; the loop asked the conditioning of plan step (k-1)·steps // total
        index = k - 1
        if index not in record.maps:
            continue
        plan_step = min((index * steps) // total, steps - 1)
        for part, (text, _) in enumerate(prompt_at_step(parsed, plan_step, steps) or (("", 1.0),)):
            groups.setdefault((part, text), []).append(k)
    phases = []
    for (part, text), ks in groups.items():
        maps = torch.stack([record.maps[k - 1][part] / record.calls[k - 1] for k in ks]).mean(0)  # T × h × w
        words = prompt_words(model.tokenizer, text)
        positions = [list(w.positions) for w in words]
        if words and combine == "standardised":
            pixel = _standardised_word_maps(record, ks, part, positions, (size[1], size[0]))
        else:
            word_maps = torch.stack([maps[p].sum(0) for p in positions]) if words else torch.zeros(0, *maps.shape[1:])
            pixel = F.interpolate(word_maps[None], size=(size[1], size[0]), mode="bilinear", align_corners=False)[0]
        peaks = []
        for m in pixel:
            flat = int(torch.argmax(m))
            peaks.append((flat % size[0], flat // size[0]))
        shown = [_shown(w, wanted) for w in words]
        phases.append({"text": text, "part": part, "steps": ks, "token_maps": maps.numpy(), "words": words,
                       "word_maps": pixel.numpy(), "peaks": peaks, "shown": shown})
    return phases


def _plot(fig: Any, result: ExplainResult) -> None:
    runs = result.data["runs"]
    panels = [(run, phase) for run in runs for phase in run["phases"]]
    columns = max(1 + sum(phase["shown"]) for _, phase in panels)
    fig.set_size_inches(max(4.0, 1.5 * columns), 0.6 + 1.7 * len(panels))
    axes = fig.subplots(len(panels), columns, squeeze=False)
    for r, (run, phase) in enumerate(panels):
        axes[r][0].imshow(np.asarray(run["image"]))
        axes[r][0].set_title("result", fontsize=9)
        axes[r][0].set_ylabel(phase["text"], fontsize=8)
        shown = [i for i, s in enumerate(phase["shown"]) if s]
        for c, i in enumerate(shown, start=1):
            axes[r][c].imshow(np.asarray(run["image"]))
            axes[r][c].imshow(phase["word_maps"][i], cmap="magma", alpha=0.6)
            axes[r][c].set_title(phase["words"][i].label, fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in axes[r][1 + len(shown):]:
            ax.axis("off")
