"""DeepFloyd IF: the pixel cascade, checked stage by stage against diffusers' IF pipelines.

Tiny random-weight stages with diffusers' test-sized IF configs, a tiny T5 encoder with
a small Unigram vocabulary built offline, and a tiny x4 upscaler; 8 px → 32 px → 128 px.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.deepfloyd_if.options import IFOptions

import aipaint
from aipaint.errors import InvalidParameter, ModelLoadError

PROMPT = "a big red circle on the left"
WORDS = "a big small red blue green yellow circle square triangle cross on the left right top bottom white black gray background".split()


def build_t5(seed: int = 0):
    """A tiny T5 encoder and a T5 tokenizer with a small Unigram vocabulary (no download)."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0 - i * 0.01) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(
        T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, dropout_rate=0.0)
    )
    return encoder.eval(), tokenizer


def _if_unet(seed: int, *, super_resolution: bool):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        layers_per_block=1,
        block_out_channels=[32, 64],
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        out_channels=6,
        cross_attention_dim=32,
        encoder_hid_dim=32,
        attention_head_dim=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    if super_resolution:
        return UNet2DConditionModel(sample_size=32, in_channels=6, class_embed_type="timestep", mid_block_scale_factor=1.414,
                                    time_embedding_act_fn="gelu", time_embedding_dim=32, **common).eval()
    return UNet2DConditionModel(sample_size=8, in_channels=3, **common).eval()


def _if_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", beta_start=0.0001, beta_end=0.02,
                         thresholding=True, dynamic_thresholding_ratio=0.95, sample_max_value=1.0,
                         prediction_type="epsilon", variance_type="learned_range")


def build_tiny_upscaler(seed: int = 2) -> dict:
    """diffusers' test-sized Stable Diffusion x4 upscaler (latent factor 4, 7 UNet input channels)."""
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 32, 64), layers_per_block=1, sample_size=32, in_channels=7, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True,
        only_cross_attention=(True, True, False), num_class_embeds=100, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 16, 32], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        latent_channels=4, norm_num_groups=8, layers_per_block=1, scaling_factor=0.08333,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
    ))
    return {
        "unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(), "tokenizer": build_clip_tokenizer(),
        "scheduler": DDIMScheduler(prediction_type="v_prediction"), "low_res_scheduler": DDPMScheduler(),
    }


@pytest.fixture(scope="module")
def if_paths(tmp_path_factory) -> dict[str, Path]:
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

    root = tmp_path_factory.mktemp("tiny-if")
    text_encoder, tokenizer = build_t5()
    none = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    IFPipeline(text_encoder=text_encoder, tokenizer=tokenizer, unet=_if_unet(0, super_resolution=False),
               scheduler=_if_scheduler(), **none).save_pretrained(root / "stage1")
    IFSuperResolutionPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, unet=_if_unet(1, super_resolution=True), scheduler=_if_scheduler(),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                              beta_start=0.0001, beta_end=0.02),
        **none,
    ).save_pretrained(root / "stage2")
    StableDiffusionUpscalePipeline(**build_tiny_upscaler(), max_noise_level=350).save_pretrained(root / "stage3")
    return {f"stage{i}": root / f"stage{i}" for i in (1, 2, 3)}


@pytest.fixture(scope="module")
def cascade(if_paths, plugin_host):
    return aipaint.load(if_paths["stage1"], host=plugin_host, stage2=if_paths["stage2"], stage3=if_paths["stage3"])


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64) / 255.0


def quantised(reference: np.ndarray) -> np.ndarray:
    return np.round(np.clip(reference, 0, 1) * 255.0) / 255.0


def test_loads_as_an_if_cascade_behind_the_one_pipeline(cascade, if_paths, plugin_host):
    from aipaint_plugins.deepfloyd_if.model import IFCascade

    from aipaint.models.family import GenerativeModel

    assert type(cascade) is aipaint.Pipeline
    assert isinstance(cascade.model, IFCascade) and isinstance(cascade.model, GenerativeModel)
    assert cascade.model.capabilities == {"txt2img"}
    assert [s.kind for s in cascade.model.stages] == ["base", "super_resolution", "upscaler"]
    assert type(cascade.model.text_encoder).__name__ == "T5EncoderModel"
    stage1_only = aipaint.load(if_paths["stage1"], host=plugin_host)
    assert len(stage1_only.model.stages) == 1


