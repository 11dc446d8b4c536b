"""FLUX.1 through aipaint's core loop, checked against diffusers' own FLUX pipelines.

Tiny random-weight components with diffusers' test-sized FLUX transformer (one double and
one single block), a tiny CLIP text encoder with the real CLIP tokenizer, a tiny T5 encoder
with a small Unigram vocabulary built offline, and a small VAE with FLUX's shift and scale;
32 px images (16×16 latents, 64 packed tokens), 2-4 steps.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import aipaint
from aipaint.errors import InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.models.family import ModelSource

PROMPT = "a big red circle on the left"
WORDS = "a big small red blue green yellow circle square triangle cross on the left right top bottom white black gray background".split()


def build_t5_tokenizer():
    """A T5 tokenizer with a small Unigram vocabulary (no download)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0 - i * 0.01) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_flux_components(seed: int = 0, *, dev: bool = True, clip_tokenizer=None) -> dict:
    """diffusers' test-sized FLUX transformer with a VAE of 4 latent channels (16 packed)."""
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=dev,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=3, vocab_size=49408, max_position_embeddings=77, projection_dim=32,
    ))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    ))
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4, norm_num_groups=8, layers_per_block=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
        shift=3.0 if dev else 1.0, use_dynamic_shifting=dev,
    )
    return {
        "transformer": transformer.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
        "tokenizer": clip_tokenizer or build_clip_tokenizer(), "text_encoder_2": text_encoder_2.eval(),
        "tokenizer_2": tokenizer_2, "scheduler": scheduler,
    }


@pytest.fixture(scope="module")
def flux_paths(tmp_path_factory) -> dict[str, Path]:
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import FluxPipeline

    root = tmp_path_factory.mktemp("tiny-flux")
    tokenizer = build_clip_tokenizer()
    FluxPipeline(**build_tiny_flux_components(0, dev=True, clip_tokenizer=tokenizer)).save_pretrained(root / "dev")
    FluxPipeline(**build_tiny_flux_components(1, dev=False, clip_tokenizer=tokenizer)).save_pretrained(root / "schnell")
    return {"dev": root / "dev", "schnell": root / "schnell"}


@pytest.fixture(scope="module")
def dev(flux_paths, plugin_host):
    return aipaint.load(flux_paths["dev"], host=plugin_host)


@pytest.fixture(scope="module")
def schnell(flux_paths, plugin_host):
    return aipaint.load(flux_paths["schnell"], host=plugin_host)


def reference(path: Path, kind: str = "FluxPipeline"):
    import diffusers

    pipe = getattr(diffusers, kind).from_pretrained(path, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64) / 255.0


def quantised(reference: np.ndarray) -> np.ndarray:
    """diffusers' float output rounded as aipaint rounds to 8-bit pixels."""
    return np.round(reference * 255.0) / 255.0


def noise_picture(size: int = 32, seed: int = 0):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))


# --- loading and identification ---------------------------------------------------------


def test_folders_load_as_flux_dev_and_schnell_with_the_family_defaults(dev, schnell):
    for pipe, variant, steps in ((dev, "dev", 28), (schnell, "schnell", 4)):
        model = pipe.model
        assert model.family == "flux" and model.variant == variant
        assert model.transformer is model.unet and type(model.transformer).__name__ == "FluxTransformer2DModel"
        assert set(model.modules()) == {"unet", "vae", "text_encoder", "text_encoder_2"}
        d = model.defaults
        assert (d.width, d.height, d.steps, d.cfg_scale, d.sampler) == (1024, 1024, steps, 1.0, "Euler")
        assert model.unet_in_channels == model.latent_channels == 4
    assert dev.model.max_sequence_length == 512 and schnell.model.max_sequence_length == 256


def test_sd_folders_are_not_claimed_by_flux(tiny_sd_path, plugin_host):
    family = plugin_host.registry.families.get("flux")
    assert not family.identify(ModelSource(tiny_sd_path, "folder", "tiny"))


