"""Write Stable Diffusion XL weights the way model sites share them (a test utility).

SDXL single files (``sd_xl_base_1.0.safetensors`` and the fine-tunes on Civitai) carry
Stability's SGM layout, not diffusers' folder layout:

* the UNet under ``model.diffusion_model.``, numbered like SD1.x's LDM UNet, plus the
  added (size/crop + pooled text) embedding as ``label_emb.0.{0,2}``;
* the VAE under ``first_stage_model.``, exactly as in SD1.x files;
* CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.`` (Hugging Face's
  names, with the ``position_ids`` buffer);
* OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (the refiner has it alone, as
  ``conditioner.embedders.0.model.``) in open_clip's own names: ``transformer.resblocks.N``
  with ``nn.MultiheadAttention``'s fused ``in_proj_weight`` (q, k and v stacked), a raw
  ``positional_embedding`` and ``text_projection`` stored as ``[width, dim]`` (used as
  ``x @ P``, so the transpose of a ``Linear`` weight).

The UNet, VAE and CLIP-L mappings are tests/ldm_checkpoint.py's; the OpenCLIP one follows
diffusers' scripts/convert_diffusers_to_original_sdxl.py, plus the ``text_projection``
transpose that script leaves out. Every key must map: an unmapped one raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ldm_checkpoint import UNET_PREFIX, VAE_PREFIX, clip_to_ldm, unet_to_ldm, vae_to_ldm

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

# diffusers ``add_embedding`` (a TimestepEmbedding) -> SGM ``label_emb = Sequential(Sequential(linear, SiLU, linear))``.
UNET_ADDED_EMBEDDING = {"add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}

# Hugging Face CLIP names -> open_clip names, outside the attention projections.
OPEN_CLIP_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
OPEN_CLIP_LAYER_PARTS = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
QKV = ("q_proj", "k_proj", "v_proj")
LAYER_PREFIX = "text_model.encoder.layers."


def sdxl_unet_to_sgm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers SDXL UNet2DConditionModel state dict in SGM names (without the file prefix).

    Everything but the added embedding is laid out as in SD1.x's LDM UNet.
    """
    if config.get("addition_embed_type") != "text_time":
        raise ValueError(f"not an SDXL UNet: addition_embed_type is {config.get('addition_embed_type')!r}, not 'text_time'")
    out: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        prefix = next((p for p in UNET_ADDED_EMBEDDING if key.startswith(p)), None)
        if prefix is None:
            rest[key] = tensor
        else:
            out[UNET_ADDED_EMBEDDING[prefix] + key[len(prefix):]] = tensor
    out.update(unet_to_ldm(rest, {**config, "addition_embed_type": None}))
    return out


def open_clip_from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict in open_clip's names (without the
    ``conditioner.embedders.N.model.`` prefix)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for key, tensor in state.items():
        if key in OPEN_CLIP_TOP_LEVEL:
            out[OPEN_CLIP_TOP_LEVEL[key]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T
        elif key == "text_model.embeddings.position_ids":
            continue  # a buffer open_clip does not have
        elif key.startswith(LAYER_PREFIX):
            layer, _, part = key[len(LAYER_PREFIX):].partition(".")
            base = f"transformer.resblocks.{layer}."
            module, _, kind = part.rpartition(".")
            projection = module.removeprefix("self_attn.")
            if projection in QKV:
                fused.setdefault(base, {}).setdefault(kind, {})[projection] = tensor
            elif module in OPEN_CLIP_LAYER_PARTS:
                out[f"{base}{OPEN_CLIP_LAYER_PARTS[module]}.{kind}"] = tensor
            else:
                raise KeyError(f"no open_clip name for text encoder weight {key!r}")
        else:
            raise KeyError(f"no open_clip name for text encoder weight {key!r}")
    for base, kinds in fused.items():
        for kind, parts in kinds.items():
            if set(parts) != set(QKV):
                raise KeyError(f"{base}attn: {kind} of {sorted(set(QKV) - set(parts))} missing")
            out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts[name] for name in QKV])
    return out


def to_sgm_state_dict(
    unet: Any, vae: Any, text_encoder: Any | None, text_encoder_2: Any
) -> dict[str, torch.Tensor]:
    """One SGM-layout state dict for an SDXL base (or, with ``text_encoder=None``, a refiner).
    Tensors are made contiguous copies (safetensors refuses views and shared storage)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in sdxl_unet_to_sgm(unet.state_dict(), unet.config).items():
        state[UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(vae.state_dict(), vae.config).items():
        state[VAE_PREFIX + key] = tensor
    open_clip_prefix = REFINER_OPEN_CLIP_PREFIX
    if text_encoder is not None:
        open_clip_prefix = OPEN_CLIP_PREFIX
        for key, tensor in clip_to_ldm(text_encoder.state_dict()).items():
            state[CLIP_L_PREFIX + key] = tensor
    for key, tensor in open_clip_from_hf(text_encoder_2.state_dict()).items():
        state[open_clip_prefix + key] = tensor
    return {key: tensor.detach().contiguous().clone() for key, tensor in state.items()}
