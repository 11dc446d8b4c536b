"""Tiny autoencoders (plugins/taesd): the final decode and the previews through a tiny random
AutoencoderTiny, equal to diffusers' pipeline with the same tiny VAE; restored after the job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aipaint.errors import InvalidParameter, ModelLoadError

GEN = dict(seed=11, steps=3, width=32, height=32, cfg_scale=5.0)


def build_tiny_autoencoder(latent_channels: int = 4):
    """A random AutoencoderTiny that up-samples by 2, as the tiny SD fixture's VAE does."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(3)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1),
                           latent_channels=latent_channels).eval()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("taesd") / "taesd-tiny"
    build_tiny_autoencoder().save_pretrained(folder, safe_serialization=True)
    return folder


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])


def test_final_decode_matches_diffusers_pipeline_with_the_tiny_vae(tiny_pipe, tiny_sd_path, tiny_folder):
    from diffusers import AutoencoderTiny, StableDiffusionPipeline

    ours = tiny_pipe.txt2img("a red circle", "blue", batch_size=2, **GEN,
                             options={"vae_decoder": {"kind": "taesd", "path": str(tiny_folder)}})
    full = tiny_pipe.txt2img("a red circle", "blue", batch_size=2, **GEN)
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_path, vae=AutoencoderTiny.from_pretrained(tiny_folder),
                                                  safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    theirs = ref("a red circle", negative_prompt="blue", num_inference_steps=3, guidance_scale=5.0, height=32, width=32,
                 generator=[torch.Generator().manual_seed(s) for s in (11, 12)], num_images_per_prompt=2).images
    gap = np.abs(as_array(ours.images) - as_array(theirs)).mean()
    assert gap < 1e-3
    assert np.abs(as_array(ours.images) - as_array(full.images)).mean() > 20 * max(gap, 1e-4)  # not the full VAE
    assert "Tiny VAE decoder: taesd (taesd-tiny)" in ours.infotexts[0]
    assert np.array_equal(as_array(full.images), as_array(tiny_pipe.txt2img("a red circle", "blue", batch_size=2,
                                                                            **GEN).images))  # restored


def test_the_model_is_restored_after_the_job_and_after_an_error(tiny_pipe, tiny_folder, tmp_path):
    model = tiny_pipe.model
    call = model.vae_decode_call
    tiny_pipe.txt2img("a red circle", **GEN, options={"vae_decoder": {"path": str(tiny_folder)}})
    assert model.vae_decode_call == call and getattr(model, "preview_decoder", None) is None
    wide = tmp_path / "taesd3-like"
    build_tiny_autoencoder(16).save_pretrained(wide, safe_serialization=True)
    with pytest.raises(InvalidParameter, match="16-channel"):
        tiny_pipe.txt2img("a red circle", **GEN, options={"vae_decoder": {"kind": "taesd3", "path": str(wide)}})
    with pytest.raises(ModelLoadError, match="a taesd has 4"):
        tiny_pipe.txt2img("a red circle", **GEN, options={"vae_decoder": {"kind": "taesd", "path": str(wide)}})
    # "custom" takes any channel count the model's latent has, and no other
    with pytest.raises(InvalidParameter, match="16-channel"):
        tiny_pipe.txt2img("a red circle", **GEN, options={"vae_decoder": {"kind": "custom", "path": str(wide)}})
    custom = tiny_pipe.txt2img("a red circle", **GEN, options={"vae_decoder": {"kind": "custom", "path": str(tiny_folder)}})
    assert "Tiny VAE decoder: custom (" in custom.parameters
    assert model.vae_decode_call == call and getattr(model, "preview_decoder", None) is None


def test_auto_previews_use_the_tiny_decoder(tiny_pipe, tiny_folder):
    from aipaint_plugins.taesd import load_tiny_autoencoder

    tiny = load_tiny_autoencoder(tiny_folder)
    seen = []

    def preview(step):
        model = step.model
        with torch.inference_mode():  # the model's own VAE, bypassing the job's swapped decode call
            full = (model._torch_vae_decode(step.x0[:1] / model.scaling_factor).float() / 2 + 0.5).clamp(0, 1)
        full = (full[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        seen.append((np.asarray(step.image()), np.asarray(step.image(decoder=tiny)), full))

    tiny_pipe.txt2img("a red circle", **GEN, options={"vae_decoder": {"path": str(tiny_folder)}}, preview=preview)
    assert len(seen) == GEN["steps"]
    for auto, with_tiny, full in seen:
        assert np.array_equal(auto, with_tiny)
        assert np.abs(auto.astype(int) - full.astype(int)).mean() > 1


def test_a_folder_without_safetensors_is_refused(tiny_pipe, tmp_path):
    folder = tmp_path / "pickled"
    build_tiny_autoencoder().save_pretrained(folder, safe_serialization=False)
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors"):
        tiny_pipe.txt2img("a red circle", **GEN, options={"vae_decoder": {"path": str(folder)}})


@pytest.mark.parametrize(("text", "expected"), [
    ("taesdxl:/m/taesdxl", {"kind": "taesdxl", "path": "/m/taesdxl"}),
    ("/m/taesd", {"kind": "taesd", "path": "/m/taesd"}),
    ("C:/m/taesd", {"kind": "taesd", "path": "C:/m/taesd"}),
])
def test_cli_argument(text, expected):
    from aipaint_plugins.taesd import parse_decoder_argument

    assert parse_decoder_argument(text) == expected


def test_cli_argument_with_an_unknown_kind_is_refused():
    from aipaint_plugins.taesd import parse_decoder_argument

    with pytest.raises(InvalidParameter, match="--vae-decoder"):
        parse_decoder_argument("taesdx:/m/x")


def test_cli_decodes_with_the_tiny_autoencoder(tiny_sd_path, tiny_folder, tmp_path):
    from aipaint.cli.main import main as cli_main
    from aipaint.infotext import read_png_parameters

    out = tmp_path / "tiny.png"
    assert cli_main(["generate", "a red circle", "--vae-decoder", f"taesd:{tiny_folder}", "--steps", "3", "-W", "32",
                     "-H", "32", "--seed", "1", "-o", str(out), "-m", str(tiny_sd_path), "--no-progress"]) == 0
    assert "Tiny VAE decoder: taesd (taesd-tiny)" in read_png_parameters(out)
