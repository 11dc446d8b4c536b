"""kohya / A1111 LoRA keys (sd-scripts' naming): the name of the module a key addresses, and
peft LoRA layers renamed to those keys. What the LoRA loader matches files with and what the
training commands (LoRA, DreamBooth) save under, so a trained file loads back."""

from __future__ import annotations

import torch

__all__ = ["KOHYA_PREFIX_OF", "T5_PREFIX", "TEXT_ENCODERS", "canonical_path", "is_t5_path", "kohya_key", "kohya_state"]

# Component names are those of aipaint.models.latent.LatentDiffusionModel.modules() (text_encoder_2: the
# second text encoder of two-encoder models).
TEXT_ENCODERS: tuple[str, ...] = ("text_encoder", "text_encoder_2")
KOHYA_PREFIX_OF: dict[str, str] = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# sd-scripts' (and ComfyUI's) prefix for a T5 text encoder's modules (SD 3, FLUX), whatever the model calls
# that component: ``lora_te3_encoder_block_0_layer_0_SelfAttention_q``.
T5_PREFIX = "lora_te3_"
_PEFT_TO_KOHYA = ((".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up"))


def is_t5_path(path: str) -> bool:
    """Whether ``path`` is a module of a T5 encoder (``T5EncoderModel``: ``encoder.block.N…``, ``shared``)."""
    return path.startswith(("encoder.block.", "encoder.final_layer_norm", "shared"))


def canonical_path(component: str, path: str) -> str:
    """The module path LoRA files use. kohya and diffusers name text-encoder modules from
    ``text_model.`` (the transformers 4 layout); transformers 5 dropped that level in
    ``CLIPTextModel``. ``text_projection`` (a second encoder's projection) sits beside it in both,
    and a T5 encoder never had it."""
    if (component in TEXT_ENCODERS and not path.startswith("text_model.") and path != "text_projection"
            and not is_t5_path(path)):  # a T5 (FLUX's second encoder) has no text_model level
        return "text_model." + path
    return path


def kohya_key(component: str, module: str) -> str:
    """The kohya / A1111 base key of a module: ``lora_unet_down_blocks_0_…_to_q``,
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (text-encoder paths named from
    ``text_model.`` whatever transformers is installed). ``component`` is one of
    :data:`KOHYA_PREFIX_OF`'s keys (a KeyError otherwise)."""
    return KOHYA_PREFIX_OF[component] + canonical_path(component, module).replace(".", "_")


def kohya_state(module: torch.nn.Module, component: str, alpha: float, *, adapter_name: str) -> dict[str, torch.Tensor]:
    """The peft LoRA layers of ``module`` (adapter ``adapter_name``) under kohya keys: ``lora_A`` →
    ``<key>.lora_down.weight``, ``lora_B`` → ``<key>.lora_up.weight``, plus ``<key>.alpha``; float32,
    contiguous, on the CPU. A peft tensor of another kind is a RuntimeError (nothing is dropped)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(module, adapter_name=adapter_name)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        for peft_part, kohya_part in _PEFT_TO_KOHYA:
            if key.endswith(peft_part):
                base = kohya_key(component, key[: -len(peft_part)])
                out[f"{base}.{kohya_part}.weight"] = tensor.detach().to("cpu", torch.float32).contiguous()
                out[f"{base}.alpha"] = torch.tensor(float(alpha))
                break
        else:
            raise RuntimeError(f"unexpected peft tensor {key!r}")
    return out
