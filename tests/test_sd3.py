"""SD 3 / 3.5 through aipaint's core loop, checked against diffusers' own SD 3 pipelines.

Tiny random-weight components in diffusers' test-sized SD 3 shapes (an MMDiT with one joint
block, CLIP-L and CLIP-G of different widths, a tiny T5 and a 16-channel VAE with a shift
factor); 32-48 px, 3-5 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import aipaint
from aipaint.models.family import ModelSource

PROMPT = "a big red circle on the left"
WORDS = "a big small red blue green yellow circle square triangle cross on the left right top bottom white black gray background".split()


def build_tiny_t5(seed: int, d_model: int):
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0 - i * 0.01) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                      relative_attention_num_buckets=8, dropout_rate=0.0))
    return encoder.eval(), tokenizer


def build_tiny_sd3_components(seed: int = 0, *, tokenizer=None) -> dict:
    """diffusers' test-sized SD 3, with CLIP-G wider than CLIP-L (as 1280 vs 768) so that the
    padding to T5's width and both pooled halves are visible."""
    import copy

    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, intermediate_size=37, layer_norm_eps=1e-5,
                num_attention_heads=4, num_hidden_layers=5, vocab_size=49408, hidden_act="gelu", projection_dim=32,
                max_position_embeddings=77)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64, out_channels=16,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=16, sample_size=32, norm_num_groups=16,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=32, **text))
    # SD 3 reads CLIP-L's pooled output unprojected: diffusers loads its projection as the
    # identity from Stability's files (Stability's own code skips it), so the tiny model does too.
    with torch.no_grad():
        text_encoder.text_projection.weight.copy_(torch.eye(32))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, **text))
    text_encoder_3, tokenizer_3 = build_tiny_t5(seed + 1, 96)
    tokenizer = tokenizer or build_clip_tokenizer()
    tokenizer_2 = copy.deepcopy(tokenizer)
    tokenizer_2.pad_token = "!"  # CLIP-G pads with "!" (id 0), as in SDXL
    return {
        "transformer": transformer.eval(), "vae": vae.eval(), "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": text_encoder.eval(), "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2.eval(), "tokenizer_2": tokenizer_2,
        "text_encoder_3": text_encoder_3, "tokenizer_3": tokenizer_3,
    }


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory) -> Path:
    from diffusers import StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("tiny-sd3") / "sd3"
    StableDiffusion3Pipeline(**build_tiny_sd3_components(0)).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def sd3(sd3_path, plugin_host):
    return aipaint.load(sd3_path, host=plugin_host)


@pytest.fixture(scope="module")
def sd3_no_t5(sd3_path, plugin_host):
    return aipaint.load(sd3_path, host=plugin_host, t5=False)


_references: dict = {}


def reference(sd3_path, kind: str = "", *, fresh: bool = False, with_t5: bool = True):
    """diffusers' own SD 3 pipeline (txt2img, ``Img2Img`` or ``Inpaint``) on the same folder;
    shared unless ``fresh`` (a test that changes it: its scheduler, LoRA weights)."""
    import diffusers

    key = (str(sd3_path), kind, with_t5)
    if fresh or key not in _references:
        cls = getattr(diffusers, f"StableDiffusion3{kind}Pipeline")
        components = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = cls.from_pretrained(sd3_path, local_files_only=True, **components)
        pipe.set_progress_bar_config(disable=True)
        if fresh:
            return pipe
        _references[key] = pipe
    return _references[key]


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64) / 255.0


def quantised(expected: np.ndarray) -> np.ndarray:
    return np.round(expected * 255.0) / 255.0


def noise_picture(size: int = 32, seed: int = 0):
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8"))


# --- loading and identification ---------------------------------------------------------


def test_folder_loads_as_sd3_with_the_family_defaults(sd3, sd3_no_t5):
    model = sd3.model
    assert model.family == "sd3" and type(model.transformer).__name__ == "SD3Transformer2DModel"
    assert set(model.modules()) == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert set(sd3_no_t5.model.modules()) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert (model.defaults.width, model.defaults.height, model.defaults.steps, model.defaults.sampler) == (1024, 1024, 28, "Euler")
    assert model.latent_channels == model.unet_in_channels == 16 and model.shift_factor == pytest.approx(0.0609)
    assert model.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"


def test_sd15_and_sdxl_folders_are_not_claimed_and_sd3_is_not_theirs(sd3_path, tiny_sd_path, plugin_host):
    sd3_family = plugin_host.registry.families.get("sd3")
    assert sd3_family.identify(ModelSource(sd3_path, "folder", "sd3"))
    assert not sd3_family.identify(ModelSource(tiny_sd_path, "folder", "tiny"))
    for name in ("sd15", "sdxl"):
        assert not plugin_host.registry.families.get(name).identify(ModelSource(sd3_path, "folder", "sd3"))


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        (["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"], True),
        (["joint_blocks.0.context_block.adaLN_modulation.1.bias"], True),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.positional_embedding"], False),
    ],
)
def test_single_files_are_identified_by_the_mmdit_keys(tmp_path, plugin_host, keys, expected):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    assert plugin_host.registry.families.get("sd3").identify(ModelSource(path, "file", "model")) is expected