# --- generation against diffusers --------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "options", "guidance", "width", "height"),
    [
        ("dev", {}, 3.5, 32, 32),  # the default distilled guidance
        ("dev", {"flux": {"distilled_cfg_scale": 6.0}}, 6.0, 48, 32),
        ("schnell", {}, None, 32, 32),
    ],
)
def test_txt2img_matches_diffusers_flux_pipeline(request, flux_paths, variant, options, guidance, width, height):
    pipe = request.getfixturevalue(variant)
    steps = 4 if variant == "schnell" else 3
    result = pipe.txt2img(PROMPT, steps=steps, seed=7, width=width, height=height, options=options)
    kwargs = {"guidance_scale": guidance} if guidance is not None else {}
    expected = reference(flux_paths[variant])(
        PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(7), width=width, height=height,
        max_sequence_length=pipe.model.max_sequence_length, output_type="np", **kwargs,
    ).images[0]
    ours = as_array(result.image)
    assert ours.shape == (height, width, 3)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert ours.std() > 0.01  # not a blank image that trivially matches
    assert "CFG scale: 1," in result.parameters and "Sampler: Euler" in result.parameters
    if guidance is None:
        assert "Distilled CFG Scale" not in result.parameters
    else:
        assert f"Distilled CFG Scale: {guidance:g}" in result.parameters


def test_true_cfg_with_a_negative_prompt_matches_diffusers_true_cfg_scale(dev, flux_paths):
    result = dev.txt2img(PROMPT, "blue", cfg_scale=2.0, steps=2, seed=5, width=32, height=32)
    expected = reference(flux_paths["dev"])(
        PROMPT, negative_prompt="blue", true_cfg_scale=2.0, guidance_scale=3.5, num_inference_steps=2,
        generator=torch.Generator().manual_seed(5), width=32, height=32, output_type="np",
    ).images[0]
    assert np.abs(as_array(result.image) - quantised(expected)).mean() < 1e-3
    assert "CFG scale: 2," in result.parameters


def test_distilled_cfg_scale_reads_back_from_forge_parameters_and_is_refused_on_schnell(dev, schnell):
    from aipaint_plugins.flux import options_from_png

    from aipaint.infotext import Infotext

    result = dev.txt2img(PROMPT, steps=1, seed=1, width=32, height=32, options={"flux": {"distilled_cfg_scale": 4.5}})
    params = Infotext.from_text(result.parameters).params
    assert params["Distilled CFG Scale"] == "4.5"
    import argparse

    assert options_from_png(argparse.Namespace(), params) == {"flux": {"distilled_cfg_scale": "4.5"}}
    assert options_from_png(argparse.Namespace(distilled_cfg_scale=2.0), params) == {"flux": {"distilled_cfg_scale": 2.0}}
    with pytest.raises(UnsupportedFeature, match="schnell"):
        schnell.txt2img(PROMPT, steps=1, seed=1, width=32, height=32, options={"flux": {"distilled_cfg_scale": 3.5}})
    with pytest.raises(InvalidParameter, match="distilled_cfg_scale"):
        dev.txt2img(PROMPT, steps=1, width=32, height=32, options={"flux": {"distilled_cfg_scale": -1}})


def test_sizes_must_fill_whole_latent_patches_and_the_shift_follows_the_token_count(dev):
    from aipaint_plugins.flux.model import calculate_shift

    # Requests are multiples of 8 px; the tiny VAE's latents (factor 2) then always pair up, while
    # the real one's (factor 8) need multiples of 16 px: checked where the sampler is planned.
    with pytest.raises(InvalidParameter, match="multiple of 4"):
        dev.model.sampling_config(34, 32)  # 17 latent columns: no 2×2 patches
    config = dev.model.sampling_config(48, 32)
    assert config["mu"] == calculate_shift(12 * 8) and config["linear_sigmas"] is True


def test_adapter_units_and_refiners_are_refused(dev, tiny_pipe):
    with pytest.raises(UnsupportedFeature, match="refiner"):
        dev.txt2img(PROMPT, steps=1, width=32, height=32, refiner=tiny_pipe)


