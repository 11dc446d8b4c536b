"""Single-file SD1.x checkpoints as shared on model sites (original LDM key layout).

No real checkpoint can be downloaded here, so the tiny test model is written in the
original layout by tests/ldm_checkpoint.py and loaded back through ``aipaint.load``
offline; the shipped full-size config (zoo/configs/sd15) is checked on the ``meta``
device, where a 4 GB model costs no memory.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_checkpoint import (
    CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_to_ldm,
    save_ldm_checkpoint,
    to_ldm_state_dict,
    unet_to_ldm,
    vae_to_ldm,
)

import aipaint
from aipaint.errors import ModelLoadError, UnsafeFileError
from aipaint.models.family import ModelSource
from aipaint.models.loading import identify_family, resolve_source

ZOO_SD15 = Path(aipaint.__file__).resolve().parent.parent / "zoo" / "configs" / "sd15"
PROMPT = "a big red circle on the left, on a white background"


class Exploit:
    """Runs code when unpickled by a plain ``pickle.load`` / ``torch.load(weights_only=False)``."""

    def __reduce__(self):
        return (print, ("pwned",))


@pytest.fixture(scope="module")
def ldm_state(tiny_pipe) -> dict[str, torch.Tensor]:
    model = tiny_pipe.model
    return to_ldm_state_dict(model.unet, model.vae, model.text_encoder)


@pytest.fixture(scope="module")
def ldm_safetensors(ldm_state, tmp_path_factory) -> Path:
    return save_ldm_checkpoint(ldm_state, tmp_path_factory.mktemp("ldm") / "tiny-sd15.safetensors")


@pytest.fixture(scope="module")
def ldm_ckpt(ldm_state, tmp_path_factory) -> Path:
    return save_ldm_checkpoint(ldm_state, tmp_path_factory.mktemp("ldm-ckpt") / "tiny-sd15.ckpt")


@pytest.fixture(scope="module")
def tiny_config(tiny_sd_path, tmp_path_factory) -> Path:
    """The tiny model's folder without its weights: with them, diffusers could fill in from the
    folder whatever it failed to read from the file, and the round-trip tests would not notice."""
    import shutil

    target = tmp_path_factory.mktemp("config") / "tiny-sd15-config"
    return Path(shutil.copytree(tiny_sd_path, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")))


@pytest.fixture(scope="module")
def file_pipe(ldm_safetensors, tiny_config, plugin_host):
    return aipaint.load(ldm_safetensors, config=tiny_config, host=plugin_host)


def assert_same_weights(loaded, original) -> None:
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(loaded, name).state_dict(), getattr(original, name).state_dict()
        assert set(got) == set(want), f"{name}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
        different = [key for key in want if not torch.equal(got[key], want[key])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"


def save_keys(path: Path, keys) -> Path:
    from safetensors.torch import save_file

    save_file({key: torch.zeros(1) for key in keys}, str(path))
    return path


# --- (1) a .safetensors file in the LDM layout ------------------------------------------------


def test_the_file_really_is_in_the_original_layout(ldm_state):
    prefixes = {key.split(".")[0] for key in ldm_state}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model", *_schedule_buffers()}
    assert not any(".down_blocks." in key or ".resnets." in key or "mid_block" in key for key in ldm_state)
    for key in ("input_blocks.0.0.weight", "input_blocks.2.0.op.weight", "input_blocks.3.1.proj_in.weight",
                "middle_block.2.out_layers.3.weight", "output_blocks.1.2.conv.weight", "out.2.weight"):
        assert UNET_PREFIX + key in ldm_state, key
    assert ldm_state[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as LDM stores it
    assert VAE_PREFIX + "decoder.up.1.upsample.conv.weight" in ldm_state  # levels counted high -> low res
    assert CLIP_PREFIX + "text_model.embeddings.position_ids" in ldm_state


def _schedule_buffers():
    return {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"}


def test_safetensors_is_identified_as_sd15_and_every_tensor_round_trips(
    offline, ldm_safetensors, tiny_config, tiny_pipe, plugin_host
):
    source = resolve_source(ldm_safetensors)
    assert identify_family(source, plugin_host).name == "sd15"
    pipe = aipaint.load(ldm_safetensors, config=tiny_config, host=plugin_host)  # no family=
    assert pipe.model.family == "sd15"
    assert_same_weights(pipe.model, tiny_pipe.model)


def test_a_file_missing_text_encoder_weights_is_refused_naming_them(ldm_state, tiny_config, plugin_host, tmp_path):
    """diffusers leaves a weight the file lacks empty (on ``meta``) instead of failing the load."""
    from safetensors.torch import save_file

    dropped = CLIP_PREFIX + "text_model.encoder.layers.0.mlp.fc1.weight"
    assert dropped in ldm_state
    pruned = tmp_path / "pruned.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state.items() if k != dropped}, str(pruned))
    with pytest.raises(ModelLoadError, match=r"pruned.safetensors lacks 1 weight\(s\) of the Stable Diffusion 1.x "
                                             r"text_encoder .*layers.0.mlp.fc1.weight"):
        aipaint.load(pruned, config=tiny_config, host=plugin_host)


def test_txt2img_from_the_file_equals_the_folder_model(file_pipe, tiny_pipe):
    params = dict(width=32, height=32, steps=3, seed=1234, cfg_scale=5.0)
    from_file = np.asarray(file_pipe.txt2img(PROMPT, **params).images[0])
    from_folder = np.asarray(tiny_pipe.txt2img(PROMPT, **params).images[0])
    assert from_file.std() > 0  # a real picture, not a blank
    np.testing.assert_array_equal(from_file, from_folder)


def test_model_hash_is_the_a1111_autov2_hash_of_the_file(file_pipe, ldm_safetensors, tiny_pipe):
    sha = hashlib.sha256(ldm_safetensors.read_bytes()).hexdigest()
    result = file_pipe.txt2img(PROMPT, width=32, height=32, steps=1, seed=1)
    assert f"Model hash: {sha[:10]}," in result.infotexts[0]
    assert file_pipe.model.model_hash != tiny_pipe.model.model_hash  # the file's, not the folder weights'


def test_without_config_the_shipped_sd15_config_is_used_offline(monkeypatch, ldm_safetensors, plugin_host):
    from diffusers import StableDiffusionPipeline

    seen: dict = {}

    def fake_from_single_file(cls, path, **kwargs):
        seen.update(kwargs, path=path)
        raise RuntimeError("stop here")

    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", classmethod(fake_from_single_file))
    with pytest.raises(ModelLoadError, match="tiny-sd15.safetensors.*Stable Diffusion 1.x"):
        aipaint.load(ldm_safetensors, host=plugin_host)
    assert Path(seen["config"]).resolve() == ZOO_SD15.resolve()
    assert seen["local_files_only"] is True and seen["path"] == str(ldm_safetensors)


# --- (2) the same file as a pickle (.ckpt) ----------------------------------------------------


def test_ckpt_is_refused_without_allow_pickle(ldm_ckpt, tiny_config, plugin_host):
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        aipaint.load(ldm_ckpt, config=tiny_config, host=plugin_host)
    family = plugin_host.registry.families.get("sd15")
    assert family.identify(ModelSource(ldm_ckpt, "file", "tiny")) is False  # never unpickled without opt-in


def test_ckpt_loads_with_allow_pickle_through_weights_only(
    offline, monkeypatch, ldm_ckpt, tiny_config, tiny_pipe, plugin_host
):
    calls: list[tuple[str, dict]] = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        calls.append((str(f), kwargs))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    pipe = aipaint.load(ldm_ckpt, config=tiny_config, host=plugin_host, allow_pickle=True)  # no family=
    assert pipe.model.family == "sd15"
    assert_same_weights(pipe.model, tiny_pipe.model)
    ckpt_calls = [kwargs for path, kwargs in calls if path == str(ldm_ckpt)]
    assert len(ckpt_calls) >= 2  # aipaint's identification and diffusers' loader both read it
    assert all(kwargs.get("weights_only") is True for _, kwargs in calls), calls


@pytest.mark.parametrize("family", [None, "sd15"])
def test_a_ckpt_smuggling_code_is_refused_even_with_allow_pickle(
    family, ldm_state, tmp_path, tiny_config, plugin_host, capsys
):
    """With ``family=`` identification is skipped and diffusers' loader reads the file itself."""
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {**ldm_state, "payload": Exploit()}}, evil)
    with pytest.raises(ModelLoadError, match="(?i)weights_only|unpickl"):
        aipaint.load(evil, config=tiny_config, host=plugin_host, allow_pickle=True, family=family)
    assert "pwned" not in capsys.readouterr().out