def test_a_file_without_the_clip_encoders_is_refused_saying_what_to_load(tmp_path, plugin_host):
    from safetensors.torch import save_file

    from aipaint.errors import ModelLoadError

    path = tmp_path / "sd3.5_large.safetensors"
    save_file({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": torch.zeros(1),
               "model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": torch.zeros(1)}, str(path))
    with pytest.raises(ModelLoadError, match="without its CLIP text encoders"):
        aipaint.load(path, host=plugin_host)


@pytest.mark.parametrize(("t5", "extra_keys", "config"), [
    (True, ["model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight"], "sd3.5-large"),
    (False, [], "sd3-medium"),
])
def test_single_files_load_through_from_single_file_with_the_offline_config(
    tmp_path, plugin_host, monkeypatch, sd3_path, t5, extra_keys, config
):
    """The conversion itself is diffusers'; this checks what aipaint asks of it: the zoo config
    chosen by the file's keys, the CLIP tokenizers from the shipped configs, T5 only if present."""
    import diffusers
    from aipaint_plugins import sd3 as plugin
    from safetensors.torch import save_file

    keys = ["model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias", plugin.CLIP_L_KEY,
            plugin.CLIP_G_KEY, *extra_keys] + ([plugin.T5_KEY] if t5 else [])
    path = tmp_path / "my-sd3.safetensors"
    save_file({k: torch.zeros(1) for k in keys}, str(path))
    calls = []
    tiny_t5_tokenizer = build_tiny_t5(0, 8)[1]
    monkeypatch.setattr(plugin, "t5_tokenizer", lambda config: tiny_t5_tokenizer)

    def fake_from_single_file(cls, file, **kwargs):
        calls.append((file, kwargs))
        parts = {k: kwargs[k] for k in ("text_encoder_3", "tokenizer_3") if k in kwargs and kwargs[k] is None}
        return cls.from_pretrained(sd3_path, local_files_only=True, **parts)

    monkeypatch.setattr(diffusers.StableDiffusion3Pipeline, "from_single_file", classmethod(fake_from_single_file))
    pipe = aipaint.load(path, host=plugin_host)
    ((file, kwargs),) = calls
    assert file == str(path) and Path(kwargs["config"]).name == config and kwargs["local_files_only"] is True
    assert kwargs["tokenizer"].pad_token == "<|endoftext|>" and kwargs["tokenizer_2"].pad_token == "!"
    assert kwargs["tokenizer"]("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    if t5:
        assert kwargs["tokenizer_3"] is tiny_t5_tokenizer and "text_encoder_3" not in kwargs
    else:
        assert kwargs["text_encoder_3"] is None and kwargs["tokenizer_3"] is None
    assert pipe.model.family == "sd3" and pipe.model.hash_path == path
    assert (pipe.model.text_encoder_3 is not None) is t5
    assert pipe.txt2img(PROMPT, steps=1, width=32, height=32, seed=1).image.size == (32, 32)


# --- single files in Stability's layout, end to end -----------------------------------------
# The tiny model written as Stability's SD 3 files are laid out (MMDiT under
# model.diffusion_model. with fused qkv, the LDM VAE under first_stage_model., the encoders under
# text_encoders.clip_l/clip_g/t5xxl.transformer.), then loaded through aipaint.load and diffusers'
# own converters with no stub. The config folder is the tiny folder without weights, so a
# component the file cannot fill fails instead of being read from the folder.


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def mmdit_to_sai(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers' SD3Transformer2DModel state dict in Stability's MMDiT names (the inverse of
    diffusers' convert_sd3_transformer_checkpoint_to_diffusers, for models without qk norm or attn2)."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    renames = {
        "pos_embed.proj": "x_embedder.proj", "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
        "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0", "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    }
    for i in range(num_layers):
        last = i == num_layers - 1
        b, j = f"transformer_blocks.{i}", f"joint_blocks.{i}"
        renames.update({f"{b}.attn.to_out.0": f"{j}.x_block.attn.proj", f"{b}.norm1.linear": f"{j}.x_block.adaLN_modulation.1",
                        f"{b}.ff.net.0.proj": f"{j}.x_block.mlp.fc1", f"{b}.ff.net.2": f"{j}.x_block.mlp.fc2"})
        if not last:
            renames.update({f"{b}.attn.to_add_out": f"{j}.context_block.attn.proj",
                            f"{b}.norm1_context.linear": f"{j}.context_block.adaLN_modulation.1",
                            f"{b}.ff_context.net.0.proj": f"{j}.context_block.mlp.fc1", f"{b}.ff_context.net.2": f"{j}.context_block.mlp.fc2"})
        for kind in ("weight", "bias"):
            out[f"{j}.x_block.attn.qkv.{kind}"] = torch.cat([state[f"{b}.attn.to_{x}.{kind}"] for x in "qkv"])
            out[f"{j}.context_block.attn.qkv.{kind}"] = torch.cat([state[f"{b}.attn.add_{x}_proj.{kind}"] for x in "qkv"])
            if last:  # the last block's context stream keeps only its modulation, stored swapped
                out[f"{j}.context_block.adaLN_modulation.1.{kind}"] = _swap_scale_shift(state[f"{b}.norm1_context.linear.{kind}"])
            out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_scale_shift(state[f"norm_out.linear.{kind}"])
    for old, new in renames.items():
        for kind in ("weight", "bias"):
            out[f"{new}.{kind}"] = state[f"{old}.{kind}"]
    return out


@pytest.fixture(scope="module")
def sai_file(tmp_path_factory, sd3, sd3_path) -> dict[str, Path]:
    """The tiny model as one Stability-layout file, and its config folder without weights."""
    import shutil

    from ldm_checkpoint import vae_to_ldm
    from safetensors.torch import save_file

    model = sd3.model
    root = tmp_path_factory.mktemp("sd3-file")
    state = {f"model.diffusion_model.{k}": v for k, v in mmdit_to_sai(model.transformer.state_dict(), 1).items()}
    assert len(state) == len(model.transformer.state_dict()) - 2 * 2 * 3 + 2 * 2  # every tensor; two qkv triples fused
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(model.vae.state_dict(), model.vae.config).items()})
    for name, encoder in (("clip_l", model.text_encoder), ("clip_g", model.text_encoder_2), ("t5xxl", model.text_encoder_3)):
        state.update({f"text_encoders.{name}.transformer.{k}": v for k, v in encoder.state_dict().items()})
    path = root / "sd3_tiny_incl_clips_t5.safetensors"
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path))
    config = root / "config"
    shutil.copytree(sd3_path, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return {"file": path, "config": config}


def test_stability_layout_file_loads_end_to_end_and_equals_the_folder(sai_file, sd3, plugin_host, offline):
    pipe = aipaint.load(sai_file["file"], host=plugin_host, config=sai_file["config"])
    model = pipe.model
    assert model.family == "sd3" and model.text_encoder_3 is not None
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        ours, theirs = model.modules()[name].state_dict(), sd3.model.modules()[name].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k in ours), name
        assert set(theirs) - set(ours) <= {"encoder.embed_tokens.weight"}, name  # T5's tied table
    kwargs = dict(sampler="Euler", steps=3, cfg_scale=5.0, seed=7, width=32, height=32)
    np.testing.assert_array_equal(as_array(pipe.txt2img(PROMPT, "blue", **kwargs).image),
                                  as_array(sd3.txt2img(PROMPT, "blue", **kwargs).image))
    without = aipaint.load(sai_file["file"], host=plugin_host, config=sai_file["config"], t5=False)
    assert without.model.text_encoder_3 is None and without.model.tokenizer_3 is None


