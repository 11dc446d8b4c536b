"""unCLIP (Karlo) and Stable unCLIP: text-to-image, variations and blends, checked against
diffusers' pipelines.

Tiny random-weight components with diffusers' test-sized configs. Karlo: decoder at 32 px,
super-resolution to 64 px, 2 steps per stage. Stable unCLIP: a 16-latent UNet with a
projection class embedding, a 2-block VAE (32 px images), 32-dimensional CLIP embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.unclip.options import UnCLIPOptions
from PIL import Image

import aipaint
from aipaint.errors import InvalidParameter, UnsupportedFeature

PROMPT = "a big red circle on the left"


def build_tiny_unclip(seed: int = 0) -> dict:
    """diffusers' test-sized UnCLIPPipeline components (with the real CLIP tokenizer)."""
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, projection_dim=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=49408, max_position_embeddings=77,
    ))
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1)
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=32, time_embed_dim=128, cross_attention_dim=100,
                                    clip_extra_context_tokens=4)
    decoder = UNet2DConditionModel(
        sample_size=32, in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type="identity",
    )
    super_res = dict(sample_size=64, layers_per_block=1, down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                     up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"), block_out_channels=(32, 64),
                     in_channels=6, out_channels=3)
    super_res_first = UNet2DModel(**super_res)
    torch.manual_seed(seed + 1)
    super_res_last = UNet2DModel(**super_res)
    return {
        "prior": prior.eval(), "decoder": decoder.eval(), "text_proj": text_proj.eval(), "text_encoder": text_encoder.eval(),
        "tokenizer": build_clip_tokenizer(), "super_res_first": super_res_first.eval(), "super_res_last": super_res_last.eval(),
        "prior_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                           num_train_timesteps=1000, clip_sample_range=5.0),
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon", num_train_timesteps=1000),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                               num_train_timesteps=1000),
    }


def build_tiny_image_encoder(seed: int = 3) -> dict:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, intermediate_size=37,
        patch_size=4,
    ))
    return {"image_encoder": encoder.eval(), "feature_extractor": CLIPImageProcessor(crop_size=32, size=32)}


@pytest.fixture(scope="module")
def references():
    """diffusers' own pipelines on the same components (built in memory: diffusers 0.42 cannot
    reload a saved UnCLIP folder, as its text_proj class is no longer exported)."""
    from diffusers import UnCLIPImageVariationPipeline, UnCLIPPipeline

    parts = build_tiny_unclip()
    shared = {k: v for k, v in parts.items() if k not in ("prior", "prior_scheduler")}
    return {"text": UnCLIPPipeline(**parts), "variations": UnCLIPImageVariationPipeline(**shared, **build_tiny_image_encoder())}


@pytest.fixture(scope="module")
def unclip_paths(tmp_path_factory, references) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-unclip")
    for name, pipeline in references.items():
        pipeline.save_pretrained(root / name)
    return {"text": root / "text", "variations": root / "variations"}


@pytest.fixture(scope="module")
def unclip(unclip_paths, plugin_host):
    return aipaint.load(unclip_paths["text"], host=plugin_host, image_encoder=unclip_paths["variations"])


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64) / 255.0


def quantised(reference: np.ndarray) -> np.ndarray:
    return np.round(np.clip(reference, 0, 1) * 255.0) / 255.0


def unclip_options(**values) -> dict:
    return {"unclip": values}


STEPS = dict(steps=2, options=unclip_options(prior_steps=2, super_res_steps=2))
IMAGE_STEPS = dict(steps=2, options=unclip_options(super_res_steps=2))  # variations and blends run no prior
REFERENCE_STEPS = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)


def test_loads_as_unclip_behind_the_one_pipeline(unclip, unclip_paths, plugin_host):
    from aipaint_plugins.unclip.model import UnCLIPModel

    assert type(unclip) is aipaint.Pipeline and isinstance(unclip.model, UnCLIPModel)
    assert unclip.model.prior is not None and unclip.model.image_encoder is not None
    assert unclip.model.capabilities == {"txt2img", "variations", "blend"}
    text_only = aipaint.load(unclip_paths["text"], host=plugin_host)
    assert text_only.model.capabilities == {"txt2img"}
    with pytest.raises(UnsupportedFeature, match="cannot do image variations.*image encoder"):
        text_only.variations(picture(0), seed=1, **IMAGE_STEPS)
    variations_only = aipaint.load(unclip_paths["variations"], host=plugin_host)
    assert variations_only.model.prior is None and variations_only.model.capabilities == {"variations", "blend"}
    with pytest.raises(UnsupportedFeature, match="cannot do text to image.*no prior"):
        variations_only.txt2img(PROMPT, seed=1, **STEPS)


