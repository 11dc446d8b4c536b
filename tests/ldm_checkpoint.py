"""Write Stable Diffusion 1.x weights the way model sites share them (a test utility).

Model sites (Civitai, the Hub's ``*.safetensors`` / ``*.ckpt`` files, A1111's
``models/Stable-diffusion`` folder) carry SD1.x as one file in the original
CompVis/LDM layout, not in diffusers' folder layout:

* the UNet under ``model.diffusion_model.`` with ``input_blocks`` / ``middle_block`` /
  ``output_blocks`` numbered as one flat sequence of layers;
* the VAE under ``first_stage_model.`` with ``encoder.down.N.block.M`` and the decoder's
  ``up`` levels numbered from the *lowest* resolution's end (reversed);
* the text encoder under ``cond_stage_model.transformer.text_model.`` (Hugging Face's
  CLIP names, behind the ``text_model.`` wrapper transformers < 5.6 had);
* the DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...) at the top level.

No real checkpoint can be downloaded here, so the tests build tiny random models with
diffusers and write them in that layout with this module. The mapping is written from
the two layouts themselves (not from diffusers' own converter, which would make the
round trip circular): a test loads the file with ``from_single_file`` and checks that
every tensor comes back equal. Every key must map: an unmapped key raises instead of
being dropped, so a gap in the mapping fails loudly.
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

# Inside a UNet ResBlock: diffusers name -> LDM name (``in_layers = [norm, SiLU, conv]``,
# ``emb_layers = [SiLU, linear]``, ``out_layers = [norm, SiLU, dropout, conv]``).
UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# Top-level UNet layers: ``time_embed = [linear, SiLU, linear]``, ``out = [norm, SiLU, conv]``.
UNET_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# The VAE's attention is 1x1 convolutions in LDM and linear layers in diffusers.
VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP_LEVEL = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"only a single layers_per_block is supported (SD1.x layout), got {layers!r}")
    return layers


def _has(state: Mapping[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state)


def unet_prefix_map(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for a UNet2DConditionModel.

    LDM numbers the encoder as one flat list: ``input_blocks.0`` is ``conv_in``, then per
    resolution ``layers_per_block`` blocks of ``[ResBlock, SpatialTransformer?]`` and (except
    at the last resolution) one ``[Downsample]`` block whose conv is ``op``. The decoder has
    ``layers_per_block + 1`` blocks per resolution, the upsampler riding in the last block of
    a level after the attention (index 2) or directly after the ResBlock (index 1).
    """
    layers = _layers_per_block(config)
    levels = len(config["block_out_channels"])
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
            has_attention = _has(state, f"up_blocks.{level}.attentions.{j}.")
            if has_attention:
                mapping[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{index}.1."
            if j == layers and level < levels - 1:
                mapping[f"up_blocks.{level}.upsamplers.0.conv."] = f"output_blocks.{index}.{2 if has_attention else 1}.conv."
            index += 1
    return mapping


def _rename(key: str, prefixes: Mapping[str, str], parts: Mapping[str, str] | None = None) -> str | None:
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            if parts:
                for part_old, part_new in parts.items():
                    if rest.startswith(part_old + "."):
                        rest = part_new + rest[len(part_old):]
                        break
            return new + rest
    return None


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel state dict in LDM names (without the file prefix).

    Transformer blocks (``norm``, ``proj_in``, ``transformer_blocks.N.attn1.to_q``, ...)
    keep their names: diffusers adopted LDM's SpatialTransformer naming.
    """
    if config.get("class_embed_type") or config.get("addition_embed_type"):
        raise ValueError("class / addition embeddings (SDXL, upscalers) are not part of the SD1.x layout")
    blocks = unet_prefix_map(state, config)
    top = {f"{old}.": f"{new}." for old, new in UNET_TOP_LEVEL.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename(key, top)
        if new is None:
            resnet_prefixes = {k: v for k, v in blocks.items() if ".resnets." in k}
            new = _rename(key, resnet_prefixes, UNET_RESNET_PARTS)
        if new is None:
            new = _rename(key, {k: v for k, v in blocks.items() if ".resnets." not in k})
        if new is None:
            raise KeyError(f"no LDM name for UNet weight {key!r}")
        out[new] = tensor
    return out


def vae_prefix_map(config: Mapping[str, Any]) -> dict[str, str]:
    """diffusers module prefix -> LDM module prefix for an AutoencoderKL.

    The decoder's ``up_blocks`` run from low to high resolution, LDM's ``up`` levels from
    high to low, so ``up_blocks.i`` is ``up.{levels - 1 - i}``.
    """
    layers = _layers_per_block(config)
    levels = len(config["block_out_channels"])
    mapping: dict[str, str] = {}
    for level in range(levels):
        for j in range(layers):
            mapping[f"encoder.down_blocks.{level}.resnets.{j}."] = f"encoder.down.{level}.block.{j}."
        mapping[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = f"encoder.down.{level}.downsample.conv."
        ldm_level = levels - 1 - level
        for j in range(layers + 1):
            mapping[f"decoder.up_blocks.{level}.resnets.{j}."] = f"decoder.up.{ldm_level}.block.{j}."
        mapping[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = f"decoder.up.{ldm_level}.upsample.conv."
    for part in ("encoder", "decoder"):
        mapping[f"{part}.mid_block.resnets.0."] = f"{part}.mid.block_1."
        mapping[f"{part}.mid_block.resnets.1."] = f"{part}.mid.block_2."
    return mapping


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM names (without the file prefix).

    The mid-block attention's linear weights become the 1x1 convolution weights
    (``[C, C, 1, 1]``) that original checkpoints store.
    """
    blocks = vae_prefix_map(config)
    attention = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    top = {f"{old}.": f"{new}." for old, new in VAE_TOP_LEVEL.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        new = _rename(key, attention, VAE_ATTENTION_PARTS)
        if new is not None:
            if new.endswith(".weight") and tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
            out[new] = tensor
            continue
        new = _rename(key, top) or _rename(key, blocks, {"conv_shortcut": "nin_shortcut"})
        if new is None:
            if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)", key):
                new = key
            else:
                raise KeyError(f"no LDM name for VAE weight {key!r}")
        out[new] = tensor
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor], *, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict in the ``transformer.text_model.*`` names of
    original checkpoints (without the ``cond_stage_model.transformer.`` prefix).

    transformers >= 5.6 dropped the ``text_model.`` wrapper from CLIPTextModel; files on model
    sites still carry it, and usually the ``position_ids`` buffer older versions saved.
    """
    out = {key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()}
    if position_ids:
        positions = out["text_model.embeddings.position_embedding.weight"].shape[0]
        out.setdefault("text_model.embeddings.position_ids", torch.arange(positions)[None])
    return out


def ddpm_buffers(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The schedule buffers LDM's DDPM module saves beside the weights (SD1.x's scaled-linear
    schedule). Loaders must ignore them; they are here so test files look like real ones."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {
        "betas": betas.float(),
        "alphas_cumprod": alphas_cumprod.float(),
        "alphas_cumprod_prev": previous.float(),
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt().float(),
    }


def to_ldm_state_dict(unet: Any, vae: Any, text_encoder: Any, *, extras: bool = True) -> dict[str, torch.Tensor]:
    """One LDM-layout state dict for an SD1.x pipeline's three models (diffusers/transformers
    modules). ``extras`` adds what real files carry besides weights (schedule buffers,
    CLIP ``position_ids``). Tensors are made contiguous copies (safetensors refuses views)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in unet_to_ldm(unet.state_dict(), unet.config).items():
        state[UNET_PREFIX + key] = tensor
    for key, tensor in vae_to_ldm(vae.state_dict(), vae.config).items():
        state[VAE_PREFIX + key] = tensor
    for key, tensor in clip_to_ldm(text_encoder.state_dict(), position_ids=extras).items():
        state[CLIP_PREFIX + key] = tensor
    if extras:
        state.update(ddpm_buffers())
    return {key: tensor.detach().contiguous().clone() for key, tensor in state.items()}


def save_ldm_checkpoint(state: Mapping[str, torch.Tensor], path: Path | str) -> Path:
    """Write ``state`` as ``.safetensors`` or, for ``.ckpt``/``.pt``, as a pickle wrapped in
    ``{"state_dict": ..., "global_step": ...}`` like the original training checkpoints."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(dict(state), str(path))
    else:
        torch.save({"global_step": 840000, "state_dict": dict(state)}, path)
    return path
