"""SDXL through aipaint's core loop, checked against diffusers' own SDXL pipelines.

Tiny random-weight components with diffusers' test-sized SDXL configs (two CLIP text
encoders, text_time added conditioning); 32-48 px, 2-5 steps.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import aipaint
from aipaint.errors import InvalidParameter
from aipaint.models.family import ModelSource

PROMPT = "a big red circle on the left"


def build_tiny_sdxl_components(seed: int = 0, *, refiner: bool = False, tokenizer=None) -> dict:
    """diffusers' test-sized SDXL base (or refiner: one text encoder, aesthetic-score time ids)."""
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_config = dict(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=5, vocab_size=49408, hidden_act="gelu", projection_dim=32,
        max_position_embeddings=77,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 5 or 6 time ids of 8 features each, plus the 32-wide pooled text embedding.
        projection_class_embeddings_input_dim=(5 if refiner else 6) * 8 + 32,
        cross_attention_dim=32 if refiner else 64,
        norm_num_groups=1,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        sample_size=32,
        scaling_factor=0.13025,
    )
    tokenizer = tokenizer or build_clip_tokenizer()
    tokenizer_2 = copy.deepcopy(tokenizer)
    tokenizer_2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0), as OpenCLIP does
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, steps_offset=1, beta_schedule="scaled_linear", timestep_spacing="leading"
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": None if refiner else CLIPTextModel(CLIPTextConfig(**text_config)).eval(),
        "tokenizer": None if refiner else tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**text_config)).eval(),
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


@pytest.fixture(scope="module")
def clip_tokenizer():
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def sdxl_paths(tmp_path_factory, clip_tokenizer) -> dict[str, Path]:
    """A tiny base and a tiny refiner that shares the base's VAE (as diffusers' docs do)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("tiny-sdxl")
    base = build_tiny_sdxl_components(0, tokenizer=clip_tokenizer)
    refiner = build_tiny_sdxl_components(1, refiner=True, tokenizer=clip_tokenizer)
    refiner["vae"] = base["vae"]
    StableDiffusionXLPipeline(**base).save_pretrained(root / "base")
    StableDiffusionXLImg2ImgPipeline(**refiner, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False).save_pretrained(
        root / "refiner"
    )
    return {"base": root / "base", "refiner": root / "refiner"}


@pytest.fixture(scope="module")
def sdxl(sdxl_paths, plugin_host):
    return aipaint.load(sdxl_paths["base"], host=plugin_host)


@pytest.fixture(scope="module")
def refiner(sdxl_paths, plugin_host):
    return aipaint.load(sdxl_paths["refiner"], host=plugin_host)


@pytest.fixture(scope="module")
def reference(sdxl_paths):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(sdxl_paths["base"], local_files_only=True)


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64) / 255.0


def quantised(reference: np.ndarray) -> np.ndarray:
    """diffusers' float output rounded as aipaint rounds to 8-bit pixels."""
    return np.round(reference * 255.0) / 255.0


# --- loading and identification ---------------------------------------------------------


def test_folders_load_as_sdxl_base_and_refiner(sdxl, refiner):
    assert sdxl.model.family == "sdxl" and refiner.model.family == "sdxl"
    assert not sdxl.model.is_refiner and refiner.model.is_refiner
    assert refiner.model.requires_aesthetics_score and not refiner.model.force_zeros_for_empty_prompt
    assert sdxl.model.tokenizer_2.pad_token_id == 0  # "!" survives save/load
    assert set(sdxl.model.modules()) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert set(refiner.model.modules()) == {"unet", "vae", "text_encoder_2"}
    assert sdxl.model.defaults.width == 1024 and sdxl.model.defaults.height == 1024


def test_sd15_folder_is_not_claimed_by_sdxl(tiny_sd_path, plugin_host):
    family = plugin_host.registry.families.get("sdxl")
    assert not family.identify(ModelSource(tiny_sd_path, "folder", "tiny"))
    assert aipaint.load(tiny_sd_path, host=plugin_host).model.family == "sd15"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.positional_embedding"], True),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.positional_embedding"], True),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"], False),
    ],
)
def test_single_file_checkpoints_are_identified_by_their_keys(tmp_path, plugin_host, keys, expected):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    family = plugin_host.registry.families.get("sdxl")
    assert family.identify(ModelSource(path, "file", "model")) is expected


def test_broken_single_file_raises_a_load_error_naming_the_config(tmp_path, plugin_host):
    from safetensors.torch import save_file

    from aipaint.errors import ModelLoadError

    path = tmp_path / "fake-sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.positional_embedding": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match="sdxl-base"):
        aipaint.load(path, host=plugin_host)


# --- conditioning ---------------------------------------------------------------------------