def test_prompt_emphasis_reaches_the_t5_embeddings(dev):
    plain, weighted = dev.model.encode_texts([PROMPT, "a big (red:1.6) circle on the left"])
    assert plain.embeds.shape == (1, 512, 32) and plain.extras["pooled_projections"].shape == (1, 32)
    assert not torch.equal(plain.embeds, weighted.embeds)
    # CLIP's pooled output is unweighted (as SDXL's is in A1111): the same text, the same pool.
    torch.testing.assert_close(plain.extras["pooled_projections"], weighted.extras["pooled_projections"])


def test_prompt_editing_runs_through_the_loop_and_clip_skip_is_refused(dev):
    kwargs = dict(steps=4, seed=3, width=32, height=32)
    plain = as_array(dev.txt2img(PROMPT, **kwargs).image)
    edited = as_array(dev.txt2img("a big [red:blue:0.5] circle on the left", **kwargs).image)
    assert np.abs(plain - edited).max() > 0
    with pytest.raises(UnsupportedFeature, match="clip_skip"):
        dev.txt2img(PROMPT, clip_skip=2, **kwargs)


# --- image modes -------------------------------------------------------------------------


def test_img2img_matches_diffusers_flux_img2img_pipeline(dev, flux_paths):
    from aipaint.engine.modes import to_tensor

    image = noise_picture()
    ours = dev.img2img(image, PROMPT, denoising_strength=0.75, steps=4, seed=3, width=32, height=32)
    # aipaint encodes with the VAE posterior's mean (A1111's default); diffusers samples it, so
    # it gets the same latents and the comparison covers the rest: noising, sigmas, the loop.
    with torch.inference_mode():
        latents = dev.model.encode(to_tensor(image))
    expected = reference(flux_paths["dev"], "FluxImg2ImgPipeline")(
        PROMPT, image=latents, strength=0.75, num_inference_steps=4, guidance_scale=3.5,
        generator=torch.Generator().manual_seed(3), width=32, height=32, output_type="np",
    ).images[0]
    assert np.abs(as_array(ours.image) - quantised(expected)).mean() < 1e-3
    assert np.abs(as_array(ours.image) - as_array(image)).mean() > 0.01


def test_inpaint_matches_diffusers_flux_inpaint_pipeline_inside_the_mask(schnell, flux_paths):
    from PIL import Image

    from aipaint.engine.modes import to_tensor

    image = noise_picture(seed=1)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 4, 24, 20))
    ours = schnell.inpaint(image, mask, PROMPT, denoising_strength=1.0, mask_blur=0, steps=4, seed=2, width=32, height=32)
    with torch.inference_mode():
        latents = schnell.model.encode(to_tensor(image))
    # Latents for the image (diffusers would sample the posterior); a pixel stand-in for the
    # masked image, which diffusers encodes after drawing the noise and never uses without Fill.
    expected = reference(flux_paths["schnell"], "FluxInpaintPipeline")(
        PROMPT, image=latents, mask_image=mask, masked_image_latents=torch.zeros(1, 3, 32, 32), strength=1.0,
        num_inference_steps=4, generator=torch.Generator().manual_seed(2), width=32, height=32, output_type="np",
        max_sequence_length=256,
    ).images[0]
    inside = np.asarray(mask) > 0
    ours_px, original = as_array(ours.image), as_array(image)
    assert np.abs(ours_px[inside] - quantised(expected)[inside]).max() <= 1.5 / 255
    assert expected[inside].std() > 0.01
    np.testing.assert_array_equal(ours_px[~inside], original[~inside])  # A1111's overlay outside


def test_outpaint_extends_the_canvas_and_keeps_the_original(schnell):
    image = noise_picture(seed=2)
    result = schnell.outpaint(image, PROMPT, right=16, steps=2, seed=1)
    assert result.image.size == (48, 32) and "Outpaint right: 16" in result.parameters
    np.testing.assert_array_equal(as_array(result.image)[:, :32], as_array(image))  # feathered only inside the new area