# --- conditioning ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_t5", [True, False])
def test_conditioning_equals_diffusers_encode_prompt(sd3, sd3_no_t5, sd3_path, with_t5):
    pipe = sd3 if with_t5 else sd3_no_t5
    ref = reference(sd3_path, with_t5=with_t5)
    (cond,) = pipe.model.encode_texts([PROMPT])
    with torch.inference_mode():
        embeds, _, pooled, _ = ref.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    assert cond.embeds.shape == (1, 77 + 256, 96)  # CLIP-L 32 + CLIP-G 48, padded to T5's 96; then T5
    assert cond.extras["pooled_projections"].shape == (1, 64)
    torch.testing.assert_close(cond.embeds, embeds)
    torch.testing.assert_close(cond.extras["pooled_projections"], pooled)
    assert bool(cond.embeds[:, 77:].abs().sum() > 0) is with_t5
    assert float(cond.embeds[:, :77, 80:].abs().sum()) == 0.0  # the padding


def test_emphasis_reaches_both_clips_and_t5(sd3):
    plain, weighted = sd3.model.encode_texts([PROMPT, "a big (red:1.6) circle on the left"])
    assert not torch.equal(plain.embeds[:, :77, :32], weighted.embeds[:, :77, :32])
    assert not torch.equal(plain.embeds[:, :77, 32:80], weighted.embeds[:, :77, 32:80])
    assert not torch.equal(plain.embeds[:, 77:], weighted.embeds[:, 77:])


def test_long_prompts_take_more_clip_chunks_before_t5(sd3):
    long_prompt = ", ".join([PROMPT] * 14)
    short, long = sd3.model.encode_texts([PROMPT, long_prompt])
    assert short.embeds.shape == long.embeds.shape == (1, 2 * 77 + 256, 96)


# --- generation against diffusers --------------------------------------------------------


@pytest.mark.parametrize(("negative", "width", "height", "with_t5"), [
    ("", 32, 32, True), ("blue", 48, 32, True), ("blue", 32, 32, False),
])
def test_txt2img_matches_diffusers_sd3_pipeline(sd3, sd3_no_t5, sd3_path, negative, width, height, with_t5):
    pipe = sd3 if with_t5 else sd3_no_t5
    result = pipe.txt2img(PROMPT, negative, sampler="Euler", steps=3, cfg_scale=5.0, seed=7, width=width, height=height)
    ref = reference(sd3_path, with_t5=with_t5)
    expected = ref(PROMPT, negative_prompt=negative, num_inference_steps=3, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(7), width=width, height=height, output_type="np").images[0]
    ours = as_array(result.image)
    assert ours.shape == (height, width, 3)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert ours.std() > 0.01