def test_stage_folders_in_the_wrong_order_are_refused(if_paths, plugin_host):
    with pytest.raises(ModelLoadError, match="stage II"):
        aipaint.load(if_paths["stage1"], host=plugin_host, stage2=if_paths["stage3"])
    with pytest.raises(ModelLoadError, match="stage3= needs stage2="):
        aipaint.load(if_paths["stage1"], host=plugin_host, stage3=if_paths["stage3"])
    with pytest.raises(ModelLoadError, match="not a stage I"):
        aipaint.load(if_paths["stage2"], host=plugin_host, family="deepfloyd-if")


def _reference_stage1(if_paths, generator, steps, cfg, negative=None):
    from diffusers import IFPipeline

    stage1 = IFPipeline.from_pretrained(if_paths["stage1"], local_files_only=True)
    return stage1(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=cfg, generator=generator,
                  clean_caption=False, output_type="pt").images


def test_stage_one_matches_diffusers_if_pipeline(cascade, if_paths):
    result = cascade.txt2img(PROMPT, "blue", seed=5, steps=3, cfg_scale=6.0, options={"if": {"stages": 1}})
    expected = _reference_stage1(if_paths, torch.Generator().manual_seed(5), 3, 6.0, negative="blue")
    expected = (expected / 2 + 0.5).permute(0, 2, 3, 1).numpy()[0]
    ours = as_array(result.image)
    assert ours.shape == (8, 8, 3)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert ours.std() > 0.01


def test_three_stages_match_diffusers_cascade_with_one_generator(cascade, if_paths):
    from diffusers import IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

    result = cascade.txt2img(PROMPT, seed=11, steps=2, cfg_scale=5.0, options=[IFOptions(
        stage2_steps=2, stage2_cfg_scale=4.0, stage2_noise_level=200, stage3_steps=2, stage3_cfg_scale=6.0,
        stage3_noise_level=50)])
    generator = torch.Generator().manual_seed(11)  # one stream through the stages, as aipaint does
    low = _reference_stage1(if_paths, generator, 2, 5.0)
    stage2 = IFSuperResolutionPipeline.from_pretrained(if_paths["stage2"], local_files_only=True)
    mid = stage2(image=low, prompt=PROMPT, num_inference_steps=2, guidance_scale=4.0, noise_level=200, generator=generator,
                 clean_caption=False, output_type="pt").images
    stage3 = StableDiffusionUpscalePipeline.from_pretrained(if_paths["stage3"], local_files_only=True)
    final = stage3(prompt=PROMPT, image=mid, num_inference_steps=2, guidance_scale=6.0, noise_level=50, generator=generator,
                   output_type="np").images[0]
    ours = as_array(result.image)
    assert ours.shape == (128, 128, 3)  # 8 px × 4 (stage II) × 4 (upscaler)
    assert np.abs(ours - quantised(final)).mean() < 1e-3
    assert "Stage 2 steps: 2" in result.parameters and "Stage 3 noise level: 50" in result.parameters


def test_each_stage_has_its_own_steps_and_guidance(cascade):
    base = dict(stages=2, stage2_steps=2)

    def run(**options):
        return as_array(cascade.txt2img(PROMPT, seed=3, steps=2, options={"if": {**base, **options}}).image)

    reference = run()
    assert reference.shape == (32, 32, 3)
    changed_cfg = run(stage2_cfg_scale=9.0)
    changed_steps = run(stage2_steps=3)
    again = run()
    np.testing.assert_array_equal(reference, again)  # a seed fixes the cascade
    assert np.abs(reference - changed_cfg).mean() > 1e-4
    assert np.abs(reference - changed_steps).mean() > 1e-4


def test_batch_items_use_consecutive_seeds(cascade):
    one_stage = {"if": {"stages": 1}}
    batch = cascade.txt2img(PROMPT, seed=20, batch_size=2, steps=2, options=one_stage)
    single = cascade.txt2img(PROMPT, seed=21, steps=2, options=one_stage)
    assert batch.seeds == [20, 21]
    np.testing.assert_allclose(as_array(batch.images[1]), as_array(single.image), atol=1.5 / 255)