def test_txt2img_matches_diffusers_unclip_pipeline(unclip, references):
    result = unclip.txt2img(PROMPT, seed=4, cfg_scale=6.0, steps=2,
                            options=[UnCLIPOptions(prior_steps=2, super_res_steps=2, prior_cfg_scale=3.0)])
    reference = references["text"]
    expected = reference(PROMPT, generator=torch.Generator().manual_seed(4), prior_guidance_scale=3.0,
                         decoder_guidance_scale=6.0, output_type="np", **REFERENCE_STEPS).images[0]
    ours = as_array(result.image)
    assert ours.shape == (64, 64, 3)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert ours.std() > 0.01
    assert "Prior steps: 2" in result.parameters and "unCLIP mode: txt2img" in result.parameters


def test_variations_match_diffusers_image_variation_pipeline(unclip, references):
    source = picture(1)
    result = unclip.variations(source, batch_size=2, seed=9, cfg_scale=5.0, **IMAGE_STEPS)
    reference = references["variations"]
    generators = [torch.Generator().manual_seed(9), torch.Generator().manual_seed(10)]  # aipaint: seed + i per image
    expected = reference(image=source, num_images_per_prompt=2, generator=generators, decoder_guidance_scale=5.0,
                         decoder_num_inference_steps=2, super_res_num_inference_steps=2, output_type="np").images
    assert result.seeds == [9, 10] and len(result.images) == 2
    for ours, theirs in zip(result.images, expected, strict=True):
        assert np.abs(as_array(ours) - quantised(theirs)).mean() < 1e-3


def test_variations_follow_the_input_image(unclip):
    """Same seed, different inputs: the image embedding is what the decoder follows."""
    a = as_array(unclip.variations(picture(1), seed=5, **IMAGE_STEPS).image)
    b = as_array(unclip.variations(picture(2), seed=5, **IMAGE_STEPS).image)
    again = as_array(unclip.variations(picture(1), seed=5, **IMAGE_STEPS).image)
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).mean() > 1e-4


def test_blend_with_all_weight_on_one_image_is_that_images_variation(unclip):
    kwargs = dict(seed=6, **IMAGE_STEPS)
    single = as_array(unclip.variations(picture(3), **kwargs).image)
    blended = as_array(unclip.blend([picture(3), picture(4), picture(5)], [1.0, 0.0, 0.0], **kwargs).image)
    np.testing.assert_allclose(blended, single, atol=2 / 255)
    mixed = unclip.blend([picture(3), picture(4)], [0.5, 0.5], **kwargs)
    assert np.abs(as_array(mixed.image) - single).mean() > 1e-4
    assert "Blend weights: 0.5 0.5" in mixed.parameters


def test_blend_embeddings_interpolate_on_the_sphere():
    from aipaint_plugins.unclip.shared import blend_embeddings, slerp

    torch.manual_seed(0)
    a, b, c = torch.randn(3, 16)
    torch.testing.assert_close(blend_embeddings(torch.stack([a, b]), [1, 0]), a)
    torch.testing.assert_close(blend_embeddings(torch.stack([a, b]), [0, 2]), b)
    mid = blend_embeddings(torch.stack([a, b]), [1, 1])
    torch.testing.assert_close(mid, slerp(a, b, 0.5))
    # The halfway direction is equally far (in angle) from both ends, and the norm is the mean norm.
    cos = torch.nn.functional.cosine_similarity
    assert abs(float(cos(mid, a, dim=0) - cos(mid, b, dim=0))) < 1e-5
    assert abs(float(mid.norm() - (a.norm() + b.norm()) / 2)) < 1e-4
    three = blend_embeddings(torch.stack([a, b, c]), [0, 0, 5])
    torch.testing.assert_close(three, c)