def test_a_per_job_shift_matches_diffusers_with_that_shift_and_is_recorded(sd3, sd3_path, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from aipaint.cli.main import main
    from aipaint.errors import InvalidParameter

    kw = dict(sampler="Euler", steps=3, cfg_scale=5.0, seed=7, width=32, height=32)
    shifted = sd3.txt2img(PROMPT, options={"sd3": {"shift": 1.0}}, **kw)
    ref = reference(sd3_path, fresh=True)
    ref.scheduler = FlowMatchEulerDiscreteScheduler.from_config(ref.scheduler.config, shift=1.0)
    expected = ref(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                   width=32, height=32, output_type="np").images[0]
    ours = as_array(shifted.image)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    plain = sd3.txt2img(PROMPT, **kw)
    assert np.abs(ours - as_array(plain.image)).mean() > 1e-3  # the model's own shift is 3
    assert "Shift: 1," in shifted.parameters and "Shift" not in plain.parameters
    with pytest.raises(InvalidParameter, match="sd3.shift"):
        sd3.txt2img(PROMPT, options={"sd3": {"shift": 0}}, **kw)
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    shifted.save(first)
    assert main(["generate", "--from-png", str(first), "-m", str(sd3_path), "-o", str(again)]) == 0
    with Image.open(again) as rerun:
        assert np.array_equal(np.asarray(rerun.convert("RGB")), np.asarray(shifted.image.convert("RGB")))


def test_dpm_2m_flow_form_matches_diffusers_with_flow_sigmas(sd3, sd3_path):
    from diffusers import DPMSolverMultistepScheduler

    result = sd3.txt2img(PROMPT, sampler="DPM++ 2M", steps=4, cfg_scale=4.5, seed=5, width=32, height=32)
    ref = reference(sd3_path, fresh=True)
    ref.scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction")
    expected = ref(PROMPT, num_inference_steps=4, guidance_scale=4.5, generator=torch.Generator().manual_seed(5),
                   width=32, height=32, output_type="np").images[0]
    assert np.abs(as_array(result.image) - quantised(expected)).mean() < 1e-3


def test_every_flow_sampler_runs_and_is_recorded(sd3):
    euler = as_array(sd3.txt2img(PROMPT, sampler="Euler", steps=4, seed=1, width=32, height=32).image)
    for sampler in ("Heun", "UniPC", "LCM", "DPM++ 2M SDE"):
        result = sd3.txt2img(PROMPT, sampler=sampler, steps=4, seed=1, width=32, height=32)
        image = as_array(result.image)
        assert image.std() > 0.01 and np.abs(image - euler).max() > 0, sampler
        assert f"Sampler: {sampler}," in result.parameters


def test_prompt_syntax_and_a1111_parameters(sd3):
    from aipaint.infotext import Infotext

    plain = sd3.txt2img(PROMPT, sampler="Euler", steps=2, seed=3, width=32, height=32)
    edited = sd3.txt2img("a big [red:blue:0.5] circle", sampler="Euler", steps=2, seed=3, width=32, height=32)
    assert np.abs(as_array(plain.image) - as_array(edited.image)).max() > 0
    params = Infotext.from_text(plain.parameters).params
    assert (params["Sampler"], params["Steps"], params["Size"], params["Seed"]) == ("Euler", "2", "32x32", "3")
    assert params["CFG scale"] == "5"  # the family's default
    assert params["Model"] == "sd3"


def test_batches_and_prompts_and_previews_and_hires_run_through_the_loop(sd3):
    from aipaint.engine.postprocessing import run_postprocessors

    previews = []
    result = sd3.txt2img("a red circle AND a blue square:0.5", batch_size=2, sampler="Euler", steps=2, seed=3,
                         width=32, height=32, preview=previews.append)
    first, second = (as_array(image) for image in result.images)
    assert np.abs(first - second).mean() > 0.01  # seeds 3 and 4
    assert [p.step for p in previews] == [1, 2]
    assert previews[-1].x0.shape == (2, 16, 16, 16)
    hires = run_postprocessors(result.images[0], ["hires:scale=2,upscaler=Latent,hires_steps=2,denoising_strength=0.5,steps=2,prompt=a red circle"], sd3)
    assert hires.image.size == (64, 64)


def test_img2img_matches_diffusers_sd3_img2img_pipeline(sd3, sd3_path):
    from aipaint.engine.modes import to_tensor

    image = noise_picture()
    # 5 steps at 0.6: diffusers' int(steps - steps * strength) and aipaint's (A1111's)
    # steps - int(steps * strength) agree when steps * strength is whole.
    ours = sd3.img2img(image, PROMPT, denoising_strength=0.6, steps=5, sampler="Euler", seed=3, cfg_scale=5.0,
                       width=32, height=32)
    with torch.inference_mode():
        latents = sd3.model.encode(to_tensor(image))  # the posterior's mean; diffusers would sample it
    expected = reference(sd3_path, "Img2Img")(PROMPT, image=latents, strength=0.6, num_inference_steps=5, guidance_scale=5.0,
                                              generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    assert np.abs(as_array(ours.image) - quantised(expected)).mean() < 1e-3
    assert np.abs(as_array(ours.image) - as_array(image)).mean() > 0.01


def test_vae_latents_are_shifted_and_scaled(sd3):
    from aipaint.engine.modes import to_tensor

    model = sd3.model
    pixels = to_tensor(noise_picture())
    with torch.inference_mode():
        z = model.vae.encode(pixels * 2 - 1).latent_dist.mode()
        torch.testing.assert_close(model.encode(pixels), (z - 0.0609) * 1.5305)
        decoded = model.vae.decode(z).sample
        torch.testing.assert_close(model.decode((z - 0.0609) * 1.5305), (decoded / 2 + 0.5).clamp(0, 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_matches_diffusers_sd3_inpaint_pipeline(sd3, sd3_path, strength):
    """The denoised latents equal diffusers' (latent blending for 16-channel models). Pixels are
    not compared: diffusers 0.42's SD 3 inpaint pipeline decodes without adding the VAE's
    shift_factor back (its txt2img and img2img pipelines add it), so its images are off by that."""
    from PIL import Image

    from aipaint.engine.modes import to_tensor

    image = noise_picture(seed=1)
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    ours = sd3.inpaint(image, mask, PROMPT, denoising_strength=strength, mask_blur=0, steps=5, sampler="Euler", seed=2,
                       cfg_scale=5.0, width=32, height=32)
    with torch.inference_mode():
        latents = sd3.model.encode(to_tensor(image))
    expected = reference(sd3_path, "Inpaint")(
        # masked_image_latents: only 33-channel (inpainting) MMDiTs read it, but the pipeline builds it either way
        PROMPT, image=latents, mask_image=mask, masked_image_latents=latents, height=32, width=32, strength=strength,
        num_inference_steps=5,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(2), output_type="latent",
    ).images
    torch.testing.assert_close(ours.latents, expected, atol=1e-4, rtol=1e-4)
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[4:12, 4:12] = False
    torch.testing.assert_close(ours.latents[..., outside], latents[..., outside])  # blended back to the input
    assert float((ours.latents - latents)[..., ~outside].abs().mean()) > 0.05
    ours_a, original = as_array(ours.image), as_array(image)
    inside = np.asarray(mask) > 0
    np.testing.assert_array_equal(ours_a[~inside], original[~inside])
    assert np.abs(ours_a[inside] - original[inside]).mean() > 0.01


# --- LoRA ----------------------------------------------------------------------------------
LORA_MODULES = {  # (out, in) of Linear layers in the tiny MMDiT: image and text streams, MLP
    "transformer_blocks.0.attn.to_q": (32, 32),
    "transformer_blocks.0.attn.add_k_proj": (32, 32),
    "transformer_blocks.0.ff.net.0.proj": (128, 32),
}


def _lora_pairs(rank: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return {m: (torch.randn(rank, i, generator=generator) * 0.5, torch.randn(o, rank, generator=generator) * 0.5)
            for m, (o, i) in LORA_MODULES.items()}


# SD 3's original (Stability) names of fused layers, as sd-scripts writes them, and the tiny MMDiT's modules in them.
STABILITY_FUSED = {
    "joint_blocks_0_x_block_attn_qkv": ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
                                        "transformer_blocks.0.attn.to_v"),
    "joint_blocks_0_x_block_mlp_fc1": ("transformer_blocks.0.ff.net.0.proj",),
}


@pytest.mark.parametrize("form", ["peft", "kohya", "diffusers", "stability"])
def test_lora_matches_diffusers_load_lora_weights(sd3, sd3_path, tmp_path, form):
    """PEFT keys named as the MMDiT's modules (the bare form trainers publish), diffusers' own
    ``transformer.``-prefixed form, kohya keys (``lora_unet_<module path>``) and sd-scripts' keys in
    Stability's names (``lora_unet_joint_blocks_0_x_block_attn_qkv``: q, k, v fused, one down matrix)
    patch the MMDiT exactly as diffusers' SD 3 LoRA loader does, and are undone after the job."""
    import warnings

    from aipaint_plugins.lora.api import UnmatchedLoraKeys
    from safetensors.torch import save_file

    pairs = _lora_pairs()
    ours_file, theirs_file = {}, {}
    if form == "stability":
        generator = torch.Generator().manual_seed(3)
        shapes = {n: p.shape for n, p in sd3.model.transformer.named_parameters()}
        pairs = {}
        for fused, modules in STABILITY_FUSED.items():
            down = torch.randn(2, shapes[modules[0] + ".weight"][1], generator=generator) * 0.5
            ups = [torch.randn(shapes[m + ".weight"][0], 2, generator=generator) * 0.5 for m in modules]
            pairs |= {m: (down, up) for m, up in zip(modules, ups, strict=True)}
            ours_file |= {f"lora_unet_{fused}.lora_down.weight": down.clone(),
                          f"lora_unet_{fused}.lora_up.weight": torch.cat(ups), f"lora_unet_{fused}.alpha": torch.tensor(2.0)}
    for module, (down, up) in pairs.items():
        theirs_file[f"transformer.{module}.lora_A.weight"], theirs_file[f"transformer.{module}.lora_B.weight"] = down.clone(), up
        if form == "kohya":
            key = "lora_unet_" + module.replace(".", "_")
            ours_file.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
        elif form == "peft":
            ours_file.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
    if form == "diffusers":
        ours_file = dict(theirs_file)
    (tmp_path / "ours").mkdir()
    save_file(ours_file, str(tmp_path / "ours" / "style.safetensors"))
    save_file(theirs_file, str(tmp_path / "theirs.safetensors"))
    before = {k: v.clone() for k, v in sd3.model.transformer.state_dict().items()}
    kwargs = dict(sampler="Euler", steps=3, seed=4, width=32, height=32, cfg_scale=5.0,
                  options={"lora": {"folder": str(tmp_path / "ours")}})
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedLoraKeys)  # every key must land somewhere
        styled = as_array(sd3.txt2img(PROMPT + " <lora:style:1>", **kwargs).image)
    plain = as_array(sd3.txt2img(PROMPT, **kwargs).image)
    ref = reference(sd3_path, fresh=True)
    ref.load_lora_weights(str(tmp_path / "theirs.safetensors"))
    expected = ref(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(4),
                   width=32, height=32, output_type="np").images[0]
    assert np.abs(styled - quantised(expected)).mean() < 1e-3
    assert np.abs(styled - plain).mean() > 1e-3
    after = sd3.model.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_kohya_text_encoder_keys_patch_clip_l_and_clip_g(sd3, tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(1)
    weights = {}
    for prefix, width in (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32),
                          ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 48)):
        weights.update({f"{prefix}.lora_down.weight": torch.randn(2, width, generator=generator),
                        f"{prefix}.lora_up.weight": torch.randn(width, 2, generator=generator),
                        f"{prefix}.alpha": torch.tensor(2.0)})
    save_file(weights, str(tmp_path / "te.safetensors"))
    kwargs = dict(sampler="Euler", steps=2, seed=4, width=32, height=32, options={"lora": {"folder": str(tmp_path)}})
    plain = as_array(sd3.txt2img(PROMPT, **kwargs).image)
    styled = as_array(sd3.txt2img(PROMPT + " <lora:te:1>", **kwargs).image)
    assert np.abs(styled - plain).mean() > 1e-4
    np.testing.assert_array_equal(as_array(sd3.txt2img(PROMPT, **kwargs).image), plain)  # undone


def test_base_model_names_of_model_sites_mean_sd3():
    from aipaint.sources.cards import family_of_base_model

    for name in ("SD 3", "SD 3.5", "SD 3.5 Large", "SD 3.5 Large Turbo", "SD 3.5 Medium",
                 "stabilityai/stable-diffusion-3.5-large", "stabilityai/stable-diffusion-3-medium-diffusers"):
        assert family_of_base_model(name) == "sd3", name
    assert family_of_base_model("SDXL 1.0") == "sdxl" and family_of_base_model("SD 1.5") == "sd15"


def test_load_options_are_checked(sd3_path, plugin_host):
    from aipaint.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="t5"):
        aipaint.load(sd3_path, host=plugin_host, t5="no")
    with pytest.raises(InvalidParameter, match="text_encoder_device"):
        aipaint.load(sd3_path, host=plugin_host, text_encoder_device=3)


# --- what SD 3 does not take ----------------------------------------------------------------


def test_unet_features_are_refused_with_a_clear_error(sd3):
    from aipaint.errors import UnsupportedFeature

    model = sd3.model
    x = torch.zeros(1, 16, 4, 4)
    (cond,) = model.encode_texts([PROMPT])
    with pytest.raises(UnsupportedFeature, match="MMDiT"):
        model.predict(x, torch.tensor(500.0), cond, down_block_additional_residuals=[x])
    assert "adapters" in model.capabilities and "refiner" not in model.capabilities  # adapters: SD 3 ControlNets


def test_unknown_sampler_forms_are_refused(sd3):
    from aipaint.errors import AipaintError

    with pytest.raises(AipaintError, match="flow"):
        sd3.txt2img(PROMPT, sampler="DPM2", steps=2, width=32, height=32)


# --- zoo -----------------------------------------------------------------------------------


CONFIGS = {"sd3-medium": 24, "sd3.5-large": 38, "sd3.5-medium": 24}  # joint blocks


def millions(module) -> float:
    # parameters and buffers: the MMDiT's position table is a persistent buffer, counted in the
    # published sizes and held in memory
    return (sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())) / 1e6


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_offline_configs_build_the_published_mmdits(name):
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    from aipaint.models.zoo import zoo_root

    folder = zoo_root() / "configs" / name
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 3.0
    with init_empty_weights(include_buffers=True):  # the 384² position table would be computed otherwise
        mmdit = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder / "transformer"))
    assert mmdit.config.num_layers == CONFIGS[name]
    assert mmdit.config.pooled_projection_dim == 768 + 1280 and mmdit.config.joint_attention_dim == 4096
    # Published sizes: SD 3 Medium "2B", SD 3.5 Large "8.1B", SD 3.5 Medium "2.5B" parameters.
    published = {"sd3-medium": 2000, "sd3.5-large": 8100, "sd3.5-medium": 2500}[name]
    assert millions(mmdit) == pytest.approx(published, rel=0.05)


