"""bf16 on the CPU in the torch runtime: which precision ``auto`` picks from the CPU's features,
the fp32/bf16 overrides, what runs in bf16 (UNet and VAE weights; timestep and sampler in float32),
and that images stay close to fp32 and say ``Precision: bf16`` in their parameters.

Speed is not tested here (the development CPUs have no bf16 units): benchmarks/cpu_runtimes.py
measures it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aipaint_plugins.torch_runtime import precision as prec
from aipaint_plugins.torch_runtime.precision import (
    CpuFeatures,
    bf16_unet_call,
    choose_precision,
    parse_precision,
)
from PIL import Image

import aipaint
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext

GEN = dict(seed=3, steps=3, width=32, height=32)
AMX = CpuFeatures(frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}), "x86_64", "AVX512")
AVX2 = CpuFeatures(frozenset({"avx2", "fma"}), "x86_64", "AVX2")


def write_cpuinfo(tmp_path, line: str):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\n{line}\n\nprocessor\t: 1\n{line}\n")
    return path


def test_cpu_features_are_read_from_cpuinfo(tmp_path, monkeypatch):
    amx = CpuFeatures.detect(write_cpuinfo(tmp_path, "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile"))
    assert amx.bf16_units == ("amx_bf16", "avx512_bf16")
    avx2 = CpuFeatures.detect(write_cpuinfo(tmp_path, "flags\t\t: fpu sse4_2 avx2 fma f16c"))
    assert avx2.bf16_units == ()
    monkeypatch.setattr(prec.platform, "machine", lambda: "aarch64")
    arm = CpuFeatures.detect(write_cpuinfo(tmp_path, "Features\t: fp asimd bf16 i8mm"))
    assert arm.bf16_units == ("bf16",)
    assert CpuFeatures.detect(tmp_path / "missing").bf16_units == ()  # no /proc (macOS, Windows): fp32


def test_precision_option_environment_and_aliases(monkeypatch):
    monkeypatch.delenv(prec.ENVIRONMENT, raising=False)
    assert parse_precision({}) == "auto"
    assert parse_precision({"precision": "BFloat16"}) == "bf16"
    assert parse_precision({"precision": "float32"}) == "fp32"
    monkeypatch.setenv(prec.ENVIRONMENT, "fp32")
    assert parse_precision({}) == "fp32"
    assert parse_precision({"precision": "bf16"}) == "bf16"  # the option wins over the environment
    with pytest.raises(InvalidParameter, match="precision.*auto, fp32, bf16"):
        parse_precision({"precision": "fp8"})
    monkeypatch.setenv(prec.ENVIRONMENT, "half")
    with pytest.raises(InvalidParameter, match=prec.ENVIRONMENT):
        parse_precision({})


def test_auto_picks_bf16_only_on_bf16_cpus_for_large_float32_unets(tiny_pipe, monkeypatch):
    model = tiny_pipe.model
    assert choose_precision("auto", model, AMX)[0] == "fp32"  # a tiny UNet: the casts would not pay
    monkeypatch.setattr(prec, "AUTO_MIN_UNET_PARAMETERS", 1000)
    chosen, reason = choose_precision("auto", model, AMX)
    assert chosen == "bf16" and "amx_bf16" in reason
    chosen, reason = choose_precision("auto", model, AVX2)
    assert chosen == "fp32" and "no bf16 units" in reason
    assert choose_precision("fp32", model, AMX)[0] == "fp32"
    assert choose_precision("bf16", model, AVX2)[0] == "bf16"  # obeyed even where it is emulated
    monkeypatch.setattr(model, "device", torch.device("cuda"))
    assert choose_precision("auto", model, AMX)[0] == "fp32"  # GPUs keep the dtype they were given
    monkeypatch.setattr(model, "dtype", torch.float16)
    assert choose_precision("auto", model, AMX)[0] == "fp16"
    with pytest.raises(InvalidParameter, match="float16"):
        choose_precision("bf16", model, AMX)
    with pytest.raises(InvalidParameter, match="fp32"):
        choose_precision("fp32", model, AMX)


def test_bad_options_are_refused(tiny_sd_path, plugin_host):
    with pytest.raises(InvalidParameter, match="precision"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"precision": "int4"})
    with pytest.raises(InvalidParameter, match="channels_last"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"precision": "bf16", "channels_last": "yes"})


@pytest.fixture(scope="module")
def bf16_pipe(tiny_sd_path, plugin_host):
    return aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"precision": "bf16"})


def grey_levels(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def test_bf16_runs_the_unet_and_vae_in_bf16_and_records_it(bf16_pipe, tiny_pipe):
    model = bf16_pipe.model
    assert model.precision == "bf16" and model.dtype == torch.float32  # latents and sampler stay float32
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.float32}
    assert model.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # oneDNN's layout, by default
    bf16 = bf16_pipe.txt2img("a red circle", **GEN)
    fp32 = tiny_pipe.txt2img("a red circle", **GEN)
    assert Infotext.from_text(bf16.infotexts[0]).params["Precision"] == "bf16"
    assert "Precision" not in Infotext.from_text(fp32.infotexts[0]).params
    difference = grey_levels(bf16.images[0], fp32.images[0])
    assert 0 < difference < 4, difference  # bf16 rounding: different bits, the same picture


def test_bf16_unet_call_keeps_the_timestep_in_float32_and_returns_float32(bf16_pipe):
    seen = {}

    def spy(latents, t, embeds, **kwargs):
        seen.update(latents=latents.dtype, t=t.dtype, embeds=embeds.dtype,
                    residual=kwargs["down_block_additional_residuals"][0].dtype,
                    added=kwargs["added_cond_kwargs"]["time_ids"].dtype)
        return latents

    call = bf16_unet_call(spy)
    out = call(torch.zeros(1, 4, 4, 4), torch.tensor([999.0]), torch.zeros(1, 77, 32),
               down_block_additional_residuals=(torch.zeros(1, 4, 4, 4),),
               added_cond_kwargs={"time_ids": torch.tensor([[1024.0, 999.0]])})
    assert out.dtype == torch.float32
    assert seen == dict(latents=torch.bfloat16, t=torch.float32, embeds=torch.bfloat16, residual=torch.bfloat16,
                        added=torch.float32)


def test_controlnet_residuals_from_a_float32_controlnet_reach_the_bf16_unet(bf16_pipe, tiny_pipe):
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(tiny_pipe.model.unet).eval()
    for block in controlnet.controlnet_down_blocks:  # non-zero residuals, so they change the result
        torch.nn.init.normal_(block.weight, std=0.05)
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500.0, 500.0])
    embeds = torch.randn(2, 77, 32)
    with torch.no_grad():
        down, mid = controlnet(latents, t, embeds, controlnet_cond=torch.rand(2, 3, 64, 64), return_dict=False)
        plain = bf16_pipe.model.unet_call(latents, t, embeds)
        with_residuals = bf16_pipe.model.unet_call(latents, t, embeds, down_block_additional_residuals=down,
                                                   mid_block_additional_residual=mid)
        reference = tiny_pipe.model.unet_call(latents, t, embeds, down_block_additional_residuals=down,
                                              mid_block_additional_residual=mid)
    assert with_residuals.dtype == torch.float32
    assert not torch.equal(plain, with_residuals)
    error = float((with_residuals - reference).abs().max() / reference.abs().max())
    assert error < 0.05, error


def test_img2img_and_inpainting_run_through_the_bf16_vae(bf16_pipe, tiny_pipe):
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    for run in ("img2img", "inpaint"):
        args = (init, mask) if run == "inpaint" else (init,)
        a = getattr(bf16_pipe, run)(*args, "a blue square", denoising_strength=0.6, **GEN)
        b = getattr(tiny_pipe, run)(*args, "a blue square", denoising_strength=0.6, **GEN)
        assert Infotext.from_text(a.infotexts[0]).params["Precision"] == "bf16"
        assert grey_levels(a.images[0], b.images[0]) < 4


def test_auto_on_a_bf16_cpu_switches_and_records(tiny_sd_path, plugin_host, monkeypatch):
    monkeypatch.delenv(prec.ENVIRONMENT, raising=False)
    monkeypatch.setattr(prec, "_detected", AMX)
    monkeypatch.setattr(prec, "AUTO_MIN_UNET_PARAMETERS", 1000)
    pipe = aipaint.load(tiny_sd_path, host=plugin_host)
    assert pipe.model.precision == "bf16" and next(pipe.model.unet.parameters()).dtype == torch.bfloat16
    fp32 = aipaint.load(tiny_sd_path, host=plugin_host, runtime_options={"precision": "fp32"})
    assert fp32.model.precision == "fp32" and next(fp32.model.unet.parameters()).dtype == torch.float32
    monkeypatch.setattr(prec, "_detected", AVX2)
    assert aipaint.load(tiny_sd_path, host=plugin_host).model.precision == "fp32"


def test_lora_style_patches_on_bf16_weights_are_restored_exactly(bf16_pipe):
    from aipaint.plugin.kit.patches import PatchSet

    weight = bf16_pipe.model.unet.conv_in.weight
    before = weight.detach().clone()
    patches = PatchSet()
    patches.add(("unet", "conv_in"), weight, torch.full(weight.shape, 0.01))
    with patches.apply():
        assert not torch.equal(weight, before) and weight.dtype == torch.bfloat16
    assert torch.equal(weight, before)