# --- (3) the shipped full-size SD1.5 config -----------------------------------------------------


@pytest.fixture(scope="module")
def sd15_on_meta():
    """The three SD1.5 models at their real sizes, without memory (parameters on ``meta``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(ZOO_SD15, subfolder="unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(ZOO_SD15, subfolder="vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(ZOO_SD15, subfolder="text_encoder"))
    return unet, vae, text_encoder


def test_zoo_sd15_model_index_names_the_sd15_classes():
    from diffusers import DiffusionPipeline

    index = DiffusionPipeline.load_config(ZOO_SD15)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["safety_checker"] == [None, None]


def test_zoo_sd15_configs_build_the_real_sd15_sizes(sd15_on_meta):
    unet, vae, text_encoder = sd15_on_meta
    # Parameter counts of the published SD1.5 weights (runwayml/stable-diffusion-v1-5).
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert sum(p.numel() for p in text_encoder.parameters()) == 123_060_480
    assert unet.config.cross_attention_dim == 768
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.in_channels == 4 and unet.config.layers_per_block == 2 and unet.config.sample_size == 64
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert vae.config.latent_channels == 4 and list(vae.config.block_out_channels) == [128, 256, 512, 512]
    config = text_encoder.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.vocab_size, config.max_position_embeddings, config.hidden_act) == (49408, 77, "quick_gelu")


def test_zoo_sd15_tokenizer_gives_the_sd15_ids():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(ZOO_SD15, subfolder="tokenizer", local_files_only=True)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408


def test_zoo_sd15_scheduler_is_the_sd15_training_schedule():
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_pretrained(ZOO_SD15, subfolder="scheduler", local_files_only=True)
    config = scheduler.config
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert config.num_train_timesteps == 1000 and config.prediction_type == "epsilon"


def test_full_size_ldm_layout_matches_real_sd15_files_and_diffusers_reads_it_back(sd15_on_meta):
    """Our converter at full size: the key names/shapes of real SD1.5 files, and diffusers'
    own (forward) converter maps them back onto exactly the models the zoo config builds."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae, text_encoder = sd15_on_meta
    ldm_unet = unet_to_ldm(unet.state_dict(), unet.config)
    ldm_vae = vae_to_ldm(vae.state_dict(), vae.config)
    ldm_clip = clip_to_ldm(text_encoder.state_dict())
    assert (len(ldm_unet), len(ldm_vae), len(ldm_clip)) == (686, 248, 197)  # as in v1-5-pruned-emaonly
    real_shapes = {  # from the published v1-5 checkpoint
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "time_embed.0.weight": (1280, 320),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in real_shapes.items():
        assert tuple(ldm_unet[key].shape) == shape, key
    assert tuple(ldm_vae["encoder.mid.attn_1.q.weight"].shape) == (512, 512, 1, 1)
    assert tuple(ldm_vae["decoder.up.0.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)
    assert tuple(ldm_clip["text_model.encoder.layers.11.mlp.fc1.weight"].shape) == (3072, 768)

    back = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm_unet.items()}, dict(unet.config))
    want = unet.state_dict()
    assert set(back) == set(want) and all(back[k].shape == want[k].shape for k in want)
    back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm_vae.items()}, dict(vae.config))
    want = vae.state_dict()
    assert set(back) == set(want) and all(back[k].shape == want[k].shape for k in want)