def test_offline_configs_share_the_published_text_encoders_and_vae():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from aipaint.models.zoo import zoo_root

    folders = [zoo_root() / "configs" / name for name in sorted(CONFIGS)]
    for part in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        texts = {(folder / part / "config.json").read_text() for folder in folders}
        assert len(texts) == 1, part  # the three models share them
    folder = folders[0]
    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        clip_l = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        t5 = T5EncoderModel(T5Config.from_pretrained(folder / "text_encoder_3"))
    t5.tie_weights()  # T5's input embedding is its shared table (tied when built outside init_empty_weights)
    assert vae.config.latent_channels == 16
    assert vae.config.shift_factor == pytest.approx(0.0609) and vae.config.scaling_factor == pytest.approx(1.5305)
    assert (clip_l.config.projection_dim, clip_g.config.projection_dim, t5.config.d_model) == (768, 1280, 4096)
    # Published: T5-XXL's encoder 4.7B; CLIP-L 124M, OpenCLIP bigG's text tower 695M; the VAE 84M.
    assert millions(t5) == pytest.approx(4700, rel=0.02)
    assert millions(clip_l) == pytest.approx(124, rel=0.01) and millions(clip_g) == pytest.approx(695, rel=0.01)
    assert millions(vae) == pytest.approx(84, rel=0.01)