def test_conditioning_concatenates_both_encoders_and_carries_pooled_and_time_ids(sdxl):
    from aipaint.api.request import GenerationRequest

    model = sdxl.model
    (cond,) = model.encode_texts([PROMPT])
    assert cond.embeds.shape == (1, 77, 64)  # 32 + 32 features: both encoders, side by side
    assert cond.extras["text_embeds"].shape == (1, 32)
    request = GenerationRequest(PROMPT, width=48, height=32, options={"sdxl": {"crop_top": 4, "crop_left": 8}})
    full = model.request_conditioning(cond, text=PROMPT, negative=False, request=request)
    assert full.extras["time_ids"].tolist() == [[32.0, 48.0, 4.0, 8.0, 32.0, 48.0]]
    # The first encoder's half is its penultimate hidden state without the final layer norm.
    ids = torch.tensor([model.prompt_encoders()[0].chunks(PROMPT)[0].tokens])
    with torch.inference_mode():
        hidden = model.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(cond.embeds[..., :32], hidden)


def test_long_prompts_use_several_chunks_for_both_encoders(sdxl):
    long_prompt = ", ".join(["a big red circle on the left"] * 14)  # well over 75 tokens
    short, long = sdxl.model.encode_texts([PROMPT, long_prompt])
    assert long.embeds.shape == short.embeds.shape == (1, 154, 64)