@pytest.mark.parametrize(
    ("images", "weights", "name"),
    [([1, 2, 3, 4, 5, 6], [1.0] * 6, "image_prompts"), ([1, 2], [1.0], "image_prompt_weights"),
     ([1, 2], [0.0, 0.0], "image_prompt_weights"), ([1, 2], [-1.0, 2.0], "image_prompt_weights")],
)
def test_blend_checks_its_inputs(unclip, images, weights, name):
    with pytest.raises(InvalidParameter) as info:
        unclip.blend([picture(i) for i in images], weights, seed=1, **IMAGE_STEPS)
    assert info.value.name == name


def test_zoo_cards_name_the_published_karlo_repos():
    from aipaint.models import zoo

    karlo = zoo.get("karlo-v1-alpha")
    assert karlo.family == "unclip" and karlo.source["repo"] == "kakaobrain/karlo-v1-alpha"
    assert karlo.data["image_encoder"]["repo"] == "kakaobrain/karlo-v1-alpha-image-variations"
    assert zoo.get("karlo-v1-alpha-image-variations").source["repo"] == "kakaobrain/karlo-v1-alpha-image-variations"


def test_the_cards_image_encoder_is_fetched_through_the_zoo_download(monkeypatch, unclip_paths):
    from aipaint_plugins.unclip import UnCLIP

    from aipaint.models import zoo
    from aipaint.models.family import LoadOptions, ModelSource

    fetched = []

    def fake_download(repo, filename=None, card=None, patterns=None):
        fetched.append(repo)
        return unclip_paths["variations"]

    monkeypatch.setattr(zoo, "download_from_hub", fake_download)
    card = zoo.get("karlo-v1-alpha").data
    model = UnCLIP().load(ModelSource(unclip_paths["text"], "folder", "karlo-v1-alpha", card), LoadOptions())
    assert fetched == ["kakaobrain/karlo-v1-alpha-image-variations"]
    assert model.prior is not None and model.image_encoder is not None


def test_image_encoder_option_must_be_a_variations_folder(unclip_paths, plugin_host):
    from aipaint.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="image-variations folder"):
        aipaint.load(unclip_paths["text"], host=plugin_host, image_encoder=unclip_paths["text"])


@pytest.mark.parametrize(("params", "name"), [({"options": unclip_options(prior_steps=1)}, "unclip.prior_steps"),
                                              ({"steps": 1}, "steps"),
                                              ({"options": unclip_options(super_res_steps=1)}, "unclip.super_res_steps")])
def test_one_step_is_refused_with_a_typed_error(unclip, params, name):
    with pytest.raises(InvalidParameter) as info:
        unclip.txt2img(PROMPT, seed=1, **{**STEPS, **params})
    assert info.value.name == name and "from 2" in str(info.value)


@pytest.mark.parametrize(("params", "match"), [({"sampler": "Euler"}, "does not use sampler"),
                                               ({"subseed_strength": 0.5}, "does not use subseed_strength")])
def test_latent_loop_settings_are_refused_by_karlo_not_ignored(unclip, params, match):
    with pytest.raises(UnsupportedFeature, match=match):
        unclip.txt2img(PROMPT, seed=1, **STEPS, **params)


def test_each_unclip_family_refuses_the_others_option(unclip, stable):
    with pytest.raises(InvalidParameter, match="Stable unCLIP option") as info:
        unclip.txt2img(PROMPT, seed=1, steps=2, options=unclip_options(noise_level=10))
    assert info.value.name == "unclip.noise_level"
    with pytest.raises(InvalidParameter, match="Karlo option") as info:
        stable.variations(picture(0), seed=1, options=unclip_options(super_res_steps=3), **DDIM_STEPS)
    assert info.value.name == "unclip.super_res_steps"


def test_karlo_paints_its_own_size_only(unclip):
    with pytest.raises(InvalidParameter, match="64x64 only") as info:
        unclip.txt2img(PROMPT, seed=1, width=128, **STEPS)
    assert info.value.name == "width"


# --- Stable unCLIP ------------------------------------------------------------------------------

EMBED_DIM = 32