@pytest.mark.parametrize("card_id", ["sd3-medium", "sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"])
def test_zoo_cards(card_id):
    from aipaint.models import zoo

    card = zoo.get(card_id)
    assert card.family == "sd3" and card.source["kind"] == "hub"
    assert card.source["repo"].startswith("stabilityai/stable-diffusion-3")
    assert card.defaults["width"] == card.defaults["height"] == 1024
    if "file" in card.source:  # a single file: read offline with the shipped config
        assert card.config_path is not None and (card.config_path / "model_index.json").is_file()


def test_a_tiny_preview_decoder_reads_latents_with_its_configs_shift():
    """TAESD3 and TAEF1 carry the full VAE's scaling and shift factors: a preview hands them
    ``x0 / scale + shift``, as SD 3's and FLUX's own decode does (TAESD for SD 1.x has neither)."""
    from types import SimpleNamespace

    from aipaint.engine.preview import StepPreview

    seen = []

    class Decoder:
        device, dtype = torch.device("cpu"), torch.float32

        def __init__(self, **config):
            self.config = SimpleNamespace(**config)

        def decode(self, latents, return_dict=False):
            seen.append(latents.clone())
            return (torch.zeros(1, 3, 8, 8),)

    x0 = torch.full((1, 16, 4, 4), 3.0)
    step = StepPreview(1, 1, x0, x0, SimpleNamespace(scaling_factor=1.5))
    step.image(decoder=Decoder(scaling_factor=1.5, shift_factor=0.25))
    step.image(decoder=Decoder(scaling_factor=1.0))
    assert torch.allclose(seen[0], torch.full_like(x0, 3.0 / 1.5 + 0.25))
    assert torch.allclose(seen[1], x0)