def test_empty_negative_prompt_is_zeros_for_the_base_and_encoded_for_the_refiner(sdxl, refiner):
    from aipaint.api.request import GenerationRequest

    request = GenerationRequest(PROMPT, width=32, height=32)
    for pipe, zeroed in ((sdxl, True), (refiner, False)):
        (empty,) = pipe.model.encode_texts([""])
        negative = pipe.model.request_conditioning(empty, text="", negative=True, request=request)
        assert bool((negative.embeds == 0).all()) is zeroed
        assert bool((negative.extras["text_embeds"] == 0).all()) is zeroed
    (cond,) = refiner.model.encode_texts([PROMPT])
    positive = refiner.model.request_conditioning(cond, text=PROMPT, negative=False, request=request)
    negative = refiner.model.request_conditioning(cond, text=PROMPT, negative=True, request=request)
    assert positive.extras["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 6.0]]
    assert negative.extras["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 2.5]]


# --- generation against diffusers --------------------------------------------------------


@pytest.mark.parametrize(
    ("negative", "width", "height", "sampler"),
    [("", 32, 32, "Euler"), ("blue", 48, 32, "Euler"), ("", 32, 32, "DPM++ 2M")],
)
def test_txt2img_matches_diffusers_sdxl_pipeline(sdxl, reference, negative, width, height, sampler):
    result = sdxl.txt2img(PROMPT, negative, sampler=sampler, steps=3, cfg_scale=5.0, seed=7, width=width, height=height)
    if sampler == "DPM++ 2M":
        from diffusers import DPMSolverMultistepScheduler

        reference.scheduler = DPMSolverMultistepScheduler.from_config(reference.scheduler.config)
    else:
        from diffusers import EulerDiscreteScheduler

        reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    expected = reference(
        PROMPT,
        negative_prompt=negative or None,  # None: diffusers zeroes it, as SDXL was trained
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(7),
        width=width,
        height=height,
        output_type="np",
    ).images[0]
    ours = as_array(result.image)
    assert ours.shape == (height, width, 3)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert ours.std() > 0.01  # not a blank image that trivially matches


def test_prompt_syntax_changes_the_image_and_runs_through_the_loop(sdxl):
    plain = as_array(sdxl.txt2img(PROMPT, sampler="Euler", steps=2, seed=3, width=32, height=32).image)
    weighted = as_array(sdxl.txt2img("a big (red:1.6) circle on the left", sampler="Euler", steps=2, seed=3, width=32, height=32).image)
    edited = as_array(sdxl.txt2img("a big [red:blue:0.5] circle", sampler="Euler", steps=2, seed=3, width=32, height=32).image)
    # Random tiny weights react weakly to text, so any change shows that the syntax reached the UNet.
    assert np.abs(plain - weighted).max() > 0
    assert np.abs(plain - edited).max() > 0
    (a, b) = sdxl.model.encode_texts([PROMPT, "a big (red:1.6) circle on the left"])
    assert not torch.equal(a.embeds, b.embeds)


def test_default_size_is_1024_and_infotext_records_it(sdxl):
    # Only the request is resolved here; a 1024 px run would be slow for a unit test.
    from aipaint.engine.run import settle

    settled = settle(sdxl.model, aipaint.GenerationRequest(PROMPT, seed=1), host=sdxl.host)
    assert (settled.width, settled.height) == (1024, 1024)
    assert sdxl.model.vae_scale_factor == 2  # the tiny VAE: latents of 512 x 512


# --- the refiner ------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "switch_at"), [(4, 0.5), (5, 0.8)])
def test_refiner_hand_off_matches_diffusers_denoising_end_and_start(sdxl, refiner, sdxl_paths, steps, switch_at):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base_ref = StableDiffusionXLPipeline.from_pretrained(sdxl_paths["base"], local_files_only=True)
    refiner_ref = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_paths["refiner"], local_files_only=True)
    result = sdxl.txt2img(PROMPT, sampler="Euler", steps=steps, cfg_scale=5.0, seed=1, width=32, height=32,
                          refiner=refiner, refiner_switch_at=switch_at)
    latents = base_ref(PROMPT, num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(1),
                       width=32, height=32, denoising_end=switch_at, output_type="latent").images
    expected = refiner_ref(PROMPT, image=latents, num_inference_steps=steps, guidance_scale=5.0,
                           denoising_start=switch_at, output_type="np").images[0]
    assert np.abs(as_array(result.image) - quantised(expected)).mean() < 1e-3
    assert "Refiner: refiner" in result.parameters and f"Refiner switch at: {switch_at}" in result.parameters


def test_refiner_changes_the_image_and_switch_at_1_means_no_refiner(sdxl, refiner):
    kwargs = dict(sampler="Euler", steps=4, cfg_scale=5.0, seed=1, width=32, height=32)
    plain = as_array(sdxl.txt2img(PROMPT, **kwargs).image)
    refined = as_array(sdxl.txt2img(PROMPT, refiner=refiner, refiner_switch_at=0.5, **kwargs).image)
    never = as_array(sdxl.txt2img(PROMPT, refiner=refiner, refiner_switch_at=1.0, **kwargs).image)
    assert np.abs(plain - refined).mean() > 1e-3
    np.testing.assert_array_equal(plain, never)


def test_refiner_must_share_the_latent_space(sdxl, tiny_pipe):
    with pytest.raises(InvalidParameter, match="latent space"):
        # The tiny SD1.5 VAE scales latents differently from SDXL's.
        sdxl.txt2img(PROMPT, steps=2, width=32, height=32, seed=1, refiner=tiny_pipe)
    with pytest.raises(InvalidParameter, match="refiner"):
        sdxl.txt2img(PROMPT, steps=2, width=32, height=32, seed=1, refiner="not a model")


@pytest.mark.parametrize("value", [0, -0.5, 1.5, True, "0.8"])
def test_refiner_switch_at_is_validated(value):
    with pytest.raises(InvalidParameter, match="refiner_switch_at"):
        aipaint.GenerationRequest(PROMPT, refiner_switch_at=value)


# --- zoo -----------------------------------------------------------------------------------


@pytest.mark.parametrize("card_id", ["sdxl-base-1.0", "sdxl-refiner-1.0"])
def test_zoo_cards_point_at_the_published_single_files_and_offline_configs(card_id):
    from aipaint.models import zoo

    card = zoo.get(card_id)
    assert card.family == "sdxl" and card.source["kind"] == "hub"
    assert card.source["file"].endswith(".safetensors")
    assert card.defaults["width"] == card.defaults["height"] == 1024
    config = card.config_path
    assert config is not None and (config / "model_index.json").is_file()
    index = json.loads((config / "model_index.json").read_text())
    refiner = card_id.startswith("sdxl-refiner")
    assert index["requires_aesthetics_score"] is refiner
    for part in ("unet", "vae", "text_encoder_2", "scheduler"):
        assert (config / part).is_dir()


def test_offline_configs_describe_the_published_architectures():
    from diffusers import UNet2DConditionModel

    from aipaint.models.zoo import zoo_root

    base = UNet2DConditionModel.load_config(zoo_root() / "configs" / "sdxl-base" / "unet")
    refiner = UNet2DConditionModel.load_config(zoo_root() / "configs" / "sdxl-refiner" / "unet")
    assert base["cross_attention_dim"] == 2048 and base["projection_class_embeddings_input_dim"] == 2816
    assert refiner["cross_attention_dim"] == 1280 and refiner["projection_class_embeddings_input_dim"] == 2560
    from transformers import CLIPTokenizer

    tokenizer_2 = CLIPTokenizer.from_pretrained(zoo_root() / "configs" / "sdxl-base" / "tokenizer_2")
    assert tokenizer_2.pad_token == "!" and tokenizer_2("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


# --- image modes and LoRA, through the core -------------------------------------------------


def noise_picture(size: int = 32, seed: int = 0):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))


