"""Perturbed-attention guidance (Ahn et al. 2024) on tensors, UNets and joint-attention
transformers (imported when a job uses it).

The denoiser call of a step carries one more copy of the positive rows; in the chosen
self-attention layers those rows get *identity* attention (each token attends only to itself,
so the layer's output is its value projection), as diffusers'
``PAGCFGIdentitySelfAttnProcessor2_0`` does. In a joint-attention layer (SD 3's MMDiT: image and
text tokens in one attention) only the image-to-image part is the identity: each image token
attends to itself and to the text tokens, the text tokens to everything, as diffusers'
``PAGCFGJointAttnProcessor2_0``. The step's output then moves away from that weakened
prediction: ``output + scale * (positive - perturbed)``.

Which denoisers are perturbed: a UNet (it has ``down_blocks``; default layers ``mid``), or the
denoiser of a model that declares ``pag_default_layers`` (the family's default layers, e.g. SD 3's
``blocks.1`` as diffusers' ``StableDiffusion3PAGPipeline``). Others (FLUX: diffusers has no PAG
for it) are refused with :class:`~aipaint.errors.UnsupportedFeature`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from aipaint.engine.loop import LoopContributor
from aipaint.errors import InvalidParameter, UnsupportedFeature


def identity_attention(attn: Any, hidden_states: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """A diffusers ``Attention`` layer's output when its attention map is the identity: the
    value projection through the output projection (norms, residual and rescale as the layer's own)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    ndim = hidden_states.ndim
    if ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    hidden_states = attn.to_out[1](attn.to_out[0](attn.to_v(hidden_states)))
    if ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def joint_identity_attention(attn: Any, hidden_states: torch.Tensor,
                             encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A joint-attention layer's ``(image, text)`` outputs when the image tokens' attention among
    themselves is the identity: each image token attends to itself and to every text token; the text
    tokens attend to all, as in diffusers' ``PAGJointAttnProcessor2_0``. Unlike that processor (which
    skips them), the layer's query/key norms (SD 3.5's ``qk_norm``) are applied, as its own
    ``JointAttnProcessor2_0`` does."""
    batch, image_tokens = hidden_states.shape[:2]

    def heads(projected: torch.Tensor) -> torch.Tensor:
        return projected.view(batch, -1, attn.heads, projected.shape[-1] // attn.heads).transpose(1, 2)

    def normed(norm: Any, value: torch.Tensor) -> torch.Tensor:
        return norm(value) if norm is not None else value

    query = normed(attn.norm_q, heads(attn.to_q(hidden_states)))
    key = normed(attn.norm_k, heads(attn.to_k(hidden_states)))
    value = heads(attn.to_v(hidden_states))
    query = torch.cat([query, normed(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))], dim=2)
    key = torch.cat([key, normed(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))], dim=2)
    value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
    tokens = query.shape[2]
    allowed = torch.ones(tokens, tokens, dtype=torch.bool, device=query.device)  # True: may attend
    allowed[:image_tokens, :image_tokens] = torch.eye(image_tokens, dtype=torch.bool, device=query.device)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
    out = out.transpose(1, 2).reshape(batch, tokens, -1).to(query.dtype)
    image, text = out[:, :image_tokens], out[:, image_tokens:]
    image = attn.to_out[1](attn.to_out[0](image))
    if not attn.context_pre_only:
        text = attn.to_add_out(text)
    return image, text


@dataclass
class _Rows:
    """Where the perturbed rows of the current denoiser call start (None: no perturbed rows)."""

    first: int | None = None


class PerturbedSelfAttention:
    """Wraps a self-attention layer's processor: rows before ``rows.first`` go through it
    unchanged; the rest get identity attention (:func:`joint_identity_attention` when the layer
    is called with text tokens to attend jointly, :func:`identity_attention` otherwise)."""

    def __init__(self, original: Any, rows: _Rows) -> None:
        self.original = original
        self.rows = rows

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        first = self.rows.first
        if first is None or first >= hidden_states.shape[0]:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        def head(value: torch.Tensor | None) -> torch.Tensor | None:
            return value[:first] if value is not None and value.ndim and value.shape[0] == hidden_states.shape[0] else value

        kept = self.original(attn, hidden_states[:first], head(encoder_hidden_states), head(attention_mask),
                             head(temb), *args, **kwargs)
        if encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None:
            image, text = joint_identity_attention(attn, hidden_states[first:], encoder_hidden_states[first:])
            return torch.cat([kept[0], image.to(kept[0].dtype)]), torch.cat([kept[1], text.to(kept[1].dtype)])
        tail_temb = temb[first:] if temb is not None and temb.shape[0] == hidden_states.shape[0] else temb
        return torch.cat([kept, identity_attention(attn, hidden_states[first:], tail_temb).to(kept.dtype)])


def _fake_integral_match(layer: str, name: str) -> bool:
    # diffusers' rule: "blocks.1" must not pick "blocks.10"'s layers by ending on the same digits
    last_layer, last_name = layer.split(".")[-1], name.split(".")[-1]
    return last_layer.isnumeric() and last_name.isnumeric() and last_layer == last_name


def _is_unet(denoiser: torch.nn.Module) -> bool:
    return hasattr(getattr(denoiser, "_orig_mod", denoiser), "down_blocks")


def default_layers(model: Any) -> str:
    """The layers PAG perturbs when the request names none: ``mid`` for a UNet, the model's
    ``pag_default_layers`` for a family that declares them; any other denoiser is refused."""
    declared = getattr(model, "pag_default_layers", None)
    if declared:
        return str(declared)
    denoiser = getattr(model, "unet", None)
    if denoiser is not None and _is_unet(denoiser):
        return "mid"
    name = type(getattr(denoiser, "_orig_mod", denoiser)).__name__
    raise UnsupportedFeature(
        f"perturbed-attention guidance (PAG) perturbs the self-attention of a UNet or of a transformer whose family "
        f"declares its PAG layers (SD 3's MMDiT); this model's denoiser is a {name}, for which PAG is not supported "
        "(diffusers has no PAG pipeline for it either)"
    )


def self_attention_layers(denoiser: torch.nn.Module, layers: Sequence[str]) -> dict[str, Any]:
    """The denoiser's self-attention modules (diffusers ``Attention`` that is not cross-attention,
    joint attention included) whose names match any of ``layers`` (regular expressions searched in
    the module names, as diffusers' ``pag_applied_layers``: ``mid``, ``down_blocks.2``,
    ``up_blocks.0.attentions.1`` in a UNet; ``blocks.1`` in an MMDiT, where — as in diffusers — it
    also matches ``transformer_blocks.10`` to ``.19``)."""
    from diffusers.models.attention_processor import Attention

    hint = "mid, down_blocks.N or up_blocks.N" if _is_unet(denoiser) else r"blocks.N or transformer_blocks\.N\."
    found: dict[str, Any] = {}
    for layer in layers:
        try:
            pattern = re.compile(layer)
        except re.error:
            raise InvalidParameter("pag.layers", layer, f"must be parts of the denoiser's module names such as {hint} "
                                   "(regular expressions)") from None
        matched = {name: module for name, module in denoiser.named_modules()
                   if isinstance(module, Attention) and not module.is_cross_attention
                   and pattern.search(name) is not None and not _fake_integral_match(layer, name)}
        if not matched:
            raise InvalidParameter("pag.layers", layer, f"names no self-attention layer of this "
                                   f"{type(getattr(denoiser, '_orig_mod', denoiser)).__name__} (try {hint})")
        found.update(matched)
    return found


@contextmanager
def perturbed_layers(unet: torch.nn.Module, layers: Sequence[str]) -> Iterator[_Rows]:
    """Wrap the chosen layers' processors for one job; the originals are put back on exit."""
    modules = self_attention_layers(unet, layers)
    rows = _Rows()
    originals = {name: module.processor for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.processor = PerturbedSelfAttention(originals[name], rows)
        yield rows
    finally:
        for name, module in modules.items():
            module.processor = originals[name]


@dataclass
class PAGContributor(LoopContributor):
    """Asks the loop for the perturbed rows and adds ``scale * (positive - perturbed)``.

    ``adaptive_scale`` as diffusers' ``pag_adaptive_scale``: the scale at timestep ``t`` is
    ``scale - adaptive_scale * (1000 - t)``, never below 0."""

    scale: float
    rows: _Rows
    adaptive_scale: float = 0.0

    def scale_at(self, t: torch.Tensor) -> float:
        if self.adaptive_scale <= 0:
            return self.scale
        return max(0.0, self.scale - self.adaptive_scale * (1000.0 - float(t.flatten()[0])))

    def perturbed_pass(self, step: int, guided: bool, first_row: int) -> bool:
        self.rows.first = first_row
        return True

    def perturbed_guidance(self, step: int, total: int, *, x: torch.Tensor, t: torch.Tensor, output: torch.Tensor,
                           positive: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        self.rows.first = None
        return output + self.scale_at(t) * (positive - perturbed)