# --- ControlNet (diffusers' SD3ControlNetModel) ---------------------------------------------


def build_tiny_sd3_controlnet(seed: int = 3, **overrides):
    """A ControlNet in the tiny MMDiT's shapes; diffusers zero-initialises its input and output
    projections, so they are drawn at random here for the control to show."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    config = dict(sample_size=32, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8, num_attention_heads=4,
                  caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64, out_channels=16)
    controlnet = SD3ControlNetModel(**{**config, **overrides})
    with torch.no_grad():
        for p in controlnet.parameters():
            if not p.abs().max():
                p.normal_(0.0, 0.3)
    return controlnet.eval()


@pytest.fixture(scope="module")
def sd3_two_blocks_path(tmp_path_factory) -> Path:
    """The tiny SD 3 with two joint blocks: the MMDiT adds ControlNet outputs to every block but
    the last (which updates no text tokens), so the one-block model would show no control."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    components = build_tiny_sd3_components(0)
    torch.manual_seed(2)
    components["transformer"] = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=96, pooled_projection_dim=64, out_channels=16,
    ).eval()
    root = tmp_path_factory.mktemp("tiny-sd3-two-blocks") / "sd3"
    StableDiffusion3Pipeline(**components).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def sd3_two_blocks(sd3_two_blocks_path, plugin_host):
    return aipaint.load(sd3_two_blocks_path, host=plugin_host)


@pytest.fixture(scope="module")
def sd3_controlnets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd3-controlnets")
    paths = {}
    for name, overrides in {"instantx": {}, "shifted": {"force_zeros_for_pooled_projection": False},
                            "wide": {"joint_attention_dim": 64},
                            # configured as Stability's SD 3.5 ControlNets: no position embedding of its own (it
                            # takes the MMDiT's), no text input (single-stream blocks), the prompt's pooled projection
                            "sd35": {"use_pos_embed": False, "force_zeros_for_pooled_projection": False,
                                     "joint_attention_dim": None, "pos_embed_type": None}}.items():
        build_tiny_sd3_controlnet(**overrides).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def sd3_control_unit(path: Path, **options):
    from aipaint.plugin.adapters import AdapterUnit

    return AdapterUnit("controlnet", {"model": path, "image": noise_picture(32, seed=5), **options})