def test_img2img_matches_diffusers_sdxl_img2img_pipeline(sdxl, sdxl_paths):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from aipaint.engine.modes import to_tensor

    image = noise_picture()
    ours = sdxl.img2img(image, PROMPT, denoising_strength=0.6, steps=5, sampler="Euler", seed=3, cfg_scale=5.0,
                        width=32, height=32)
    reference = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_paths["base"], local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    # aipaint encodes with the VAE posterior's mean (A1111's default); diffusers samples it, so
    # it gets the same latents and the comparison covers the rest: noising, time ids, the loop.
    with torch.inference_mode():
        latents = sdxl.model.encode(to_tensor(image))
    expected = reference(PROMPT, image=latents, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                         generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(as_array(ours.image) - quantised(expected)).mean() < 1e-3
    assert np.abs(as_array(ours.image) - as_array(image)).mean() > 0.01


def test_inpainting_keeps_the_unmasked_pixels(sdxl):
    from PIL import Image

    image = noise_picture(seed=1)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = sdxl.inpaint(image, mask, PROMPT, denoising_strength=0.9, mask_blur=0, steps=3, sampler="Euler", seed=2,
                          width=32, height=32)
    ours, original = as_array(result.image), as_array(image)
    outside = np.asarray(mask) == 0
    np.testing.assert_array_equal(ours[outside], original[outside])
    assert np.abs(ours[~outside] - original[~outside]).mean() > 0.01


def _kohya_pair(prefix: str, out_features: int, in_features: int, rank: int = 2) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(len(prefix))
    return {
        f"{prefix}.lora_down.weight": torch.randn(rank, in_features, generator=generator),
        f"{prefix}.lora_up.weight": torch.randn(out_features, rank, generator=generator),
        f"{prefix}.alpha": torch.tensor(float(rank)),
    }


KOHYA_TE1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
KOHYA_TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
DIFFUSERS_NAMED_UNET = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
SGM_NAMED_UNET = "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q"  # the same module, as sd-scripts names it for SDXL


@pytest.mark.parametrize(
    "prefixes",
    [
        pytest.param((KOHYA_TE1, DIFFUSERS_NAMED_UNET), id="te1+diffusers-named-unet"),
        pytest.param((KOHYA_TE1, KOHYA_TE2, SGM_NAMED_UNET), id="sdxl-kohya"),
    ],
)
def test_kohya_lora_changes_the_image_and_is_undone(sdxl, tmp_path, prefixes):
    import warnings

    from safetensors.torch import save_file

    shapes = {KOHYA_TE1: (32, 32), KOHYA_TE2: (32, 32), DIFFUSERS_NAMED_UNET: (64, 64), SGM_NAMED_UNET: (64, 64)}
    weights: dict[str, torch.Tensor] = {}
    for prefix in prefixes:
        weights.update(_kohya_pair(prefix, *shapes[prefix]))
    save_file(weights, str(tmp_path / "style.safetensors"))
    kwargs = dict(sampler="Euler", steps=2, seed=4, width=32, height=32, options={"lora": {"folder": str(tmp_path)}})
    before = {k: v.clone() for k, v in sdxl.model.unet.state_dict().items() if "attn1.to_q" in k}
    plain = as_array(sdxl.txt2img(PROMPT, **kwargs).image)
    from aipaint_plugins.lora.api import UnmatchedLoraKeys

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedLoraKeys)  # every key must land somewhere
        styled = sdxl.txt2img(PROMPT + " <lora:style:1>", **kwargs)
    assert np.abs(as_array(styled.image) - plain).mean() > 1e-3
    for key, value in sdxl.model.unet.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key])


TE_Q = "text_model.encoder.layers.0.self_attn.q_proj"  # Linear 32 -> 32 in both text encoders
UNET_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 64 -> 64


def _lora_weights(pipe, component: str, path: str) -> torch.Tensor:
    from aipaint_plugins.lora.formats import patchable_modules

    modules = patchable_modules(getattr(pipe.model, component))
    return (modules.get(path) or modules[path.removeprefix("text_model.")]).weight


def _delta(pair: dict[str, torch.Tensor]) -> torch.Tensor:
    (up,) = (v for k, v in pair.items() if k.endswith("lora_up.weight"))
    (down,) = (v for k, v in pair.items() if k.endswith("lora_down.weight"))
    return up @ down  # alpha == rank in _kohya_pair: scale 1


def _all_weights(pipe) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().clone()
        for name in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe.model, name) is not None
        for k, v in getattr(pipe.model, name).state_dict().items()
    }


def _original(before: dict[str, torch.Tensor], component: str, path: str) -> torch.Tensor:
    # transformers 5's CLIPTextModel has no text_model level (CLIPTextModelWithProjection keeps it).
    key = f"{component}.{path}.weight"
    return before[key] if key in before else before[f"{component}.{path.removeprefix('text_model.')}.weight"]


def _assert_restored(pipe, before: dict[str, torch.Tensor]) -> None:
    after = _all_weights(pipe)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"weights not restored: {changed[:3]}"