# --- single files ------------------------------------------------------------------------


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers FLUX transformer state dict in Black Forest Labs' layout (what flux1-*.safetensors hold)."""
    from aipaint_plugins.flux import checkpoint as ck

    out: dict[str, torch.Tensor] = {}
    state = dict(state)
    for bfl, ours in ck._RENAMES.items():
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in state:
                out[f"{bfl}.{leaf}"] = state.pop(f"{ours}.{leaf}")
    for leaf in ("weight", "bias"):
        scale, shift = state.pop(f"norm_out.linear.{leaf}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{leaf}"] = torch.cat([shift, scale])
    blocks = {k.split(".")[1] for k in state if k.startswith("transformer_blocks.")}
    for i in blocks:
        b = f"transformer_blocks.{i}."
        for bfl, ours in ck._DOUBLE_NORMS.items():
            out[f"double_blocks.{i}.{bfl}"] = state.pop(b + ours)
        for leaf in ("weight", "bias"):
            for bfl, names in ck._QKV.items():
                out[f"double_blocks.{i}.{bfl}.{leaf}"] = torch.cat([state.pop(f"{b}{n}.{leaf}") for n in names])
            for bfl, ours in ck._DOUBLE.items():
                out[f"double_blocks.{i}.{bfl}.{leaf}"] = state.pop(f"{b}{ours}.{leaf}")
    singles = {k.split(".")[1] for k in state if k.startswith("single_transformer_blocks.")}
    for i in singles:
        b = f"single_transformer_blocks.{i}."
        for bfl, ours in ck._SINGLE_NORMS.items():
            out[f"single_blocks.{i}.{bfl}"] = state.pop(b + ours)
        for leaf in ("weight", "bias"):
            names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
            out[f"single_blocks.{i}.linear1.{leaf}"] = torch.cat([state.pop(f"{b}{n}.{leaf}") for n in names])
            for bfl, ours in ck._SINGLE.items():
                out[f"single_blocks.{i}.{bfl}.{leaf}"] = state.pop(f"{b}{ours}.{leaf}")
    assert not state, f"unconverted: {sorted(state)}"
    return {prefix + k: v.contiguous() for k, v in out.items()}


def test_bfl_conversion_matches_diffusers_converter_at_the_real_width():
    """diffusers' own converter fixes the width at 3072 (the real models'): on a synthetic BFL
    state dict of that width (thin tensors), ours gives exactly its keys and tensors."""
    from aipaint_plugins.flux.checkpoint import bfl_to_diffusers
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    g = torch.Generator().manual_seed(0)
    inner, mlp = 3072, 12288
    shapes = {
        "time_in.in_layer": 4, "time_in.out_layer": 4, "vector_in.in_layer": 4, "vector_in.out_layer": 4,
        "guidance_in.in_layer": 4, "guidance_in.out_layer": 4, "txt_in": 4, "img_in": 4, "final_layer.linear": 4,
        "final_layer.adaLN_modulation.1": 6,
        "double_blocks.0.img_mod.lin": 6, "double_blocks.0.txt_mod.lin": 6, "double_blocks.0.img_attn.qkv": 3 * inner,
        "double_blocks.0.txt_attn.qkv": 3 * inner, "double_blocks.0.img_mlp.0": 8, "double_blocks.0.img_mlp.2": 4,
        "double_blocks.0.txt_mlp.0": 8, "double_blocks.0.txt_mlp.2": 4, "double_blocks.0.img_attn.proj": 4,
        "double_blocks.0.txt_attn.proj": 4, "single_blocks.0.modulation.lin": 6,
        "single_blocks.0.linear1": 3 * inner + mlp, "single_blocks.0.linear2": 4,
    }
    bfl = {}
    for stem, rows in shapes.items():
        bfl[f"{stem}.weight"] = torch.randn(rows, 2, generator=g)
        bfl[f"{stem}.bias"] = torch.randn(rows, generator=g)
    for norm in ("img_attn.norm.query_norm", "img_attn.norm.key_norm", "txt_attn.norm.query_norm", "txt_attn.norm.key_norm"):
        bfl[f"double_blocks.0.{norm}.scale"] = torch.randn(128, generator=g)
    for norm in ("norm.query_norm", "norm.key_norm"):
        bfl[f"single_blocks.0.{norm}.scale"] = torch.randn(128, generator=g)
    theirs = convert_flux_transformer_checkpoint_to_diffusers({"model.diffusion_model." + k: v for k, v in bfl.items()})
    ours = bfl_to_diffusers(bfl, {"num_attention_heads": 24, "attention_head_dim": 128})
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_transformer_loads_with_a_flux_folder_as_config(dev, flux_paths, tmp_path, plugin_host, prefix):
    from safetensors.torch import save_file

    path = tmp_path / "flux1-dev-tiny.safetensors"
    save_file(diffusers_to_bfl(dev.model.transformer.state_dict(), prefix), str(path))
    family = plugin_host.registry.families.get("flux")
    assert family.identify(ModelSource(path, "file", "tiny"))
    loaded = aipaint.load(path, host=plugin_host, config=flux_paths["dev"])
    assert loaded.model.family == "flux" and loaded.model.variant == "dev"
    kwargs = dict(steps=2, seed=9, width=32, height=32)
    np.testing.assert_array_equal(as_array(loaded.txt2img(PROMPT, **kwargs).image), as_array(dev.txt2img(PROMPT, **kwargs).image))
    assert loaded.model.model_hash and loaded.model.hash_path == path