@pytest.fixture
def mean_vae_posterior(monkeypatch):
    """diffusers' ControlNet pipelines sample the control image's VAE posterior; aipaint takes its
    mean (deterministic): make diffusers take the mean too, for a like-for-like comparison."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())


@pytest.mark.parametrize("kind", ["instantx", "shifted", "sd35"])
def test_controlnet_matches_diffusers_sd3_controlnet_pipeline(sd3_two_blocks, sd3_two_blocks_path, sd3_controlnets,
                                                              mean_vae_posterior, kind):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    kw = dict(sampler="Euler", steps=3, cfg_scale=5.0, seed=7, width=32, height=32)
    result = sd3_two_blocks.txt2img(PROMPT, "blue", adapters=(sd3_control_unit(sd3_controlnets[kind], weight=0.8),), **kw)
    controlnet = SD3ControlNetModel.from_pretrained(sd3_controlnets[kind])
    if kind == "sd35":
        assert controlnet.pos_embed is None and controlnet.context_embedder is None
    ref = StableDiffusion3ControlNetPipeline.from_pretrained(sd3_two_blocks_path, controlnet=controlnet, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    expected = ref(PROMPT, negative_prompt="blue", control_image=noise_picture(32, seed=5), controlnet_conditioning_scale=0.8,
                   num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(7), width=32,
                   height=32, output_type="np").images[0]
    ours = as_array(result.image)
    plain = as_array(sd3_two_blocks.txt2img(PROMPT, "blue", **kw).image)
    assert np.abs(ours - quantised(expected)).mean() < 1e-3
    assert np.abs(ours - plain).mean() > 0.01  # the control changed the picture
    assert "ControlNet 0: " in result.parameters and "Weight: 0.8" in result.parameters


def test_controlnet_at_weight_zero_or_outside_its_window_is_plain_generation(sd3_two_blocks, sd3_controlnets):
    kw = dict(sampler="Euler", steps=3, cfg_scale=5.0, seed=4, width=32, height=32)
    plain = as_array(sd3_two_blocks.txt2img(PROMPT, **kw).image)
    for options in ({"weight": 0.0}, {"guidance_start": 1.0}):
        unit = sd3_control_unit(sd3_controlnets["instantx"], **options)
        np.testing.assert_array_equal(as_array(sd3_two_blocks.txt2img(PROMPT, adapters=(unit,), **kw).image), plain)
    # Two units add up: the same one twice at half weight is the unit at full weight.
    half = sd3_control_unit(sd3_controlnets["instantx"], weight=0.5)
    full = sd3_control_unit(sd3_controlnets["instantx"], weight=1.0)
    twice = as_array(sd3_two_blocks.txt2img(PROMPT, adapters=(half, half), **kw).image)
    once = as_array(sd3_two_blocks.txt2img(PROMPT, adapters=(full,), **kw).image)
    assert np.abs(twice - once).mean() < 2e-3 < np.abs(once - plain).mean()


def test_controlnets_that_do_not_fit_are_refused_with_a_clear_error(sd3, sd3_controlnets, tiny_sd_path, plugin_host):
    from aipaint.errors import ModelLoadError, UnsupportedFeature

    kw = dict(steps=2, width=32, height=32)
    with pytest.raises(ModelLoadError, match="text width 64 vs 96"):
        sd3.txt2img(PROMPT, adapters=(sd3_control_unit(sd3_controlnets["wide"]),), **kw)
    with pytest.raises(ModelLoadError, match="not an SD 3 ControlNet"):  # a UNet ControlNet from the zoo
        sd3.txt2img(PROMPT, adapters=(sd3_control_unit("shapes-tiny-controlnet-layout"),), **kw)
    with pytest.raises(UnsupportedFeature, match="Balanced"):
        sd3.txt2img(PROMPT, adapters=(sd3_control_unit(sd3_controlnets["instantx"], control_mode="prompt"),), **kw)
    sd15 = aipaint.load(tiny_sd_path, host=plugin_host)
    with pytest.raises(UnsupportedFeature, match="SD3ControlNetModel.*UNet ControlNets"):
        sd15.txt2img(PROMPT, adapters=(sd3_control_unit(sd3_controlnets["instantx"]),), **kw)


@pytest.mark.parametrize("name", ["deepcache", "tome", "reference"])
def test_unet_adapters_still_refuse_the_mmdit(sd3, name):
    from aipaint.errors import UnsupportedFeature
    from aipaint.plugin.adapters import AdapterUnit

    options = {"image": noise_picture()} if name == "reference" else {}
    with pytest.raises(UnsupportedFeature, match="UNet2DConditionModel"):
        sd3.txt2img(PROMPT, steps=2, width=32, height=32, adapters=(AdapterUnit(name, options),))


@pytest.mark.parametrize("view", ["denoise", "attention", "samplers", "cfg"])
def test_explain_views_refuse_a_flow_matching_model_clearly(sd3, view):
    from aipaint import explain
    from aipaint.errors import UnsupportedFeature

    with pytest.raises(UnsupportedFeature, match="flow-matching"):
        getattr(explain, view)(sd3, PROMPT, steps=2, seed=1, width=32, height=32)