def build_tiny_stable_unclip(seed: int = 10) -> dict:
    """diffusers' test-sized Stable unCLIP components (both pipelines' shared part plus each one's own),
    with the real CLIP tokenizer, a non-trivial image normaliser and SD 2.1's DDIM v-prediction schedule."""
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, PriorTransformer, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import (
        StableUnCLIPImageNormalizer,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text_config() -> CLIPTextConfig:
        return CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=EMBED_DIM,
                              projection_dim=EMBED_DIM, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=49408, max_position_embeddings=77)

    torch.manual_seed(seed)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMBED_DIM)
    with torch.no_grad():  # real CLIP statistics are not 0 and 1: make scale/unscale matter
        normalizer.mean.normal_(0.0, 0.1)
        normalizer.std.uniform_(0.5, 1.5)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64), attention_head_dim=(2, 4),
        class_embed_type="projection", projection_class_embeddings_input_dim=EMBED_DIM * 2, cross_attention_dim=EMBED_DIM,
        layers_per_block=1, upcast_attention=True, use_linear_projection=True, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1)
    shared = {
        "image_normalizer": normalizer.eval(), "image_noising_scheduler": DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        "tokenizer": build_clip_tokenizer(), "text_encoder": CLIPTextModel(text_config()).eval(), "unet": unet.eval(),
        "scheduler": DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                   prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1),
        "vae": vae.eval(),
    }
    torch.manual_seed(seed + 1)
    prior = {
        "prior_tokenizer": build_clip_tokenizer(), "prior_text_encoder": CLIPTextModelWithProjection(text_config()).eval(),
        "prior": PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM, num_layers=1).eval(),
        "prior_scheduler": DDPMScheduler(variance_type="fixed_small_log", prediction_type="sample", num_train_timesteps=1000,
                                         clip_sample=True, clip_sample_range=5.0, beta_schedule="squaredcos_cap_v2"),
    }
    return {"shared": shared, "prior": prior, "image": build_tiny_image_encoder(seed + 2)}


@pytest.fixture(scope="module")
def stable_references():
    """diffusers' StableUnCLIPImg2ImgPipeline and StableUnCLIPPipeline on the same components."""
    from diffusers import StableUnCLIPImg2ImgPipeline, StableUnCLIPPipeline

    parts = build_tiny_stable_unclip()
    references = {"image": StableUnCLIPImg2ImgPipeline(**parts["shared"], **parts["image"]),
                  "text": StableUnCLIPPipeline(**parts["shared"], **parts["prior"])}
    for pipeline in references.values():
        pipeline.set_progress_bar_config(disable=True)
    return references


@pytest.fixture(scope="module")
def stable_paths(tmp_path_factory, stable_references) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-stable-unclip")
    for name, pipeline in stable_references.items():
        pipeline.save_pretrained(root / name)
    return {"image": root / "image", "text": root / "text"}


@pytest.fixture(scope="module")
def stable(stable_paths, plugin_host):
    """The image-variations folder, with the text folder's prior: every mode."""
    return aipaint.load(stable_paths["image"], host=plugin_host, prior=stable_paths["text"])


def reference_images(reference, **kwargs) -> np.ndarray:
    return reference(output_type="np", **kwargs).images


def mean_diff(ours, theirs) -> float:
    return float(np.abs(as_array(ours) - quantised(theirs)).mean())


DDIM_STEPS = dict(steps=3, sampler="DDIM")


def test_stable_unclip_folders_are_their_own_family(stable_paths, unclip_paths, plugin_host):
    from aipaint_plugins.unclip.stable_model import StableUnCLIPModel

    from aipaint.models.loading import identify_family, resolve_source

    for name in ("image", "text"):
        assert identify_family(resolve_source(stable_paths[name]), plugin_host).name == "stable-unclip"
    assert identify_family(resolve_source(unclip_paths["text"]), plugin_host).name == "unclip"
    image_only = aipaint.load(stable_paths["image"], host=plugin_host)
    assert type(image_only) is aipaint.Pipeline and isinstance(image_only.model, StableUnCLIPModel)
    assert image_only.model.family == "stable-unclip"
    assert image_only.model.prior is None and image_only.model.image_encoder is not None
    assert image_only.model.capabilities == {"variations", "blend", "adapters"}
    with_prior = aipaint.load(stable_paths["text"], host=plugin_host)  # a StableUnCLIPPipeline folder: its own prior
    assert with_prior.model.prior is not None and with_prior.model.capabilities == {"txt2img", "adapters"}
    # diffusers' defaults: the UNet's native size (16 latents x VAE factor 2), 20 DDIM steps, guidance 10.
    defaults = image_only.model.defaults
    assert (defaults.width, defaults.height, defaults.steps, defaults.cfg_scale, defaults.sampler) == (32, 32, 20, 10.0, "DDIM")


