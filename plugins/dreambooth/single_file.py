"""Write a Stable Diffusion 1.x/2.x model as one file in the original (CompVis/LDM) layout.

A1111's ``models/Stable-diffusion`` folder, ComfyUI's ``checkpoints`` and model sites carry
SD models as one ``.safetensors`` file with the LDM names:

* the UNet under ``model.diffusion_model.``: ``input_blocks`` / ``middle_block`` /
  ``output_blocks`` numbered as one flat sequence of layers;
* the VAE under ``first_stage_model.``: ``encoder.down.N.block.M``, the decoder's ``up``
  levels numbered from the lowest resolution's end, attention as 1x1 convolutions;
* the text encoder under ``cond_stage_model.transformer.text_model.`` (Hugging Face CLIP
  names behind the ``text_model.`` level transformers 4 had).

Every weight must map: one without an LDM name raises rather than being dropped, because a
file with a hole loads with random weights in its place. aipaint reads the file back with
``aipaint.load(file, config=<the diffusers folder>)`` (a model whose sizes differ from SD
1.5's needs its config; the test suite checks the round trip tensor for tensor).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

# Inside a ResBlock: ``in_layers = [norm, SiLU, conv]``, ``emb_layers = [SiLU, linear]``,
# ``out_layers = [norm, SiLU, dropout, conv]``.
UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP_LEVEL = {
    "conv_in.": "input_blocks.0.0.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP_LEVEL = {"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out."}


def _layers(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"the single-file layout needs one layers_per_block for every level, got {layers!r}")
    return layers


def _has(state: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state)


def _rename(key: str, prefixes: Mapping[str, str], parts: Mapping[str, str] | None = None) -> str | None:
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            for part_old, part_new in (parts or {}).items():
                if rest.startswith(part_old + "."):
                    rest = part_new + rest[len(part_old):]
                    break
            return new + rest
    return None


def unet_blocks(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers UNet block prefix → LDM prefix. LDM's encoder is one list: ``conv_in``, then per
    level ``layers`` blocks of ``[ResBlock, SpatialTransformer?]`` and, except at the last level,
    a ``[Downsample]`` (conv named ``op``); the decoder has ``layers + 1`` blocks per level, the
    upsampler in the level's last block after the attention (index 2) or the ResBlock (index 1)."""
    layers, levels = _layers(config), len(config["block_out_channels"])
    mapping: dict[str, str] = {}
    index = 1
    for level in range(levels):
        for j in range(layers):
            mapping[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{index}.0."
            if _has(state, f"down_blocks.{level}.attentions.{j}."):
                mapping[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{index}.1."
            index += 1
        if level < levels - 1:
            mapping[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{index}.0.op."
            index += 1
    mapping["mid_block.resnets.0."] = "middle_block.0."
    mapping["mid_block.attentions.0."] = "middle_block.1."
    mapping["mid_block.resnets.1."] = "middle_block.2."
    index = 0
    for level in range(levels):
        for j in range(layers + 1):
            mapping[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{index}.0."
            attention = _has(state, f"up_blocks.{level}.attentions.{j}.")
            if attention:
                mapping[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{index}.1."
            if j == layers and level < levels - 1:
                mapping[f"up_blocks.{level}.upsamplers.0.conv."] = f"output_blocks.{index}.{2 if attention else 1}.conv."
            index += 1
    return mapping


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A UNet2DConditionModel state dict under LDM names (transformer blocks keep their names:
    diffusers adopted LDM's SpatialTransformer naming)."""
    if config.get("class_embed_type") or config.get("addition_embed_type"):
        raise ValueError("class / added-condition embeddings (SDXL, upscalers) have no SD1.x single-file layout")
    blocks = unet_blocks(state, config)
    resnets = {k: v for k, v in blocks.items() if ".resnets." in k}
    others = {k: v for k, v in blocks.items() if ".resnets." not in k}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename(key, UNET_TOP_LEVEL) or _rename(key, resnets, UNET_RESNET_PARTS) or _rename(key, others)
        if new is None:
            raise KeyError(f"no LDM name for the UNet weight {key!r}")
        out[new] = tensor
    return out


def vae_blocks(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers VAE block prefix → LDM prefix; the decoder's ``up_blocks.i`` is ``up.{levels - 1 - i}``."""
    layers, levels = _layers(config), len(config["block_out_channels"])
    mapping: dict[str, str] = {}
    for level in range(levels):
        for j in range(layers):
            mapping[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
        mapping[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = f"encoder.down.{level}.downsample.conv."
        up = levels - 1 - level
        for j in range(layers + 1):
            mapping[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{up}.block.{j}."
        mapping[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = f"decoder.up.{up}.upsample.conv."
    for part in ("encoder", "decoder"):
        mapping[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        mapping[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    return mapping


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An AutoencoderKL state dict under LDM names; the mid-block attention's linear weights become
    the ``[C, C, 1, 1]`` convolution weights original checkpoints store."""
    blocks = vae_blocks(config)
    attention = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename(key, attention, VAE_ATTENTION_PARTS)
        if new is not None:
            out[new] = tensor[:, :, None, None] if new.endswith(".weight") and tensor.ndim == 2 else tensor
            continue
        new = _rename(key, VAE_TOP_LEVEL) or _rename(key, blocks, {"conv_shortcut": "nin_shortcut"})
        if new is None:
            if not re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
                raise KeyError(f"no LDM name for the VAE weight {key!r}")
            new = key
        out[new] = tensor
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict under ``text_model.`` names, with the ``position_ids`` buffer files carry."""
    out = {key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()}
    positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
    out.setdefault("text_model.embeddings.position_ids", torch.arange(positions)[None])
    return out


def ldm_state_dict(unet: Any, vae: Any, text_encoder: Any) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict of the three networks (contiguous CPU copies: safetensors refuses views)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in unet_to_ldm(unet.state_dict(), unet.config).items():
        state[UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(vae.state_dict(), vae.config).items():
        state[VAE_PREFIX + key] = tensor
    for key, tensor in clip_to_ldm(text_encoder.state_dict()).items():
        state[CLIP_PREFIX + key] = tensor
    return {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in state.items()}


def save_single_file(path: Path, unet: Any, vae: Any, text_encoder: Any, metadata: dict[str, str] | None = None) -> Path:
    """Write the model to ``path`` (``.safetensors``, LDM layout), atomically."""
    from aipaint_plugins.dreambooth.train import save_safetensors

    save_safetensors(ldm_state_dict(unet, vae, text_encoder), path, metadata)
    return path
