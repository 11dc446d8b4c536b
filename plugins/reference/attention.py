"""Reference-only: the reference image's self-attention keys and values, shared with the generation.

What sd-webui-controlnet's ``reference_only`` preprocessor does, on diffusers' attention
processors. At each step the reference latents, noised to the step's timestep, go through
the UNet first ("write": every self-attention layer records its input); then the real call
runs ("read": each self-attention layer attends to its own tokens *and* the recorded
reference tokens). Nothing is trained and no weights are loaded: the model's own attention
copies colours and textures from the reference where they fit the prompt.

``weight`` picks the layers as sd-webui-controlnet does: the self-attention layers are sorted
by width (widest first) and layer ``i`` of ``n`` joins when ``weight > i / n``, so 1 (or more)
uses every layer and 0.5 the wider half. ``style_fidelity`` (sd-webui-controlnet's "Style
Fidelity", its ``threshold_a``) blends, for the negative prompt's rows, attention with the
reference (0) and without it (1): at 1 classifier-free guidance pushes towards the reference
as hard as towards the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from aipaint.engine.loop import LoopContributor

# UNet keyword arguments the reference pass leaves out: a ControlNet's residuals belong to the
# generation's picture, not to the reference (sd-webui-controlnet runs the reference pass plain).
_RESIDUAL_KEYS = ("down_block_additional_residuals", "mid_block_additional_residual", "down_intrablock_additional_residuals")


@dataclass
class AttentionState:
    """What every reference processor of one job reads: the phase and the read settings."""

    phase: str = "off"  # "off" | "write" | "read"
    attention: bool = True  # share self-attention keys and values (reference_only)
    adain: bool = False  # match feature statistics (reference_adain)
    weight: float = 1.0
    style_fidelity: float = 0.5
    uncond_rows: int = 0  # the negative prompt's rows come first in the loop's batch


class ReferenceAttnProcessor:
    """Wraps one self-attention layer's processor: records its input on "write", and on "read"
    attends over its own tokens followed by the recorded ones (keys and values of both)."""

    def __init__(self, inner: Any, state: AttentionState, layer_weight: float) -> None:
        self.inner = inner
        self.state = state
        self.layer_weight = layer_weight
        self.bank: torch.Tensor | None = None

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        state = self.state
        if state.phase == "write":
            self.bank = hidden_states.detach().clone()
        elif (state.phase == "read" and state.attention and self.bank is not None and state.weight > self.layer_weight
              and encoder_hidden_states is None and self.bank.shape[0] == hidden_states.shape[0]):
            context = torch.cat([hidden_states, self.bank.to(hidden_states.dtype)], dim=1)
            shared = self.inner(attn, hidden_states, context, attention_mask, *args, **kwargs)
            rows = state.uncond_rows
            if rows and state.style_fidelity > 1e-5:
                plain = self.inner(attn, hidden_states[:rows], None,
                                   attention_mask[:rows] if attention_mask is not None else None, *args, **kwargs)
                faithful = torch.cat([plain, shared[rows:]])
                return state.style_fidelity * faithful + (1.0 - state.style_fidelity) * shared
            return shared
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


def self_attention_layers(unet: Any) -> list[tuple[str, int]]:
    """The processor names of the transformer blocks' self-attention layers, with their widths,
    widest first (ties in the UNet's own order), as sd-webui-controlnet ranks them."""
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor") and ".transformer_blocks." in name:
            module = unet.get_submodule(name[: -len(".processor")])
            layers.append((name, int(module.to_q.in_features)))
    return sorted(layers, key=lambda item: -item[1])


def install_processors(unet: Any, state: AttentionState) -> list[ReferenceAttnProcessor]:
    """Wrap every self-attention processor of ``unet`` (the caller restores ``unet.attn_processors``)."""
    current = unet.attn_processors
    layers = self_attention_layers(unet)
    wrapped = {name: ReferenceAttnProcessor(current[name], state, i / len(layers)) for i, (name, _) in enumerate(layers)}
    unet.set_attn_processor({**current, **wrapped})
    return list(wrapped.values())


class AdaINHook:
    """sd-webui-controlnet's ``reference_adain`` on one UNet layer's output: on "write" record the
    reference's per-channel mean and variance; on "read" renormalise the generation's features to
    them (AdaIN), the negative rows blended back towards their own by the style fidelity."""

    eps = 1e-6

    def __init__(self, state: AttentionState, layer_weight: float) -> None:
        self.state = state
        self.layer_weight = layer_weight
        self.bank: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, module: Any, inputs: Any, output: Any) -> Any:
        state = self.state
        x = output[0] if isinstance(output, tuple) else output
        if not state.adain or state.weight <= self.layer_weight or x.dim() != 4:
            return None
        if state.phase == "write":
            var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
            self.bank = (mean, var)
            return None
        if state.phase != "read" or self.bank is None or self.bank[0].shape[0] != x.shape[0]:
            return None
        var, mean = torch.var_mean(x.float(), dim=(2, 3), keepdim=True, correction=0)
        ref_mean, ref_var = self.bank
        std = var.clamp(min=self.eps).sqrt()
        ref_std = ref_var.clamp(min=self.eps).sqrt()
        shared = (x.float() - mean) / std * ref_std + ref_mean
        rows = state.uncond_rows
        if rows and state.style_fidelity > 1e-5:
            faithful = torch.cat([x.float()[:rows], shared[rows:]])
            shared = state.style_fidelity * faithful + (1.0 - state.style_fidelity) * shared
        shared = shared.to(x.dtype)
        return (shared, *output[1:]) if isinstance(output, tuple) else shared