def test_stable_variations_match_diffusers_per_seed(stable, stable_references):
    """n images with seeds s, s+1, … are diffusers' images for generators seeded s, s+1, …"""
    source = picture(1)
    result = stable.variations(source, batch_size=2, seed=9, cfg_scale=5.0, options=unclip_options(noise_level=100),
                               **DDIM_STEPS)
    assert result.seeds == [9, 10]
    for ours, seed in zip(result.images, result.seeds, strict=True):
        expected = reference_images(stable_references["image"], image=source, generator=torch.Generator().manual_seed(seed),
                                    num_inference_steps=3, guidance_scale=5.0, noise_level=100)[0]
        assert mean_diff(ours, expected) < 1e-3
    assert as_array(result.images[0]).std() > 0.01
    assert np.abs(as_array(result.images[0]) - as_array(result.images[1])).mean() > 1e-3
    assert "unCLIP mode: variations" in result.parameters and "Noise level: 100" in result.parameters


def test_stable_variations_follow_the_input_image_and_the_noise_level(stable):
    kwargs = dict(seed=5, cfg_scale=5.0, **DDIM_STEPS)
    a = as_array(stable.variations(picture(1), **kwargs).image)
    np.testing.assert_array_equal(a, as_array(stable.variations(picture(1), **kwargs).image))
    assert np.abs(a - as_array(stable.variations(picture(2), **kwargs).image)).mean() > 1e-4
    noisier = stable.variations(picture(1), options=unclip_options(noise_level=900), **kwargs)
    assert np.abs(a - as_array(noisier.image)).mean() > 1e-4


def test_stable_blend_matches_diffusers_given_the_blended_embedding(stable, stable_references):
    from aipaint_plugins.unclip.shared import blend_embeddings

    images, weights = [picture(3), picture(4), picture(5)], [0.5, 0.3, 0.2]
    result = stable.blend(images, weights, seed=6, cfg_scale=4.0, options=unclip_options(noise_level=50), **DDIM_STEPS)
    reference = stable_references["image"]
    with torch.no_grad():
        pixels = reference.feature_extractor(images=images, return_tensors="pt").pixel_values
        blended = blend_embeddings(reference.image_encoder(pixels).image_embeds, weights)[None]
    expected = reference_images(reference, image_embeds=blended, generator=torch.Generator().manual_seed(6),
                                num_inference_steps=3, guidance_scale=4.0, noise_level=50)[0]
    assert mean_diff(result.image, expected) < 1e-3
    assert "unCLIP mode: blend" in result.parameters and "Blend weights: 0.5 0.3 0.2" in result.parameters


def test_stable_blend_with_all_weight_on_one_image_is_that_images_variation(stable):
    kwargs = dict(seed=7, cfg_scale=5.0, **DDIM_STEPS)
    single = as_array(stable.variations(picture(3), **kwargs).image)
    np.testing.assert_allclose(as_array(stable.blend([picture(3), picture(4)], [2.0, 0.0], **kwargs).image), single,
                               atol=2 / 255)
    assert np.abs(as_array(stable.blend([picture(3), picture(4)], **kwargs).image) - single).mean() > 1e-4


def test_stable_txt2img_matches_diffusers_stable_unclip_pipeline(stable, stable_references):
    result = stable.txt2img(PROMPT, "blue", seed=4, batch_size=2, cfg_scale=6.0, **DDIM_STEPS,
                            options=unclip_options(prior_steps=3, prior_cfg_scale=3.0, noise_level=20))
    generators = [torch.Generator().manual_seed(4), torch.Generator().manual_seed(5)]
    expected = reference_images(stable_references["text"], prompt=PROMPT, negative_prompt="blue", generator=generators,
                                num_images_per_prompt=2, num_inference_steps=3, guidance_scale=6.0,
                                prior_num_inference_steps=3, prior_guidance_scale=3.0, noise_level=20)
    for ours, theirs in zip(result.images, expected, strict=True):
        assert mean_diff(ours, theirs) < 1e-3
    assert "Prior steps: 3" in result.parameters and "Prior CFG scale: 3" in result.parameters