def test_single_file_without_a_weights_folder_says_what_to_pass(dev, tmp_path, plugin_host):
    from safetensors.torch import save_file

    path = tmp_path / "flux1-dev-tiny.safetensors"
    save_file(diffusers_to_bfl(dev.model.transformer.state_dict()), str(path))
    with pytest.raises(ModelLoadError, match="diffusers FLUX.1 folder"):
        aipaint.load(path, host=plugin_host)  # the zoo's flux1-dev configs hold no weights


# --- zoo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_zoo_cards_and_offline_configs_describe_the_published_models(variant):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTokenizer, T5Config

    from aipaint.models import zoo

    card = zoo.get(f"flux1-{variant}")
    assert card.family == "flux" and card.source["kind"] == "hub" and "file" not in card.source
    assert card.source["repo"] == f"black-forest-labs/FLUX.1-{variant}"
    assert card.defaults["cfg_scale"] == 1.0 and card.defaults["sampler"] == "Euler"
    config = card.config_path
    index = json.loads((config / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    transformer = FluxTransformer2DModel.load_config(config / "transformer")
    assert transformer["guidance_embeds"] is (variant == "dev")
    assert (transformer["num_layers"], transformer["num_single_layers"], transformer["in_channels"]) == (19, 38, 64)
    vae = AutoencoderKL.load_config(config / "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        FlowMatchEulerDiscreteScheduler.load_config(config / "scheduler"))
    assert scheduler.config.use_dynamic_shifting is (variant == "dev")
    assert T5Config.from_pretrained(config / "text_encoder_2").d_model == 4096
    assert CLIPTextConfig.from_pretrained(config / "text_encoder").hidden_size == 768
    tokenizer = CLIPTokenizer.from_pretrained(config / "tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# --- LoRA ----------------------------------------------------------------------------------


def test_lora_with_diffusers_module_names_matches_diffusers_load_lora_weights(dev, flux_paths, tmp_path):
    """A kohya-style LoRA whose module names are diffusers' applies as diffusers applies the same
    weights in its PEFT layout; so does that ``transformer.``-prefixed PEFT file itself."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g) * 4
    module = "transformer_blocks.0.attn.to_q"
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file({f"lora_unet_{module.replace('.', '_')}.lora_down.weight": down,
               f"lora_unet_{module.replace('.', '_')}.lora_up.weight": up,
               f"lora_unet_{module.replace('.', '_')}.alpha": torch.tensor(2.0)}, str(folder / "style.safetensors"))
    save_file({f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up},
              str(tmp_path / "peft.safetensors"))
    kwargs = dict(steps=2, seed=4, width=32, height=32, options={"lora": {"folder": str(folder)}})
    before = dev.model.transformer.state_dict()[f"{module}.weight"].clone()
    plain = as_array(dev.txt2img(PROMPT, **kwargs).image)
    styled = as_array(dev.txt2img(PROMPT + " <lora:style:1>", **kwargs).image)
    assert torch.equal(dev.model.transformer.state_dict()[f"{module}.weight"], before)  # undone after the job
    pipe = reference(flux_paths["dev"])
    pipe.load_lora_weights(str(tmp_path / "peft.safetensors"))
    expected = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(4), width=32, height=32,
                    guidance_scale=3.5, output_type="np").images[0]
    assert np.abs(styled - quantised(expected)).mean() < 1e-3
    assert np.abs(styled - plain).mean() > 1e-3
    (folder / "peft.safetensors").write_bytes((tmp_path / "peft.safetensors").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the PEFT file must match a module
        peft = as_array(dev.txt2img(PROMPT + " <lora:peft:1>", **kwargs).image)
    assert np.abs(peft - quantised(expected)).mean() < 1e-3


def test_kohya_lora_in_black_forest_labs_names_splits_fused_layers_at_the_models_widths(dev, tmp_path):
    """sd-scripts' FLUX LoRAs name BFL's fused layers (``double_blocks_0_img_attn_qkv``,
    ``single_blocks_0_linear1``): one down matrix, the up rows of q, k, v (and the MLP) stacked.
    The plugin splits them into diffusers' modules; the image equals that of the same LoRA written
    module by module in diffusers' names."""
    from safetensors.torch import save_file

    model = dev.model.transformer
    shapes = {name: p.shape for name, p in model.named_parameters()}
    g = torch.Generator().manual_seed(1)
    fused, split = {}, {}
    layers = {
        "double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                         "transformer_blocks.0.attn.to_v"],
        "single_blocks_0_linear1": ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
                                    "single_transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.proj_mlp"],
        "double_blocks_0_txt_mlp_2": ["transformer_blocks.0.ff_context.net.2"],
    }
    for bfl, modules in layers.items():
        width_in = shapes[modules[0] + ".weight"][1]
        down = torch.randn(2, width_in, generator=g)
        ups = [torch.randn(shapes[m + ".weight"][0], 2, generator=g) * 3 for m in modules]
        fused |= {f"lora_unet_{bfl}.lora_down.weight": down, f"lora_unet_{bfl}.lora_up.weight": torch.cat(ups),
                  f"lora_unet_{bfl}.alpha": torch.tensor(1.0)}
        for m, up in zip(modules, ups, strict=True):
            key = "lora_unet_" + m.replace(".", "_")
            split |= {f"{key}.lora_down.weight": down.clone(), f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(fused, str(folder / "bfl.safetensors"))
    save_file(split, str(folder / "split.safetensors"))
    kwargs = dict(steps=2, seed=5, width=32, height=32, options={"lora": {"folder": str(folder)}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key left unmatched
        bfl_image = as_array(dev.txt2img(PROMPT + " <lora:bfl:0.8>", **kwargs).image)
        split_image = as_array(dev.txt2img(PROMPT + " <lora:split:0.8>", **kwargs).image)
    plain = as_array(dev.txt2img(PROMPT, **kwargs).image)
    assert np.array_equal(bfl_image, split_image)
    assert np.abs(bfl_image - plain).mean() > 1e-3


# --- the command line ----------------------------------------------------------------------


def test_cli_distilled_cfg_scale_is_recorded_and_repeated_from_png(flux_paths, tmp_path, capsys):
    from PIL import Image

    from aipaint.cli.main import main
    from aipaint.infotext import read_png_parameters

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    common = ["-m", str(flux_paths["dev"]), "--steps", "2", "-W", "32", "-H", "32", "--seed", "3"]
    assert main(["generate", PROMPT, *common, "--distilled-cfg-scale", "5", "-o", str(first)]) == 0, capsys.readouterr().err
    params = read_png_parameters(first)
    assert "Distilled CFG Scale: 5" in params and "CFG scale: 1" in params
    assert main(["generate", "--from-png", str(first), "-m", str(flux_paths["dev"]), "-o", str(again)]) == 0, capsys.readouterr().err
    assert "Distilled CFG Scale: 5" in read_png_parameters(again)
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_bfloat16_load_runs_close_to_diffusers_in_bfloat16(flux_paths, plugin_host):
    """FLUX's usual dtype. Not bit-equal: diffusers keeps the loop's latents in bf16 between steps,
    aipaint keeps them in float32 and runs only the networks in bf16."""
    pipe = aipaint.load(flux_paths["dev"], host=plugin_host, dtype="bfloat16")
    assert pipe.model.transformer.dtype == torch.bfloat16
    ours = as_array(pipe.txt2img(PROMPT, steps=2, seed=7, width=32, height=32).image)
    import diffusers

    theirs = diffusers.FluxPipeline.from_pretrained(flux_paths["dev"], local_files_only=True, torch_dtype=torch.bfloat16)
    theirs.set_progress_bar_config(disable=True)
    expected = theirs(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(7), width=32, height=32,
                      output_type="np").images[0]
    other_seed = as_array(pipe.txt2img(PROMPT, steps=2, seed=8, width=32, height=32).image)
    # Measured here: 0.002 from diffusers' bf16 image, 0.15 from the next seed's.
    assert np.abs(ours - expected).mean() < 0.01 < 0.05 < np.abs(ours - other_seed).mean()


def test_perturbed_attention_guidance_is_refused_for_the_transformer(dev):
    from aipaint.errors import UnsupportedFeature

    with pytest.raises(UnsupportedFeature, match="PAG.*FluxTransformer2DModel"):
        dev.txt2img(PROMPT, steps=2, seed=1, width=32, height=32, options={"pag": {}})


def test_forges_api_field_sets_the_distilled_guidance_and_its_default_leaves_it_unset(dev):
    """Forge's API bodies carry ``distilled_cfg_scale`` (3.5 when the user set nothing, for every
    model): the FLUX option group declares it, so ``aipaint serve`` reads it instead of listing it
    as ignored, and its default leaves the option unset (schnell refuses a set value)."""
    from aipaint.serve import a1111
    from aipaint.serve.app import Server

    fields = Server.api_fields(SimpleNamespace(pipeline=dev))
    assert fields["distilled_cfg_scale"] == ("flux", "distilled_cfg_scale", 3.5)
    job = a1111.build_job({"prompt": "a fox", "distilled_cfg_scale": 5}, "txt2img", api_fields=fields,
                          request_options={"lora": {"folder": "/tmp"}})
    assert job.request.options == {"lora": {"folder": "/tmp"}, "flux": {"distilled_cfg_scale": 5}}
    assert "distilled_cfg_scale" not in job.ignored
    unset = a1111.build_job({"prompt": "a fox", "distilled_cfg_scale": 3.5}, "txt2img", api_fields=fields)
    assert "flux" not in unset.request.options and "distilled_cfg_scale" not in unset.ignored
    assert "distilled_cfg_scale" in a1111.build_job({"prompt": "a fox", "distilled_cfg_scale": 5}, "txt2img").ignored
    result = dev.generate(dataclasses.replace(job.request, steps=2, seed=3, width=32, height=32))
    assert "Distilled CFG Scale: 5" in result.infotexts[0]


# --- ControlNet (diffusers' FluxControlNetModel) --------------------------------------------

FLUX_CONTROLNETS = {
    "instantx": {},  # the control image's VAE latents, packed like the image's
    "xlabs": {"patch_size": 2, "conditioning_embedding_channels": 4},  # its own input block on the pixels
    "narrow": {"joint_attention_dim": 16},
}


@pytest.fixture(scope="module")
def flux_controlnets(tmp_path_factory) -> dict[str, Path]:
    """ControlNets in the tiny transformer's shapes; diffusers zero-initialises their input and
    output projections, so they are drawn at random here for the control to show."""
    from diffusers import FluxControlNetModel

    root = tmp_path_factory.mktemp("flux-controlnets")
    for i, (name, overrides) in enumerate(FLUX_CONTROLNETS.items()):
        torch.manual_seed(10 + i)
        controlnet = FluxControlNetModel(**{
            "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
            "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8],
            "guidance_embeds": True, **overrides,
        })
        with torch.no_grad():
            for p in controlnet.parameters():
                if not p.abs().max():
                    p.normal_(0.0, 0.3)
        controlnet.save_pretrained(root / name)
    return {name: root / name for name in FLUX_CONTROLNETS}


@pytest.fixture(scope="module")
def dev_8x(tmp_path_factory) -> Path:
    """The tiny dev model with a VAE of FLUX's 8x downsampling, for XLabs-layout ControlNets,
    whose input block makes one token of 16x16 pixels."""
    from diffusers import AutoencoderKL, FluxPipeline

    components = build_tiny_flux_components(0, dev=True)
    torch.manual_seed(4)
    components["vae"] = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611,
    ).eval()
    root = tmp_path_factory.mktemp("tiny-flux-8x") / "dev"
    FluxPipeline(**components).save_pretrained(root)
    return root


def flux_control_unit(path, **options):
    from aipaint.plugin.adapters import AdapterUnit

    return AdapterUnit("controlnet", {"model": path, "image": noise_picture(32, seed=5), **options})


@pytest.mark.parametrize("kind", ["instantx", "xlabs"])
def test_controlnet_matches_diffusers_flux_controlnet_pipeline(request, plugin_host, flux_paths, flux_controlnets,
                                                               monkeypatch, kind):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    # diffusers samples the control image's VAE posterior (with the generator); aipaint takes its mean.
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    path = request.getfixturevalue("dev_8x") if kind == "xlabs" else flux_paths["dev"]
    dev = aipaint.load(path, host=plugin_host) if kind == "xlabs" else request.getfixturevalue("dev")
    kw = dict(steps=3, seed=7, width=32, height=32)
    result = dev.txt2img(PROMPT, adapters=(flux_control_unit(flux_controlnets[kind], weight=0.8),), **kw)
    controlnet = FluxControlNetModel.from_pretrained(flux_controlnets[kind])
    ref = FluxControlNetPipeline.from_pretrained(path, controlnet=controlnet, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, control_image=noise_picture(32, seed=5), controlnet_conditioning_scale=0.8, guidance_scale=3.5,
                   num_inference_steps=3, generator=torch.Generator().manual_seed(7), width=32, height=32,
                   max_sequence_length=dev.model.max_sequence_length, output_type="np").images[0]
    ours = as_array(result.image)
    plain = as_array(dev.txt2img(PROMPT, **kw).image)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert np.abs(ours - plain).mean() > 0.01  # the control changed the picture
    assert "ControlNet 0: " in result.parameters and "Distilled CFG Scale: 3.5" in result.parameters


def test_flux_controlnet_at_weight_zero_is_plain_generation_and_misfits_are_refused(dev, schnell, flux_controlnets):
    kw = dict(steps=2, seed=4, width=32, height=32)
    plain = as_array(dev.txt2img(PROMPT, **kw).image)
    for options in ({"weight": 0.0}, {"guidance_start": 1.0}):
        unit = flux_control_unit(flux_controlnets["instantx"], **options)
        np.testing.assert_array_equal(as_array(dev.txt2img(PROMPT, adapters=(unit,), **kw).image), plain)
    with pytest.raises(ModelLoadError, match="joint_attention_dim 16 vs the transformer's 32"):
        dev.txt2img(PROMPT, adapters=(flux_control_unit(flux_controlnets["narrow"]),), **kw)
    with pytest.raises(ModelLoadError, match="distilled guidance.*schnell"):
        schnell.txt2img(PROMPT, adapters=(flux_control_unit(flux_controlnets["instantx"]),), **kw)
    with pytest.raises(ModelLoadError, match="not a FLUX ControlNet"):  # a UNet ControlNet from the zoo
        dev.txt2img(PROMPT, adapters=(flux_control_unit("shapes-tiny-controlnet-layout"),), **kw)
    with pytest.raises(ModelLoadError, match="one token of 16x16 pixels vs the transformer's 4x4"):
        dev.txt2img(PROMPT, adapters=(flux_control_unit(flux_controlnets["xlabs"]),), **kw)


@pytest.mark.parametrize("name", ["deepcache", "tome", "reference"])
def test_unet_adapters_still_refuse_the_flux_transformer(dev, name):
    from aipaint.plugin.adapters import AdapterUnit

    options = {"image": noise_picture()} if name == "reference" else {}
    with pytest.raises(UnsupportedFeature, match="UNet2DConditionModel"):
        dev.txt2img(PROMPT, steps=2, width=32, height=32, adapters=(AdapterUnit(name, options),))
