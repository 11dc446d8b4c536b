"""Shared fixtures: tiny random-weight Stable Diffusion models built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The suite shares a 2-core machine; one thread keeps timings predictable.
torch.set_num_threads(int(os.environ.get("AIPAINT_TEST_THREADS", "1")))

# The tests are offline. With usage stats on, Ray Data starts a thread that polls a Prometheus server every few
# seconds and outlives the cluster; each failed poll logs a traceback, and on Python 3.11 before 3.11.8 formatting
# a traceback parses source with `ast`, which races with any `ast.parse` in the main thread (CPython gh-106905:
# "SystemError: AST constructor recursion depth mismatch"). Ray workers inherit the setting.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_tiny_sd_components(seed: int = 0, *, in_channels: int = 4, prediction_type: str = "epsilon") -> dict:
    """diffusers' test-sized SD1.5 components with the real CLIP tokenizer."""
    from aipaint_plugins.shapes_world.clip_tokenizer import build_clip_tokenizer
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=3,
            vocab_size=49408,
            max_position_embeddings=77,
        )
    )
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": build_clip_tokenizer(),
        "scheduler": scheduler,
    }


def save_tiny_sd(folder: Path, **kwargs) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**build_tiny_sd_components(**kwargs), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd")


@pytest.fixture(scope="session")
def plugin_host():
    from aipaint.plugin.host import create_plugin_host

    return create_plugin_host()


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd_path, plugin_host):
    import aipaint

    return aipaint.load(tiny_sd_path, host=plugin_host)


@pytest.fixture
def offline(monkeypatch):
    """No network at all: any attempt to connect fails the test loudly."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
