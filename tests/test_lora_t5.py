"""kohya LoRA keys on a T5 text encoder (sd-scripts' and ComfyUI's ``lora_te3_``), for SD 3 (its
``text_encoder_3``) and FLUX (its ``text_encoder_2``): the patch lands on the T5 module it names."""

from __future__ import annotations

import pytest
import torch
from aipaint_plugins.lora.api import LoraUse, apply_loras
from safetensors.torch import save_file

import aipaint

T5_MODULE = "encoder.block.0.layer.0.SelfAttention.q"


def t5_lora(folder, linear: torch.nn.Linear) -> torch.Tensor:
    """A kohya file patching ``T5_MODULE``; returns the weight change it makes at weight 1 (alpha = rank)."""
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(linear.out_features, 2, generator=g), torch.randn(2, linear.in_features, generator=g)
    key = "lora_te3_" + T5_MODULE.replace(".", "_")
    save_file({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down, f"{key}.alpha": torch.tensor(2.0)},
              str(folder / "t5.safetensors"))
    return up @ down


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from test_flux import build_tiny_flux_components
    from test_sd3 import build_tiny_sd3_components

    root = tmp_path_factory.mktemp("t5-lora")
    FluxPipeline(**build_tiny_flux_components(0)).save_pretrained(root / "flux")
    StableDiffusion3Pipeline(**build_tiny_sd3_components(0)).save_pretrained(root / "sd3")
    return {"flux": (aipaint.load(root / "flux"), "text_encoder_2"), "sd3": (aipaint.load(root / "sd3"), "text_encoder_3")}


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_lora_te3_keys_patch_the_t5_encoder_and_are_restored(models, family, tmp_path):
    pipe, component = models[family]
    linear = dict(getattr(pipe.model, component).named_modules())[T5_MODULE]
    before = linear.weight.detach().clone()
    delta = t5_lora(tmp_path, linear)
    with apply_loras(pipe.model, [LoraUse("t5", 0.5)], folder=tmp_path):
        assert torch.allclose(linear.weight, before + 0.5 * delta, atol=1e-5)
    assert torch.equal(linear.weight, before)
    plain = pipe.txt2img("a cat", seed=3, steps=2, width=32, height=32).image
    tagged = pipe.txt2img("a cat <lora:t5:1>", seed=3, steps=2, width=32, height=32,
                          options={"lora": {"folder": str(tmp_path)}}).image
    assert plain.tobytes() != tagged.tobytes()