def test_the_prior_reads_the_prompt_without_its_syntax():
    from aipaint_plugins.unclip.stable_labels import prior_text

    from aipaint.prompt import parse_prompt

    assert prior_text(parse_prompt(PROMPT), 10) == PROMPT
    parsed = parse_prompt("a (big:1.3) [red:blue:0.5] circle <lora:style:0.8> AND a square")
    assert prior_text(parsed, 10) == "a big red circle a square"


@pytest.mark.parametrize(
    ("images", "weights", "name"),
    [([1, 2, 3, 4, 5, 6], [1.0] * 6, "image_prompts"), ([1, 2], [-1.0, 2.0], "image_prompt_weights"),
     ([1, 2], [1.0], "image_prompt_weights"), ([1, 2], [0.0, 0.0], "image_prompt_weights")],
)
def test_stable_blend_checks_its_inputs(stable, images, weights, name):
    with pytest.raises(InvalidParameter) as info:
        stable.blend([picture(i) for i in images], weights, seed=1, **DDIM_STEPS)
    assert info.value.name == name


@pytest.mark.parametrize(("name", "value"), [("noise_level", -1), ("noise_level", 1000), ("prior_steps", 1),
                                             ("prior_cfg_scale", 0.5)])
def test_stable_unclip_settings_are_checked(stable, name, value):
    with pytest.raises(InvalidParameter) as info:
        stable.txt2img(PROMPT, seed=1, options=unclip_options(**{name: value}), **DDIM_STEPS)
    assert info.value.name == f"unclip.{name}"


def test_stable_noise_level_is_checked_against_the_models_own_schedule(stable, monkeypatch):
    monkeypatch.setitem(stable.model.noising_scheduler_config, "num_train_timesteps", 100)
    with pytest.raises(InvalidParameter, match="from 0 to 99") as info:
        stable.variations(picture(0), seed=1, options=unclip_options(noise_level=500), **DDIM_STEPS)
    assert info.value.name == "unclip.noise_level"


def test_each_stable_mode_needs_its_component(stable, stable_paths, plugin_host):
    image_only = aipaint.load(stable_paths["image"], host=plugin_host)
    with pytest.raises(UnsupportedFeature, match="stable-unclip model 'image' cannot do text to image.*no prior"):
        image_only.txt2img(PROMPT, seed=1, **DDIM_STEPS)
    text_only = aipaint.load(stable_paths["text"], host=plugin_host)
    with pytest.raises(UnsupportedFeature, match="cannot do image blends.*image encoder"):
        text_only.blend([picture(0), picture(1)], seed=1, **DDIM_STEPS)
    with pytest.raises(UnsupportedFeature, match="cannot do image to image.*CLIP image embedding"):
        stable.img2img(picture(0), PROMPT, seed=1, **DDIM_STEPS)


def test_image_encoder_option_gives_a_text_folder_variations(stable, stable_paths, plugin_host):
    text = aipaint.load(stable_paths["text"], host=plugin_host, image_encoder=stable_paths["image"])
    kwargs = dict(seed=3, cfg_scale=5.0, **DDIM_STEPS)
    np.testing.assert_array_equal(as_array(text.variations(picture(2), **kwargs).image),
                                  as_array(stable.variations(picture(2), **kwargs).image))
    from aipaint.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="image_encoder= takes a StableUnCLIPImg2ImgPipeline"):
        aipaint.load(stable_paths["text"], host=plugin_host, image_encoder=stable_paths["text"])


def test_karlos_prior_drives_stable_unclip_txt2img(stable_paths, unclip_paths, unclip, plugin_host):
    """The -small model's recipe: Karlo's prior (and its CLIP text encoder) before a ViT-L Stable unCLIP."""
    pipe = aipaint.load(stable_paths["image"], host=plugin_host, prior=unclip_paths["text"])
    karlo = unclip.model
    torch.testing.assert_close(pipe.model.prior.state_dict(), karlo.prior.state_dict())
    torch.testing.assert_close(pipe.model.prior_text_encoder.state_dict(), karlo.text_encoder.state_dict())
    assert pipe.model.prior_scheduler_config["_class_name"] == "UnCLIPScheduler"
    replaced = aipaint.load(stable_paths["text"], host=plugin_host, prior=unclip_paths["text"])  # the option wins
    torch.testing.assert_close(replaced.model.prior.state_dict(), karlo.prior.state_dict())
    prior = unclip_options(prior_steps=3)
    result = pipe.txt2img(PROMPT, seed=2, options=prior, **DDIM_STEPS)
    other = pipe.txt2img("a small blue square", seed=2, options=prior, **DDIM_STEPS)
    assert np.abs(as_array(result.image) - as_array(other.image)).mean() > 1e-4


