"""The kit's kohya / A1111 key naming and the peft → kohya state the training commands save with."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aipaint.plugin.kit.kohya import canonical_path, kohya_key, kohya_state
from aipaint.plugin.kit.training import peft_lora_copy

pytest.importorskip("peft")


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.proj = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.to_q(x) + self.to_k(x))


class Net(nn.Module):
    """Module paths like a UNet's: ``down_blocks.0.attn1.to_q``."""

    def __init__(self) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.ModuleDict({"attn1": Attention()})])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_blocks[0]["attn1"](x)


class Compiled(nn.Module):
    """What ``torch.compile`` returns: the network behind ``_orig_mod``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self._orig_mod = inner


def test_kohya_keys_name_text_encoder_modules_from_text_model():
    assert kohya_key("text_encoder", "encoder.layers.0.self_attn.q_proj") == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_key("text_encoder", "text_model.encoder.layers.1.mlp.fc1") == "lora_te_text_model_encoder_layers_1_mlp_fc1"
    assert kohya_key("text_encoder_2", "text_projection") == "lora_te2_text_projection"
    assert canonical_path("text_encoder_2", "text_projection") == "text_projection"
    assert kohya_key("unet", "mid_block.attentions.0.proj_in") == "lora_unet_mid_block_attentions_0_proj_in"
    assert canonical_path("unet", "encoder.x") == "encoder.x"  # only text encoders gain text_model.
    with pytest.raises(KeyError):
        kohya_key("vae", "encoder.conv_in")


def test_the_lora_loader_names_keys_with_the_kit():
    from aipaint_plugins.lora import formats

    assert formats.kohya_key is kohya_key and formats.canonical_path is canonical_path


def test_a_peft_lora_copy_trains_only_its_lora_layers_and_leaves_the_network_alone():
    torch.manual_seed(0)
    net = Net().half()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    copy = peft_lora_copy(Compiled(net), ["to_q", "to_k"], rank=2, alpha=3.0, adapter_name="kit_test")
    assert isinstance(copy, Net) and copy is not net
    trainable = sorted(n for n, p in copy.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"down_blocks.0.attn1.{m}.lora_{ab}.kit_test.weight" for m in ("to_q", "to_k") for ab in "AB")
    assert all(p.dtype == torch.float32 for p in copy.parameters())
    assert net.state_dict().keys() == before.keys()  # no LoRA layers were put into the original
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    x = torch.randn(3, 4)
    with torch.no_grad():  # lora_B starts at zero: the copy computes what the network does
        assert torch.allclose(copy(x), net.float()(x))


def test_kohya_state_renames_peft_tensors_to_kohya_keys_with_alpha():
    torch.manual_seed(0)
    copy = peft_lora_copy(Net(), ["to_q", "to_k"], rank=2, alpha=3.0, adapter_name="kit_test")
    with torch.no_grad():
        for name, p in copy.named_parameters():
            if "lora_B" in name:
                p.normal_()
    params = dict(copy.named_parameters())
    state = kohya_state(copy, "unet", 3.0, adapter_name="kit_test")
    expected = {}
    for module in ("to_q", "to_k"):
        base, path = f"lora_unet_down_blocks_0_attn1_{module}", f"down_blocks.0.attn1.{module}"
        expected[f"{base}.lora_down.weight"] = params[f"{path}.lora_A.kit_test.weight"]
        expected[f"{base}.lora_up.weight"] = params[f"{path}.lora_B.kit_test.weight"]
        expected[f"{base}.alpha"] = torch.tensor(3.0)
    assert state.keys() == expected.keys()
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu" and tensor.is_contiguous(), key
        assert not tensor.requires_grad and torch.equal(tensor, expected[key]), key


def test_kohya_state_refuses_a_peft_tensor_it_cannot_name():
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"], bias="lora_only")
    net = inject_adapter_in_model(config, Net(), adapter_name="kit_test")
    with pytest.raises(RuntimeError, match=r"unexpected peft tensor .*to_q\..*bias"):
        kohya_state(net, "unet", 2.0, adapter_name="kit_test")
