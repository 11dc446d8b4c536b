"""unCLIP (Karlo): text-to-image, variations and blends, checked against diffusers' pipelines.

Tiny random-weight components with diffusers' test-sized UnCLIP configs: decoder at
32 px, super-resolution to 64 px, 2 steps per stage.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aipaint
from aipaint.errors import InvalidParameter, UnsupportedFeature

PROMPT = "a big red circle on the left"


def build_tiny_unclip(seed: int = 0) -> dict:
    """diffusers' test-sized UnCLIPPipeline components (with the real CLIP tokenizer)."""
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from aipaint.world.clip_tokenizer import build_clip_tokenizer

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


STEPS = dict(prior_steps=2, steps=2, super_res_steps=2)
REFERENCE_STEPS = dict(prior_num_inference_steps=2, decoder_num_inference_steps=2, super_res_num_inference_steps=2)


def test_loads_as_unclip_with_its_own_pipeline(unclip, unclip_paths, plugin_host):
    from aipaint_plugins.unclip.pipeline import UnCLIPPipeline

    assert isinstance(unclip, UnCLIPPipeline)
    assert unclip.model.prior is not None and unclip.model.image_encoder is not None
    text_only = aipaint.load(unclip_paths["text"], host=plugin_host)
    with pytest.raises(UnsupportedFeature, match="image encoder"):
        text_only.variations(picture(0), seed=1, **STEPS)
    variations_only = aipaint.load(unclip_paths["variations"], host=plugin_host)
    assert variations_only.model.prior is None
    with pytest.raises(UnsupportedFeature, match="no prior"):
        variations_only.txt2img(PROMPT, seed=1, **STEPS)


def test_txt2img_matches_diffusers_unclip_pipeline(unclip, references):
    result = unclip.txt2img(PROMPT, seed=4, prior_cfg_scale=3.0, cfg_scale=6.0, **STEPS)
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
    result = unclip.variations(source, n=2, seed=9, cfg_scale=5.0, steps=2, super_res_steps=2)
    reference = references["variations"]
    generators = [torch.Generator().manual_seed(9), torch.Generator().manual_seed(10)]  # aipaint: seed + i per image
    expected = reference(image=source, num_images_per_prompt=2, generator=generators, decoder_guidance_scale=5.0,
                         decoder_num_inference_steps=2, super_res_num_inference_steps=2, output_type="np").images
    assert result.seeds == [9, 10] and len(result.images) == 2
    for ours, theirs in zip(result.images, expected, strict=True):
        assert np.abs(as_array(ours) - quantised(theirs)).mean() < 1e-3


def test_variations_follow_the_input_image(unclip):
    """Same seed, different inputs: the image embedding is what the decoder follows."""
    a = as_array(unclip.variations(picture(1), seed=5, steps=2, super_res_steps=2).image)
    b = as_array(unclip.variations(picture(2), seed=5, steps=2, super_res_steps=2).image)
    again = as_array(unclip.variations(picture(1), seed=5, steps=2, super_res_steps=2).image)
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).mean() > 1e-4


def test_blend_with_all_weight_on_one_image_is_that_images_variation(unclip):
    kwargs = dict(seed=6, steps=2, super_res_steps=2)
    single = as_array(unclip.variations(picture(3), **kwargs).image)
    blended = as_array(unclip.blend([picture(3), picture(4), picture(5)], [1.0, 0.0, 0.0], **kwargs).image)
    np.testing.assert_allclose(blended, single, atol=2 / 255)
    mixed = unclip.blend([picture(3), picture(4)], [0.5, 0.5], **kwargs)
    assert np.abs(as_array(mixed.image) - single).mean() > 1e-4
    assert "Blend weights: 0.5 0.5" in mixed.parameters


def test_blend_embeddings_interpolate_on_the_sphere():
    from aipaint_plugins.unclip.pipeline import blend_embeddings, slerp

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
    [([1], [1.0], "images"), ([1, 2, 3, 4, 5, 6], [1.0] * 6, "images"), ([1, 2], [1.0], "weights"),
     ([1, 2], [0.0, 0.0], "weights"), ([1, 2], [-1.0, 2.0], "weights")],
)
def test_blend_checks_its_inputs(unclip, images, weights, name):
    with pytest.raises(InvalidParameter) as info:
        unclip.blend([picture(i) for i in images], weights, seed=1, **{k: v for k, v in STEPS.items() if k != "prior_steps"})
    assert info.value.name == name


def test_zoo_cards_name_the_published_karlo_repos():
    from aipaint import zoo

    karlo = zoo.get("karlo-v1-alpha")
    assert karlo.family == "unclip" and karlo.source["repo"] == "kakaobrain/karlo-v1-alpha"
    assert karlo.data["image_encoder"]["repo"] == "kakaobrain/karlo-v1-alpha-image-variations"
    assert zoo.get("karlo-v1-alpha-image-variations").source["repo"] == "kakaobrain/karlo-v1-alpha-image-variations"


def test_the_cards_image_encoder_is_fetched_through_the_zoo_download(monkeypatch, unclip_paths):
    from aipaint_plugins.unclip import UnCLIP

    from aipaint import zoo
    from aipaint.families import LoadOptions, ModelSource

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


@pytest.mark.parametrize("name", ["prior_steps", "steps", "super_res_steps"])
def test_one_step_is_refused_with_a_typed_error(unclip, name):
    with pytest.raises(InvalidParameter) as info:
        unclip.txt2img(PROMPT, seed=1, **{**STEPS, name: 1})
    assert info.value.name == name and "from 2" in str(info.value)