def adain_layers(unet: Any) -> list[tuple[Any, float]]:
    """The layers whose outputs AdaIN renormalises, with sd-webui-controlnet's layer weights (a layer
    joins when ``weight > layer weight``): the middle block (0); the down layers below the first
    resolution, deepest lowest (1 - i/n); every up layer, deepest first (i/n). A layer's output is
    its attention's where it has one, else its ResNet's."""

    def block_layers(block: Any) -> list[Any]:
        attentions = list(getattr(block, "attentions", None) or [])
        return [attentions[j] if j < len(attentions) else resnet for j, resnet in enumerate(block.resnets)]

    down = [layer for block in list(unet.down_blocks)[1:] for layer in block_layers(block)]
    up = [layer for block in unet.up_blocks for layer in block_layers(block)]
    layers: list[tuple[Any, float]] = [(unet.mid_block, 0.0)]
    layers += [(layer, 1.0 - i / len(down)) for i, layer in enumerate(down)]
    layers += [(layer, i / len(up)) for i, layer in enumerate(up)]
    return layers


def install_adain_hooks(unet: Any, state: AttentionState) -> tuple[list[AdaINHook], list[Any]]:
    """Forward hooks on :func:`adain_layers`; returns the hooks and their removable handles."""
    hooks, handles = [], []
    for module, layer_weight in adain_layers(unet):
        hook = AdaINHook(state, layer_weight)
        hooks.append(hook)
        handles.append(module.register_forward_hook(hook))
    return hooks, handles


def alphas_cumprod(scheduler_config: dict[str, Any]) -> torch.Tensor:
    """The model's ᾱ_t for every training timestep, from its own noise schedule (diffusers' DDPM
    reads every beta schedule, zero-terminal-SNR rescaling included)."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(config).alphas_cumprod.double()


def alpha_bar_at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at (possibly fractional) timesteps, linearly interpolated between training timesteps."""
    t = t.double().clamp(0, len(table) - 1).cpu()
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    frac = t - lo.double()
    return table[lo] * (1 - frac) + table[hi] * frac


class ReferenceOnly(LoopContributor):
    """Runs the noised reference through the UNet before each call of an active step.

    ``call_through`` wraps the model's UNet call (the loop's batch reaches it whole: negative
    rows, positive rows, any contributor's extra rows); ``before_call`` tells it the step and
    whether the negative rows are there.
    """

    def __init__(self, *, state: AttentionState, processors: list[Any], reference: torch.Tensor,
                 alphas: torch.Tensor, batch_size: int, total_steps: int, guidance_start: float, guidance_end: float,
                 generator: torch.Generator) -> None:
        self.state = state
        self.processors = processors
        self.reference = reference  # (1 or batch, C, h, w), scaled latents
        self.alphas = alphas
        self.batch_size = batch_size
        self.total_steps = max(1, total_steps)
        self.guidance_start = guidance_start
        self.guidance_end = guidance_end
        self.generator = generator
        self.step = 0
        self.guided = False
        self.reference_passes = 0

    def before_call(self, step: int, guided: bool) -> None:
        self.step = step
        self.guided = guided

    def active(self) -> bool:
        fraction = self.step / self.total_steps
        return self.state.weight > 0 and self.guidance_start <= fraction <= self.guidance_end

    def noised_reference(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The reference at the timestep of each row, one noise draw per batch item shared by its rows."""
        rows = latents.shape[0]
        channels = self.reference.shape[1]
        per_item = self.reference.expand(self.batch_size, -1, -1, -1)
        noise = torch.randn(per_item.shape, generator=self.generator, dtype=torch.float32)
        repeats = max(1, rows // self.batch_size)
        clean = per_item.float().cpu().repeat(repeats, 1, 1, 1)
        noise = noise.repeat(repeats, 1, 1, 1)
        abar = alpha_bar_at(self.alphas, t.reshape(-1)).float()
        abar = (abar.expand(rows) if abar.numel() == 1 else abar).reshape(rows, 1, 1, 1)
        noised = (abar.sqrt() * clean + (1 - abar).sqrt() * noise).to(latents.device, latents.dtype)
        if latents.shape[1] > channels:  # an inpainting UNet's mask channels: the generation's own
            noised = torch.cat([noised, latents[:, channels:]], dim=1)
        return noised

    def call_through(self, call: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def reference_call(latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            if not self.active() or latents.shape[0] % self.batch_size:
                return call(latents, t, embeds, **kwargs)
            plain = {k: v for k, v in kwargs.items() if k not in _RESIDUAL_KEYS}
            try:
                self.state.phase = "write"
                call(self.noised_reference(latents, t), t, embeds, **plain)
                self.reference_passes += 1
                self.state.phase = "read"
                self.state.uncond_rows = self.batch_size if self.guided else 0
                return call(latents, t, embeds, **kwargs)
            finally:
                self.state.phase = "off"
                for processor in self.processors:
                    processor.bank = None

        return reference_call