def test_kohya_sdxl_keys_patch_both_text_encoders_with_the_te_weight_and_the_unet(sdxl, tmp_path):
    import warnings

    from aipaint_plugins.lora.api import LoraUse, UnmatchedLoraKeys, apply_loras
    from safetensors.torch import save_file

    te1, te2 = _kohya_pair(KOHYA_TE1, 32, 32), _kohya_pair(KOHYA_TE2, 32, 32, rank=3)
    projection = _kohya_pair("lora_te2_text_projection", 32, 32, rank=1)  # beside text_model in transformers 4 and 5
    unet = _kohya_pair(SGM_NAMED_UNET, 64, 64)
    save_file({**te1, **te2, **projection, **unet}, str(tmp_path / "sdxl.safetensors"))
    before = _all_weights(sdxl)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedLoraKeys)
        applied = apply_loras(sdxl, [LoraUse("sdxl", 0.5, te_weight=-2.0)], folder=tmp_path)
    with applied:
        for component, path, pair, weight in (
            ("text_encoder", TE_Q, te1, -2.0),
            ("text_encoder_2", TE_Q, te2, -2.0),
            ("text_encoder_2", "text_projection", projection, -2.0),
            ("unet", UNET_Q, unet, 0.5),
        ):
            torch.testing.assert_close(
                _lora_weights(sdxl, component, path), _original(before, component, path) + weight * _delta(pair),
                rtol=1e-5, atol=1e-5,
            )
    _assert_restored(sdxl, before)


def test_diffusers_text_encoder_2_prefix_patches_the_second_encoder(sdxl, tmp_path):
    from aipaint_plugins.lora.api import apply_loras
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(9)
    down, up = torch.randn(2, 32, generator=generator), torch.randn(32, 2, generator=generator)
    save_file({f"text_encoder_2.{TE_Q}.lora_A.weight": down, f"text_encoder_2.{TE_Q}.lora_B.weight": up},
              str(tmp_path / "peft.safetensors"))
    before = _all_weights(sdxl)
    first_encoder = _lora_weights(sdxl, "text_encoder", TE_Q).detach().clone()
    with apply_loras(sdxl, [("peft", 0.25)], folder=tmp_path):
        torch.testing.assert_close(
            _lora_weights(sdxl, "text_encoder_2", TE_Q), _original(before, "text_encoder_2", TE_Q) + 0.25 * up @ down
        )
        assert torch.equal(_lora_weights(sdxl, "text_encoder", TE_Q), first_encoder)
    _assert_restored(sdxl, before)


