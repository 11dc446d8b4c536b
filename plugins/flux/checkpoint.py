"""FLUX transformer checkpoints in Black Forest Labs' layout → diffusers' ``FluxTransformer2DModel``.

BFL's files (``flux1-dev.safetensors``, ``flux1-schnell.safetensors`` and the fine-tunes
published in that layout, bare or under ComfyUI's ``model.diffusion_model.`` prefix) fuse
q/k/v, and the single blocks fuse q/k/v with the MLP's input. The renames and splits are
those of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, with the widths read
from the config instead of fixed at the real model's 3072 (so any size converts, which the
tests rely on). Imports torch: load it only when a checkpoint is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

PREFIX = "model.diffusion_model."

_RENAMES = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def is_bfl_transformer(keys: set[str]) -> bool:
    return any(prefix + "double_blocks.0.img_attn.qkv.weight" in keys for prefix in ("", PREFIX))


def bfl_to_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The diffusers state dict of a BFL-layout FLUX transformer whose diffusers ``config`` is given.

    Keys that are not the transformer's (a VAE or text encoders in an all-in-one file) are left
    out; a transformer key this conversion does not know raises ``KeyError`` naming it.
    """
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    prefixed = any(k.startswith(PREFIX) for k in state_dict)  # ComfyUI's all-in-one layout
    source = {k.removeprefix(PREFIX): v for k, v in state_dict.items() if not prefixed or k.startswith(PREFIX)}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        stem, _, leaf = key.rpartition(".")  # leaf: weight, bias or scale
        parts = key.split(".")
        if stem in _RENAMES:
            out[f"{_RENAMES[stem]}.{leaf}"] = tensor
        elif stem == "final_layer.adaLN_modulation.1":
            shift, scale = tensor.chunk(2, dim=0)  # BFL: (shift, scale); diffusers: (scale, shift)
            out[f"norm_out.linear.{leaf}"] = torch.cat([scale, shift], dim=0)
        elif parts[0] == "double_blocks":
            block, rest = f"transformer_blocks.{parts[1]}.", ".".join(parts[2:])
            rest_stem = rest.rpartition(".")[0]
            if rest in _DOUBLE_NORMS:
                out[block + _DOUBLE_NORMS[rest]] = tensor
            elif rest_stem in _QKV:
                for name, piece in zip(_QKV[rest_stem], torch.chunk(tensor, 3, dim=0), strict=True):
                    out[f"{block}{name}.{leaf}"] = piece
            elif rest_stem in _DOUBLE:
                out[f"{block}{_DOUBLE[rest_stem]}.{leaf}"] = tensor
            else:
                raise KeyError(f"unknown FLUX double-block weight {key}")
        elif parts[0] == "single_blocks":
            block, rest = f"single_transformer_blocks.{parts[1]}.", ".".join(parts[2:])
            rest_stem = rest.rpartition(".")[0]
            if rest in _SINGLE_NORMS:
                out[block + _SINGLE_NORMS[rest]] = tensor
            elif rest_stem == "linear1":
                sizes = (inner, inner, inner, tensor.shape[0] - 3 * inner)
                names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
                for name, piece in zip(names, torch.split(tensor, sizes, dim=0), strict=True):
                    out[f"{block}{name}.{leaf}"] = piece
            elif rest_stem in _SINGLE:
                out[f"{block}{_SINGLE[rest_stem]}.{leaf}"] = tensor
            else:
                raise KeyError(f"unknown FLUX single-block weight {key}")
        elif key.startswith(("vae.", "text_encoders.", "cond_stage_model.", "first_stage_model.", "conditioner.")):
            continue  # another component of an all-in-one file
        else:
            raise KeyError(f"unknown FLUX transformer weight {key}")
    return out


def load_transformer(path: str, config_folder: str, dtype: torch.dtype) -> Any:
    """A ``FluxTransformer2DModel`` built from ``config_folder``'s config, filled from a BFL file."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    config = FluxTransformer2DModel.load_config(config_folder)
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    converted = bfl_to_diffusers(load_file(path), config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise ValueError(
            f"the checkpoint does not fit the config: {len(missing)} missing weight(s) (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'})"
        )
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return model.to(dtype)