def test_a_file_with_the_real_sd15_key_set_is_claimed_by_sd15_only(sd15_on_meta, tmp_path, plugin_host):
    unet, vae, text_encoder = sd15_on_meta
    keys = [UNET_PREFIX + k for k in unet_to_ldm(unet.state_dict(), unet.config)]
    keys += [VAE_PREFIX + k for k in vae_to_ldm(vae.state_dict(), vae.config)]
    keys += [CLIP_PREFIX + k for k in clip_to_ldm(text_encoder.state_dict())]
    path = save_keys(tmp_path / "v1-5-like.safetensors", keys)
    assert identify_family(resolve_source(path), plugin_host).name == "sd15"


# --- (4) other checkpoints are not claimed ------------------------------------------------------

SDXL_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.positional_embedding",
    "first_stage_model.encoder.conv_in.weight",
]
SD2_KEYS = [
    "model.diffusion_model.input_blocks.0.0.weight",
    "cond_stage_model.model.token_embedding.weight",
    "cond_stage_model.model.positional_embedding",
    "first_stage_model.encoder.conv_in.weight",
]
UNKNOWN_KEYS = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "encoder.conv_in.weight"]


@pytest.mark.parametrize("keys", [SDXL_KEYS, SD2_KEYS, UNKNOWN_KEYS], ids=["sdxl", "sd2", "unknown"])
def test_other_layouts_are_not_claimed_by_sd15(keys, tmp_path, plugin_host):
    path = save_keys(tmp_path / "other.safetensors", keys)
    assert plugin_host.registry.families.get("sd15").identify(ModelSource(path, "file", "other")) is False


def test_an_sdxl_file_goes_to_the_sdxl_family(tmp_path, plugin_host):
    path = save_keys(tmp_path / "xl.safetensors", SDXL_KEYS)
    assert identify_family(resolve_source(path), plugin_host).name == "sdxl"


@pytest.mark.parametrize("keys", [SD2_KEYS, UNKNOWN_KEYS], ids=["sd2", "unknown"])
def test_unclaimed_files_give_a_clear_error(keys, tmp_path, plugin_host):
    path = save_keys(tmp_path / "mystery.safetensors", keys)
    with pytest.raises(ModelLoadError, match="no installed model family recognises .*mystery.safetensors"):
        aipaint.load(path, host=plugin_host)


def test_an_unknown_ckpt_is_not_claimed_either(tmp_path, plugin_host):
    path = tmp_path / "mystery.ckpt"
    torch.save({"state_dict": {key: torch.zeros(1) for key in SD2_KEYS}}, path)
    with pytest.raises(ModelLoadError, match="no installed model family recognises"):
        aipaint.load(path, host=plugin_host, allow_pickle=True)