@pytest.mark.parametrize(("sgm", "diffusers_path"), [
    ("input_blocks_0_0", "conv_in"),
    ("input_blocks_1_0_in_layers_2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks_1_0_emb_layers_1", "down_blocks.0.resnets.0.time_emb_proj"),
    ("input_blocks_2_0_op", "down_blocks.0.downsamplers.0.conv"),
    ("input_blocks_3_1_transformer_blocks_1_attn2_to_out_0", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_out.0"),
    ("input_blocks_3_1_proj_in", "down_blocks.1.attentions.0.proj_in"),
    ("middle_block_1_transformer_blocks_0_ff_net_0_proj", "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("middle_block_2_out_layers_3", "mid_block.resnets.1.conv2"),
    ("output_blocks_1_1_transformer_blocks_0_attn1_to_k", "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k"),
    ("output_blocks_1_2_conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks_3_0_skip_connection", "up_blocks.1.resnets.1.conv_shortcut"),
    ("time_embed_2", "time_embedding.linear_2"),
    ("label_emb_0_0", "add_embedding.linear_1"),
    ("out_2", "conv_out"),
])
def test_sgm_unet_names_address_the_diffusers_modules(sdxl, sgm, diffusers_path):
    """sd-scripts names SDXL's UNet as the SGM code does; this tiny UNet has one layer per block."""
    from aipaint_plugins.lora.api import module_table

    assert module_table(sdxl.model).find(f"lora_unet_{sgm}") == ("unet", diffusers_path)


def test_sgm_names_no_unet_has_are_unmatched(sdxl):
    from aipaint_plugins.lora.api import module_table

    table = module_table(sdxl.model)
    for base in ("lora_unet_middle_block_7_proj_in", "lora_unet_input_blocks_9_1_proj_in", "lora_unet_input_blocks_x_1"):
        assert table.find(base) is None


def test_lora_on_the_refiner_patches_text_encoder_2_and_reports_first_encoder_keys(refiner, tmp_path):
    """The refiner has no first text encoder: its keys are reported, the rest applies."""
    from aipaint_plugins.lora.api import UnmatchedLoraKeys
    from safetensors.torch import save_file

    te1, te2, unet = _kohya_pair(KOHYA_TE1, 32, 32), _kohya_pair(KOHYA_TE2, 32, 32), _kohya_pair(SGM_NAMED_UNET, 64, 64)
    save_file({**te1, **te2, **unet}, str(tmp_path / "style.safetensors"))
    kwargs = dict(sampler="Euler", steps=2, seed=4, width=32, height=32, options={"lora": {"folder": str(tmp_path)}})
    before = _all_weights(refiner)
    plain = as_array(refiner.txt2img(PROMPT, **kwargs).image)
    seen: list[bool] = []

    def progress(done: int, total: int) -> None:
        seen.append(torch.allclose(
            _lora_weights(refiner, "text_encoder_2", TE_Q), _original(before, "text_encoder_2", TE_Q) + _delta(te2),
            rtol=1e-5, atol=1e-5,
        ))

    with pytest.warns(UnmatchedLoraKeys, match=KOHYA_TE1):
        styled = refiner.txt2img(PROMPT + " <lora:style:1>", progress=progress, **kwargs)
    assert seen and all(seen)
    assert np.abs(as_array(styled.image) - plain).mean() > 1e-3
    assert 'Lora unmatched keys: "style: 3"' in styled.infotexts[0]  # te1's down, up and alpha
    _assert_restored(refiner, before)


@pytest.mark.parametrize("which", ["base", "refiner"])
def test_lora_training_refuses_sdxl_before_reading_anything(sdxl, refiner, tmp_path, which):
    from aipaint_plugins.lora.train import train_lora

    from aipaint.errors import UnsupportedFeature

    with pytest.raises(UnsupportedFeature, match="one text encoder.*sd-scripts"):
        train_lora(sdxl if which == "base" else refiner, tmp_path / "no-such-folder", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize(("text_key", "config", "pipeline_name"), [
    ("conditioner.embedders.1.model.positional_embedding", "sdxl-base", "StableDiffusionXLPipeline"),
    ("conditioner.embedders.0.model.positional_embedding", "sdxl-refiner", "StableDiffusionXLImg2ImgPipeline"),
])
def test_single_files_load_through_from_single_file_with_the_offline_config(
    tmp_path, plugin_host, monkeypatch, sdxl_paths, text_key, config, pipeline_name
):
    """The conversion itself is diffusers'; this checks what aipaint asks of it and builds from it."""
    import diffusers
    from safetensors.torch import save_file

    path = tmp_path / "my-sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1), text_key: torch.zeros(1)}, str(path))
    refiner = config == "sdxl-refiner"
    calls = []

    def fake_from_single_file(cls, file, **kwargs):
        calls.append((cls.__name__, file, kwargs))
        return cls.from_pretrained(sdxl_paths["refiner" if refiner else "base"], local_files_only=True)

    for name in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"):
        monkeypatch.setattr(getattr(diffusers, name), "from_single_file", classmethod(fake_from_single_file))
    pipe = aipaint.load(path, host=plugin_host)
    (cls_name, file, kwargs), = calls
    assert cls_name == pipeline_name and file == str(path)
    assert Path(kwargs["config"]).name == config and kwargs["local_files_only"] is True
    assert pipe.model.family == "sdxl" and pipe.model.is_refiner is refiner
    assert pipe.model.requires_aesthetics_score is refiner  # read from the config's model_index.json
    assert pipe.model.hash_path == path
    assert pipe.txt2img(PROMPT, steps=1, width=32, height=32, seed=1).image.size == (32, 32)


# --- single files in Stability's SGM layout, end to end -------------------------------------
# tests/sgm_checkpoint.py writes the tiny models as SDXL files from model sites are laid out;
# they load through aipaint.load with no stub. The config= folder is the tiny model's own
# folder without its weights: diffusers takes weights from a config folder when it cannot map
# a component from the file, and this way such a fallback fails instead of passing unnoticed.


def build_tiny_sdxl_with_distinct_encoders(seed: int = 0, *, tokenizer=None, width_2: int = 48) -> dict:
    """The tiny base with a wider second text encoder. diffusers tells SDXL's two encoders
    apart in a file by their widths (768 and 1280 in the real model); with equal widths it
    loads the CLIP-L weights into the OpenCLIP encoder too."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    components = build_tiny_sdxl_components(seed, tokenizer=tokenizer)
    torch.manual_seed(seed + 100)
    config = {**components["text_encoder_2"].config.to_dict(), "hidden_size": width_2}
    components["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
    width_1 = components["text_encoder"].config.hidden_size
    unet_config = {**components["unet"].config, "cross_attention_dim": width_1 + width_2}
    components["unet"] = UNet2DConditionModel.from_config(unet_config).eval()
    return components


def _save_without_weights(folder: Path, target: Path) -> Path:
    import shutil

    return Path(shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))


@pytest.fixture(scope="module")
def sgm_models(tmp_path_factory, clip_tokenizer, sdxl_paths) -> dict[str, dict]:
    """Per kind: the diffusers components, their folder, a weightless config folder, the SGM file."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from safetensors.torch import save_file
    from sgm_checkpoint import to_sgm_state_dict

    root = tmp_path_factory.mktemp("sgm")
    base = build_tiny_sdxl_with_distinct_encoders(tokenizer=clip_tokenizer)
    StableDiffusionXLPipeline(**base).save_pretrained(root / "base")
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_paths["refiner"], local_files_only=True)
    out = {}
    for kind, components, folder in (("base", base, root / "base"), ("refiner", refiner.components, sdxl_paths["refiner"])):
        state = to_sgm_state_dict(components["unet"], components["vae"], components["text_encoder"], components["text_encoder_2"])
        file = root / f"tiny-sdxl-{kind}.safetensors"
        save_file(state, str(file))
        config = _save_without_weights(folder, root / f"{kind}-config")
        out[kind] = {"components": components, "folder": folder, "config": config, "state": state, "file": file}
    return out


@pytest.fixture(scope="module")
def sgm_base(sgm_models, plugin_host):
    return aipaint.load(sgm_models["base"]["file"], config=sgm_models["base"]["config"], host=plugin_host)


def test_the_file_really_is_in_the_sgm_layout(sgm_models):
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES

    state, components = sgm_models["base"]["state"], sgm_models["base"]["components"]
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                "conditioner.embedders.1.model.")
    assert {next((p for p in prefixes if key.startswith(p)), key) for key in state} == set(prefixes)
    assert not any(".down_blocks." in key or ".resnets." in key or "add_embedding" in key for key in state)
    for key in ("model.diffusion_model.label_emb.0.0.weight", "model.diffusion_model.label_emb.0.2.bias",
                "model.diffusion_model.input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.1.2.conv.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
                CHECKPOINT_KEY_NAMES["clip_sdxl"], "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
                CHECKPOINT_KEY_NAMES["open_clip_sdxl"], "conditioner.embedders.1.model.ln_final.weight"):
        assert key in state, key
    assert not any(key.startswith("conditioner.embedders.1.model.text_model") or "q_proj" in key
                   for key in state if key.startswith("conditioner.embedders.1."))
    # OpenCLIP: q, k, v stacked in nn.MultiheadAttention's in_proj; text_projection applied as x @ P.
    attention = components["text_encoder_2"].text_model.encoder.layers[2].self_attn
    fused = state["conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"]
    assert fused.shape == (3 * 48, 48)
    assert torch.equal(fused[48:96], attention.k_proj.weight) and torch.equal(fused[96:], attention.v_proj.weight)
    projection = state["conditioner.embedders.1.model.text_projection"]
    assert torch.equal(projection, components["text_encoder_2"].text_projection.weight.T)
    refiner = sgm_models["refiner"]["state"]
    assert CHECKPOINT_KEY_NAMES["open_clip_sdxl_refiner"] in refiner
    assert not any(key.startswith(("conditioner.embedders.1.", "conditioner.embedders.0.transformer.")) for key in refiner)


def test_the_open_clip_part_is_what_open_clip_itself_loads_and_computes(sgm_models):
    """Checked against open_clip, whose CLIP model SGM's embedder holds (not against diffusers'
    reader, which would make the check circular): the keys load into it, and its penultimate
    layer and pooled projection equal the transformers encoder's."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    state, encoder = sgm_models["base"]["state"], sgm_models["base"]["components"]["text_encoder_2"]
    prefix = "conditioner.embedders.1.model."
    text_cfg = CLIPTextCfg(width=48, heads=4, layers=5, mlp_ratio=37 / 48)  # the tiny encoder's sizes
    vision_cfg = CLIPVisionCfg(layers=1, width=16, head_width=16, patch_size=8, image_size=16)  # unused here
    model = open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=text_cfg).eval()
    result = model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=False)
    assert result.unexpected_keys == []
    assert {key.split(".")[0] for key in result.missing_keys} == {"visual", "logit_scale"}  # not in SDXL's embedder
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])
    with torch.inference_mode():
        hidden = model.token_embedding(ids) + model.positional_embedding
        for block in model.transformer.resblocks[:-1]:
            hidden = block(hidden, attn_mask=model.attn_mask)
        pooled = model.encode_text(ids)
        want = encoder(ids, output_hidden_states=True)
    torch.testing.assert_close(hidden, want.hidden_states[-2])
    torch.testing.assert_close(pooled, want.text_embeds)


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_sgm_file_is_identified_and_every_tensor_equals_the_diffusers_models(offline, sgm_models, plugin_host, kind):
    from aipaint.models.loading import identify_family, resolve_source

    model = sgm_models[kind]
    assert identify_family(resolve_source(model["file"]), plugin_host).name == "sdxl"
    pipe = aipaint.load(model["file"], config=model["config"], host=plugin_host)  # no family=, no stub
    assert pipe.model.family == "sdxl" and pipe.model.is_refiner is (kind == "refiner")
    assert pipe.model.requires_aesthetics_score is (kind == "refiner")
    assert set(pipe.model.modules()) == {"unet", "vae", "text_encoder_2"} | ({"text_encoder"} if kind == "base" else set())
    for name, module in pipe.model.modules().items():
        got, want = module.state_dict(), model["components"][name].state_dict()
        assert set(got) == set(want), f"{name}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
        different = [key for key in want if not torch.equal(got[key], want[key])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def test_txt2img_from_the_sgm_file_equals_the_folder_model_and_diffusers(sgm_base, sgm_models, plugin_host):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = sgm_models["base"]["folder"]
    params = dict(sampler="Euler", steps=3, cfg_scale=5.0, seed=1234, width=32, height=32)
    from_file = np.asarray(sgm_base.txt2img(PROMPT, "blue", **params).image)
    from_folder = np.asarray(aipaint.load(folder, host=plugin_host).txt2img(PROMPT, "blue", **params).image)
    assert from_file.std() > 1  # a real picture, not a blank
    # the same weights (test above), but tensors laid out differently in memory may take other CPU kernels:
    # within one 8-bit level, as docs/parameters.md promises across model objects
    diff = np.abs(from_file.astype(int) - from_folder.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    reference = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    expected = reference(PROMPT, negative_prompt="blue", num_inference_steps=3, guidance_scale=5.0, width=32, height=32,
                         generator=torch.Generator().manual_seed(1234), output_type="np").images[0]
    assert np.abs(from_file / 255.0 - quantised(expected)).mean() < 1e-3


def test_sgm_file_model_hash_is_the_files(sgm_base, sgm_models):
    import hashlib

    file = sgm_models["base"]["file"]
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    result = sgm_base.txt2img(PROMPT, steps=1, width=32, height=32, seed=1)
    assert sgm_base.model.hash_path == file
    assert f"Model hash: {sha[:10]}," in result.infotexts[0]


@pytest.mark.parametrize(("dropped", "component", "weight"), [
    ("conditioner.embedders.1.model.text_projection", "text_encoder_2", "text_projection.weight"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "text_encoder_2", "layers.0.self_attn.q_proj"),
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "text_encoder", "final_layer_norm.weight"),
])
def test_a_file_missing_text_encoder_weights_is_refused_naming_them(sgm_models, plugin_host, tmp_path, dropped, component, weight):
    """diffusers leaves a text encoder weight the file lacks empty (on ``meta``) without failing."""
    from safetensors.torch import save_file

    from aipaint.errors import ModelLoadError

    path = tmp_path / "pruned.safetensors"
    save_file({k: v for k, v in sgm_models["base"]["state"].items() if k != dropped}, str(path))
    with pytest.raises(ModelLoadError, match=rf"pruned.safetensors lacks \d weight\(s\) of the SDXL {component} .*{weight}"):
        aipaint.load(path, config=sgm_models["base"]["config"], host=plugin_host)


@pytest.fixture(scope="module")
def sdxl_base_on_meta():
    """The four SDXL base models at their real sizes from zoo/configs/sdxl-base, on ``meta``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from aipaint.models.zoo import zoo_root

    config = zoo_root() / "configs" / "sdxl-base"
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(config, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder")),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(config, subfolder="text_encoder_2")),
        }


def test_full_size_sgm_layout_matches_real_sdxl_files_and_diffusers_reads_it_back(sdxl_base_on_meta, tmp_path, plugin_host):
    """The converter at full size: key names/shapes of sd_xl_base_1.0.safetensors, and diffusers'
    own (forward) converters map them back onto exactly the models the zoo config builds."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
        infer_diffusers_model_type,
    )
    from sgm_checkpoint import to_sgm_state_dict

    from aipaint.models.loading import identify_family, resolve_source

    models = sdxl_base_on_meta
    state = to_sgm_state_dict(models["unet"], models["vae"], models["text_encoder"], models["text_encoder_2"])
    real_shapes = {  # from the published sd_xl_base_1.0.safetensors
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_fc.weight": (5120, 1280),
    }
    for key, shape in real_shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert infer_diffusers_model_type(state) == "xl_base"
    keys_only = tmp_path / "sdxl-like.safetensors"
    from safetensors.torch import save_file

    save_file({key: torch.zeros(1) for key in state}, str(keys_only))
    assert identify_family(resolve_source(keys_only), plugin_host).name == "sdxl"

    back = {
        "unet": convert_ldm_unet_checkpoint(state, dict(models["unet"].config)),
        "vae": convert_ldm_vae_checkpoint(state, dict(models["vae"].config)),
        "text_encoder_2": convert_open_clip_checkpoint(models["text_encoder_2"], state, prefix="conditioner.embedders.1.model."),
    }
    for name, converted in back.items():
        want = models[name].state_dict()
        assert set(converted) == set(want), f"{name}: {sorted(set(converted) ^ set(want))[:5]}"
        assert all(tuple(converted[k].shape) == tuple(want[k].shape) for k in want), name