@pytest.mark.parametrize(
    ("params", "name"),
    [({"steps": 0}, "steps"), ({"width": 12}, "width"), ({"options": {"if": {"stages": 4}}}, "if.stages"),
     ({"options": {"if": {"stage2_cfg_scale": 50.0}}}, "if.stage2_cfg_scale"),
     ({"options": {"if": {"stage3_noise_level": 400}}}, "if.stage3_noise_level")],
)
def test_bad_settings_raise_typed_errors(cascade, params, name):
    with pytest.raises(InvalidParameter) as info:
        cascade.txt2img(PROMPT, seed=1, **params)
    assert info.value.name == name


def test_more_stages_than_loaded_is_refused_before_any_work(if_paths, plugin_host, monkeypatch):
    from aipaint_plugins.deepfloyd_if import loop

    stage1_only = aipaint.load(if_paths["stage1"], host=plugin_host)
    monkeypatch.setattr(loop, "t5_embeddings", lambda *a: pytest.fail("the cascade started"))
    with pytest.raises(InvalidParameter, match="1 stage") as info:
        stage1_only.txt2img(PROMPT, seed=1, options={"if": {"stages": 2}})
    assert info.value.name == "if.stages"


def test_settings_of_the_latent_loop_are_refused_not_ignored(cascade):
    from aipaint.errors import UnsupportedFeature

    with pytest.raises(UnsupportedFeature, match="deepfloyd-if model .* does not use sampler"):
        cascade.txt2img(PROMPT, seed=1, sampler="Euler", options={"if": {"stages": 1}})


def test_variation_seed_moves_stage_one_noise(cascade):
    base = dict(seed=4, steps=2, options={"if": {"stages": 1}})
    plain = cascade.txt2img(PROMPT, **base)
    varied = cascade.txt2img(PROMPT, subseed=9, subseed_strength=0.5, **base)
    assert np.abs(as_array(plain.image) - as_array(varied.image)).mean() > 1e-3
    assert "Variation seed: 9" in varied.parameters


def test_zoo_cards_chain_the_three_published_stages():
    from aipaint.models import zoo

    card = zoo.get("deepfloyd-if-i-xl-v1.0")
    assert card.family == "deepfloyd-if" and card.source == {"kind": "hub", "repo": "DeepFloyd/IF-I-XL-v1.0"}
    assert [s["repo"] for s in card.data["stages"]] == ["DeepFloyd/IF-II-L-v1.0", "stabilityai/stable-diffusion-x4-upscaler"]
    assert "allow_patterns" not in card.data["stages"][1]  # the upscaler needs its own CLIP text encoder
    assert [d["steps"] for d in card.data["stage_defaults"]] == [100, 50, 75]
    assert "DeepFloyd" in card.license


def test_card_stages_are_fetched_through_the_zoo_download(monkeypatch, if_paths, plugin_host):
    """The card's later stages go through the same download function as every zoo model."""
    from aipaint_plugins.deepfloyd_if import DeepFloydIF

    from aipaint.models import zoo
    from aipaint.models.family import LoadOptions, ModelSource

    fetched = []

    def fake_download(repo, filename=None, card=None, patterns=None):
        fetched.append(repo)
        if repo.endswith("IF-II-L-v1.0"):  # stage II reuses stage I's T5: only its UNet and configs
            assert patterns and not any("text_encoder" in p or p.startswith("*/model") for p in patterns)
        return if_paths["stage2"] if repo.endswith("IF-II-L-v1.0") else if_paths["stage3"]

    monkeypatch.setattr(zoo, "download_from_hub", fake_download)
    card = zoo.get("deepfloyd-if-i-xl-v1.0").data
    source = ModelSource(if_paths["stage1"], "folder", "IF-I-XL-v1.0", card)
    model = DeepFloydIF().load(source, LoadOptions())
    assert fetched == ["DeepFloyd/IF-II-L-v1.0", "stabilityai/stable-diffusion-x4-upscaler"]
    assert [s.kind for s in model.stages] == ["base", "super_resolution", "upscaler"]
    assert [s.defaults.steps for s in model.stages] == [100, 50, 75]


def test_progress_counts_the_steps_of_every_stage(cascade):
    calls = []
    cascade.txt2img(PROMPT, seed=1, steps=2, options={"if": {"stages": 2, "stage2_steps": 3}},
                    progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]
