"""Perturbed-attention guidance (Ahn et al. 2024) on tensors and UNets (imported when a job uses it).

The UNet call of a step carries one more copy of the positive rows; in the chosen
self-attention layers those rows get *identity* attention (each token attends only to itself,
so the layer's output is its value projection), as diffusers'
``PAGCFGIdentitySelfAttnProcessor2_0`` does. The step's output then moves away from that
weakened prediction: ``output + scale * (positive - perturbed)``.
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


@dataclass
class _Rows:
    """Where the perturbed rows of the current UNet call start (None: no perturbed rows)."""

    first: int | None = None


class PerturbedSelfAttention:
    """Wraps a self-attention layer's processor: rows before ``rows.first`` go through it
    unchanged; the rest get identity attention."""

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
        tail_temb = temb[first:] if temb is not None and temb.shape[0] == hidden_states.shape[0] else temb
        return torch.cat([kept, identity_attention(attn, hidden_states[first:], tail_temb).to(kept.dtype)])


def _fake_integral_match(layer: str, name: str) -> bool:
    # diffusers' rule: "blocks.1" must not pick "blocks.10"'s layers by ending on the same digits
    last_layer, last_name = layer.split(".")[-1], name.split(".")[-1]
    return last_layer.isnumeric() and last_name.isnumeric() and last_layer == last_name


def self_attention_layers(unet: torch.nn.Module, layers: Sequence[str]) -> dict[str, Any]:
    """The UNet's self-attention modules (diffusers ``Attention`` that is not cross-attention)
    whose names match any of ``layers`` (regular expressions searched in the module names, as
    diffusers' ``pag_applied_layers``: ``mid``, ``down_blocks.2``, ``up_blocks.0.attentions.1``)."""
    from diffusers.models.attention_processor import Attention

    if not hasattr(getattr(unet, "_orig_mod", unet), "down_blocks"):
        raise UnsupportedFeature(
            f"perturbed-attention guidance (PAG) perturbs a UNet's self-attention layers; this model's denoiser is a "
            f"{type(getattr(unet, '_orig_mod', unet)).__name__} (joint-attention transformers such as SD 3 and FLUX "
            "are not supported yet)"
        )
    found: dict[str, Any] = {}
    for layer in layers:
        try:
            pattern = re.compile(layer)
        except re.error:
            raise InvalidParameter("pag.layers", layer, "must be parts of UNet module names such as mid, "
                                   "down_blocks.2 or up_blocks.0.attentions.1 (regular expressions)") from None
        matched = {name: module for name, module in unet.named_modules()
                   if isinstance(module, Attention) and not module.is_cross_attention
                   and pattern.search(name) is not None and not _fake_integral_match(layer, name)}
        if not matched:
            raise InvalidParameter("pag.layers", layer, "names no self-attention layer of this UNet "
                                   "(try mid, down_blocks.N or up_blocks.N)")
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
