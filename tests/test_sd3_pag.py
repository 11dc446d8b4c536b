"""Perturbed-attention guidance on SD 3's MMDiT: parity with diffusers' StableDiffusion3PAGPipeline
on a tiny random SD 3 (three joint blocks, so the default ``blocks.1`` is a full joint block and
``blocks.2`` the last, text-less one), the perturbed joint attention against diffusers' PAG
processors, SD 3.5's query/key norms and dual attention, LoRA, the PNG record, and FLUX refused.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_sd3 import PROMPT, as_array, build_tiny_sd3_components, quantised

import aipaint
from aipaint.errors import InvalidParameter, UnsupportedFeature

GEN = dict(sampler="Euler", steps=3, seed=7, width=32, height=32)


def tiny_mmdit(seed: int = 2, **overrides):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    config = dict(sample_size=32, patch_size=1, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                  caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64, out_channels=16)
    return SD3Transformer2DModel(**(config | overrides)).eval()


@pytest.fixture(scope="module")
def sd3_pag_path(tmp_path_factory) -> Path:
    from diffusers import StableDiffusion3Pipeline

    components = build_tiny_sd3_components(0)
    components["transformer"] = tiny_mmdit()
    root = tmp_path_factory.mktemp("tiny-sd3-three-blocks") / "sd3"
    StableDiffusion3Pipeline(**components).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def pipe(sd3_pag_path, plugin_host):
    return aipaint.load(sd3_pag_path, host=plugin_host)


def diffusers_pag(path: Path, layers: str, lora: Path | None = None):
    from diffusers import StableDiffusion3PAGPipeline

    ref = StableDiffusion3PAGPipeline.from_pretrained(path, local_files_only=True, pag_applied_layers=layers.split(","))
    ref.set_progress_bar_config(disable=True)
    if lora is not None:
        ref.load_lora_weights(str(lora))
    return ref


def images(result) -> np.ndarray:
    return np.stack([as_array(image) for image in result.images])


@pytest.mark.parametrize(("negative", "cfg", "scale", "layers", "adaptive", "batch"), [
    ("blue", 5.0, 3.0, "", 0.0, 1),               # the default layers: blocks.1
    ("", 5.0, 3.0, "blocks.1", 0.0, 2),            # CFG without a negative prompt, two images
    ("", 1.0, 3.0, "", 0.0, 1),                    # CFG off: positive + scale * (positive - perturbed)
    ("blue", 4.0, 2.0, "blocks.2", 0.001, 1),      # the last block (no text output), adaptive scale
    ("blue", 5.0, 2.0, "blocks.0,blocks.2", 0.0, 1),
], ids=["cfg5-default", "cfg5-no-negative-batch2", "no-cfg", "last-block-adaptive", "two-layers"])
def test_matches_diffusers_sd3_pag_pipeline(pipe, sd3_pag_path, negative, cfg, scale, layers, adaptive, batch):
    from aipaint.infotext import Infotext

    options = {"pag": {"scale": scale, "adaptive_scale": adaptive} | ({"layers": layers} if layers else {})}
    ours = pipe.txt2img(PROMPT, negative, cfg_scale=cfg, batch_size=batch, **GEN, options=options)
    plain = pipe.txt2img(PROMPT, negative, cfg_scale=cfg, batch_size=batch, **GEN)
    ref = diffusers_pag(sd3_pag_path, layers or "blocks.1")  # diffusers' own default for this pipeline
    generators = [torch.Generator().manual_seed(7 + i) for i in range(batch)]
    theirs = ref(PROMPT, negative_prompt=negative, num_inference_steps=3, guidance_scale=cfg, pag_scale=scale,
                 pag_adaptive_scale=adaptive, generator=generators, num_images_per_prompt=batch, width=32, height=32,
                 output_type="np").images
    gap = np.abs(images(ours) - quantised(theirs)).mean()
    effect = np.abs(images(ours) - images(plain)).mean()
    assert gap < 1e-3
    assert effect > 20 * max(gap, 1e-4), f"PAG changed the picture by only {effect:.2e}: the parity cannot tell"
    assert Infotext.from_text(ours.parameters).params["PAG layers"] == (layers or "blocks.1")  # recorded as run


@pytest.mark.parametrize("block", [1, 2], ids=["joint-block", "last-block"])
@pytest.mark.parametrize("cfg", [False, True], ids=["pag", "pag-cfg"])
def test_perturbed_rows_equal_diffusers_pag_joint_processors(block, cfg):
    """At one layer: the wrapped processor's kept rows are the layer's own, its perturbed rows
    are diffusers' ``PAG(CFG)JointAttnProcessor2_0``'s (image patches attend to themselves and the text)."""
    from aipaint_plugins.guidance.pag import perturbed_layers
    from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0, PAGJointAttnProcessor2_0

    transformer = tiny_mmdit()
    attn = transformer.transformer_blocks[block].attn
    original = attn.processor
    parts = 3 if cfg else 2
    torch.manual_seed(1)
    x, context = torch.randn(parts, 16, 32), torch.randn(parts, 5, 32)
    with torch.no_grad():
        with perturbed_layers(transformer, [f"blocks.{block}"]) as rows:
            rows.first = parts - 1
            image, text = attn(x, context)
        theirs = (PAGCFGJointAttnProcessor2_0() if cfg else PAGJointAttnProcessor2_0())(attn, x, context)
        kept = original(attn, x[:-1], context[:-1])
    assert attn.processor is original
    torch.testing.assert_close(image, theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(text, theirs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(image[:-1], kept[0])
    torch.testing.assert_close(text[:-1], kept[1])
    assert not torch.allclose(image[-1], kept[0][-1], atol=1e-3)


def test_sd35_query_key_norms_and_dual_attention_are_perturbed_as_the_layer_runs():
    """SD 3.5 (``qk_norm``, and ``attn2`` self-attention in the first blocks of 3.5 Medium):
    the kept rows are the MMDiT's own output; in ``attn2`` the perturbed rows get identity
    attention; the joint path applies the layer's query/key norms (diffusers' PAG processors skip
    them, and fail on ``attn2``), so with one image token it is the layer's own attention."""
    from aipaint_plugins.guidance.pag import identity_attention, joint_identity_attention, perturbed_layers

    transformer = tiny_mmdit(qk_norm="rms_norm", dual_attention_layers=(0, 1))
    with torch.no_grad():
        for module in transformer.modules():  # RMSNorm weights start at 1: make the norms matter
            if type(module).__name__ == "RMSNorm" and module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
    block = transformer.transformer_blocks[1]
    torch.manual_seed(3)
    latents, embeds, pooled = torch.randn(1, 16, 4, 4), torch.randn(1, 6, 96), torch.randn(1, 64)
    t = torch.tensor([500.0, 500.0])

    def run(first):
        with perturbed_layers(transformer, ["blocks.1"]) as rows:
            assert {type(block.attn.processor).__name__, type(block.attn2.processor).__name__} == {"PerturbedSelfAttention"}
            rows.first = first
            return transformer(hidden_states=latents.repeat(2, 1, 1, 1), encoder_hidden_states=embeds.repeat(2, 1, 1),
                               pooled_projections=pooled.repeat(2, 1), timestep=t, return_dict=False)[0]

    with torch.no_grad():
        plain = transformer(hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled,
                            timestep=t[:1], return_dict=False)[0]
        perturbed, untouched = run(1), run(None)
        torch.testing.assert_close(perturbed[:1], plain, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(untouched, plain.repeat(2, 1, 1, 1), atol=1e-5, rtol=1e-5)
        assert (perturbed[1] - plain[0]).abs().mean() > 1e-3
        x, context = torch.randn(2, 1, 32), torch.randn(2, 5, 32)
        own = block.attn.processor(block.attn, x, context)
        for ours, theirs in zip(joint_identity_attention(block.attn, x, context), own, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        x = torch.randn(2, 16, 32)
        torch.testing.assert_close(identity_attention(block.attn2, x), block.attn2.to_out[0](block.attn2.to_v(x)))


def test_default_layers_are_the_models_and_flux_is_refused(pipe):
    from aipaint_plugins.guidance.pag import default_layers
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    assert default_layers(pipe.model) == "blocks.1"
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    assert default_layers(SimpleNamespace(unet=unet)) == "mid"
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                  num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                  axes_dims_rope=(4, 4, 8))
    with pytest.raises(UnsupportedFeature, match="PAG.*FluxTransformer2DModel.*diffusers has no PAG"):
        default_layers(SimpleNamespace(unet=flux))


def test_processors_are_restored_and_bad_layers_refused(pipe):
    transformer = pipe.model.transformer
    before = dict(transformer.attn_processors)
    pipe.txt2img(PROMPT, cfg_scale=4, **GEN, options={"pag": {}})
    assert transformer.attn_processors == before
    with pytest.raises(InvalidParameter, match=r"pag\.layers.*SD3Transformer2DModel"):
        pipe.txt2img(PROMPT, **GEN, options={"pag": {"layers": "blocks.1,blocks.7"}})
    with pytest.raises(InvalidParameter, match=r"pag\.layers.*SD3Transformer2DModel"):
        pipe.txt2img(PROMPT, **GEN, options={"pag": {"layers": "mid"}})  # a UNet's name
    assert transformer.attn_processors == before


def test_scale_zero_is_plain_guidance(pipe):
    plain = pipe.txt2img(PROMPT, "blue", cfg_scale=5, **GEN)
    zero = pipe.txt2img(PROMPT, "blue", cfg_scale=5, **GEN, options={"pag": {"scale": 0}})
    assert np.abs(as_array(zero.image) - as_array(plain.image)).max() <= 1 / 255


def test_lora_composes_with_pag_as_in_diffusers(pipe, sd3_pag_path, tmp_path):
    """A LoRA on the perturbed block's joint attention (image and text projections) and on block
    0's MLP: aipaint's PAG + LoRA equals diffusers' SD 3 PAG pipeline after ``load_lora_weights``."""
    from safetensors.torch import save_file

    modules = {"transformer_blocks.1.attn.to_q": (32, 32), "transformer_blocks.1.attn.to_v": (32, 32),
               "transformer_blocks.1.attn.add_k_proj": (32, 32), "transformer_blocks.0.ff.net.0.proj": (128, 32)}
    generator = torch.Generator().manual_seed(0)
    ours, theirs = {}, {}
    for module, (out, inp) in modules.items():
        down, up = torch.randn(2, inp, generator=generator) * 0.5, torch.randn(out, 2, generator=generator) * 0.5
        ours |= {f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up}
        theirs |= {f"transformer.{module}.lora_A.weight": down.clone(), f"transformer.{module}.lora_B.weight": up.clone()}
    (tmp_path / "loras").mkdir()
    save_file(ours, str(tmp_path / "loras" / "style.safetensors"))
    save_file(theirs, str(tmp_path / "theirs.safetensors"))
    options = {"lora": {"folder": str(tmp_path / "loras")}, "pag": {"scale": 3.0}}
    styled = as_array(pipe.txt2img(PROMPT + " <lora:style:1>", "blue", cfg_scale=5.0, **GEN, options=options).image)
    unstyled = as_array(pipe.txt2img(PROMPT, "blue", cfg_scale=5.0, **GEN, options={"pag": {"scale": 3.0}}).image)
    ref = diffusers_pag(sd3_pag_path, "blocks.1", lora=tmp_path / "theirs.safetensors")
    expected = ref(PROMPT, negative_prompt="blue", num_inference_steps=3, guidance_scale=5.0, pag_scale=3.0,
                   generator=torch.Generator().manual_seed(7), width=32, height=32, output_type="np").images[0]
    assert np.abs(styled - quantised(expected)).mean() < 1e-3
    assert np.abs(styled - unstyled).mean() > 1e-2


def test_recorded_with_forge_names_and_regenerated_from_the_png(sd3_pag_path, tmp_path):
    from PIL import Image

    from aipaint.cli.main import main as cli_main
    from aipaint.infotext import read_png_parameters

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["-m", str(sd3_pag_path), "--no-progress"]
    assert cli_main(["generate", PROMPT, "--option", "pag.scale=2.5", "--cfg-scale", "4", "--steps", "3", "-W", "32",
                     "-H", "32", "--seed", "1", "-o", str(first), *common]) == 0
    text = read_png_parameters(first)
    assert "PerturbedAttentionGuidance_scale: 2.5" in text and "PerturbedAttentionGuidance_enabled: True" in text
    assert "PAG layers: blocks.1" in text  # the model's default, recorded as run
    assert cli_main(["generate", "--from-png", str(first), "-o", str(again), *common]) == 0
    assert "PerturbedAttentionGuidance_scale: 2.5" in read_png_parameters(again)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