def test_components_of_another_embedding_size_are_refused(tmp_path, stable_paths, plugin_host):
    import shutil

    from diffusers import PriorTransformer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from aipaint.errors import ModelLoadError

    wide_prior, wide_encoder = tmp_path / "wide-prior", tmp_path / "wide-encoder"
    shutil.copytree(stable_paths["text"], wide_prior)
    shutil.rmtree(wide_prior / "prior")
    PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=EMBED_DIM * 2, num_layers=1).save_pretrained(
        wide_prior / "prior")
    with pytest.raises(ModelLoadError, match="prior of .* works with 64-dimensional CLIP embeddings, but image takes 32"):
        aipaint.load(stable_paths["image"], host=plugin_host, prior=wide_prior)
    shutil.copytree(stable_paths["image"], wide_encoder)
    shutil.rmtree(wide_encoder / "image_encoder")
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, projection_dim=EMBED_DIM * 2, num_hidden_layers=1,
                                                   num_attention_heads=4, image_size=32, intermediate_size=37, patch_size=4)
                                  ).save_pretrained(wide_encoder / "image_encoder")
    with pytest.raises(ModelLoadError, match="image encoder of .* works with 64-dimensional CLIP embeddings, but text takes 32"):
        aipaint.load(stable_paths["text"], host=plugin_host, image_encoder=wide_encoder)
    with pytest.raises(ModelLoadError, match="a prior comes from"):
        aipaint.load(stable_paths["image"], host=plugin_host, prior=stable_paths["image"])


def test_zoo_cards_name_the_published_stable_unclip_repos():
    from aipaint.models import zoo

    big, small = zoo.get("stable-diffusion-2-1-unclip"), zoo.get("stable-diffusion-2-1-unclip-small")
    assert big.source["repo"] == "stabilityai/stable-diffusion-2-1-unclip" and "prior" not in big.data
    assert small.source["repo"] == "stabilityai/stable-diffusion-2-1-unclip-small"
    assert small.data["prior"]["repo"] == "kakaobrain/karlo-v1-alpha"
    for card in (big, small):
        assert card.family == "stable-unclip" and card.license.startswith("CreativeML Open RAIL++-M")
        assert card.defaults == {"width": 768, "height": 768, "steps": 20, "cfg_scale": 10.0, "sampler": "DDIM"}
        assert all("sha256" not in f for f in card.files) and "sha256 is not pinned" in card.data["notes"]


def test_the_small_cards_prior_is_fetched_through_the_zoo_download(monkeypatch, stable_paths, unclip_paths):
    from aipaint_plugins.unclip import StableUnCLIP

    from aipaint.models import zoo
    from aipaint.models.family import LoadOptions, ModelSource

    fetched = []

    def fake_download(repo, filename=None, card=None, patterns=None):
        fetched.append((repo, patterns))
        return unclip_paths["text"]

    monkeypatch.setattr(zoo, "download_from_hub", fake_download)
    card = zoo.get("stable-unclip-2-1-small").data
    model = StableUnCLIP().load(ModelSource(stable_paths["image"], "folder", card["id"], card), LoadOptions())
    assert fetched == [("kakaobrain/karlo-v1-alpha", card["prior"]["patterns"])]
    assert "prior/diffusion_pytorch_model.safetensors" in card["prior"]["patterns"]
    assert model.prior is not None and model.image_encoder is not None


def test_stable_variations_skip_early_cfg_give_the_image_embedding_to_unguided_calls(stable):
    """With every step unguided there are no negative rows, so no zero labels: CFG 1's image."""
    kwargs = dict(seed=5, options=unclip_options(noise_level=100), **DDIM_STEPS)
    unguided = as_array(stable.variations(picture(1), cfg_scale=1.0, **kwargs).image)
    skipped = as_array(stable.variations(picture(1), cfg_scale=5.0, skip_early_cfg=1.0, **kwargs).image)
    np.testing.assert_array_equal(skipped, unguided)
    partly = as_array(stable.variations(picture(1), cfg_scale=5.0, skip_early_cfg=0.4, **kwargs).image)
    assert np.abs(partly - unguided).mean() > 1e-4
