"""Text-to-image on tiny random models: parity with diffusers, seeds, batch, results."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from aipaint_plugins.samplers import builtin_samplers

from aipaint.samplers import SCHEDULES
from aipaint.sampling_plans import _make_scheduler

CASES = [(s, sched) for s in builtin_samplers() if s.kind == "scheduler" for sched in s.schedules]


@pytest.fixture(scope="module")
def reference(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, dict(ref.scheduler.config)


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])


@pytest.mark.parametrize(("spec", "schedule"), CASES, ids=[f"{s.name}-{sc}" for s, sc in CASES])
def test_matches_diffusers_pipeline(tiny_pipe, reference, spec, schedule):
    ref, base_config = reference
    seeds = [11, 12]
    ours = tiny_pipe.txt2img(
        "a red circle", "blue", steps=4, cfg_scale=7, sampler=spec.name, schedule=schedule, seed=11, width=32, height=32, batch_size=2
    )
    options = {**spec.scheduler_options, **SCHEDULES[schedule]}
    ref.scheduler = _make_scheduler(spec.scheduler_class, base_config, options, seeds)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    theirs = ref(
        "a red circle", negative_prompt="blue", num_inference_steps=4, guidance_scale=7, generator=generators,
        height=32, width=32, num_images_per_prompt=2, output_type="pil",
    ).images
    assert np.abs(as_array(ours.images) - as_array(theirs)).mean() < 1e-3


def test_guidance_rescale_matches_diffusers(tiny_pipe, reference):
    ref, base_config = reference
    ours = tiny_pipe.txt2img("a cat", steps=3, sampler="Euler", seed=5, width=32, height=32, guidance_rescale=0.7)
    ref.scheduler = _make_scheduler("EulerDiscreteScheduler", base_config, {})
    theirs = ref("a cat", num_inference_steps=3, guidance_scale=7, guidance_rescale=0.7,
                 generator=[torch.Generator().manual_seed(5)], height=32, width=32, output_type="pil").images
    assert np.abs(as_array(ours.images) - as_array(theirs)).mean() < 1e-3


def test_function_sampler_runs_and_is_deterministic(tiny_pipe):
    a = tiny_pipe.txt2img("a cat", steps=4, sampler="DPM++ 2S a", schedule="Karras", seed=1, width=32, height=32)
    b = tiny_pipe.txt2img("a cat", steps=4, sampler="DPM++ 2S a", schedule="Karras", seed=1, width=32, height=32)
    c = tiny_pipe.txt2img("a cat", steps=4, sampler="DPM++ 2S a", schedule="Karras", seed=2, width=32, height=32)
    assert np.array_equal(as_array(a.images), as_array(b.images))
    assert not np.array_equal(as_array(a.images), as_array(c.images))


def test_batch_item_i_uses_seed_plus_i(tiny_pipe):
    batch = tiny_pipe.txt2img("a dog", steps=3, seed=40, width=32, height=32, batch_size=3, sampler="Euler a")
    assert batch.seeds == [40, 41, 42]
    single = tiny_pipe.txt2img("a dog", steps=3, seed=42, width=32, height=32, sampler="Euler a")
    assert np.array_equal(as_array(batch.images[2:]), as_array(single.images))
    assert "Seed: 42" in batch.infotexts[2] and "Seed: 40" in batch.infotexts[0]


def test_random_seed_is_recorded(tiny_pipe):
    result = tiny_pipe.txt2img("a dog", steps=2, width=32, height=32)
    assert 0 <= result.seeds[0] < 2**32
    again = tiny_pipe.txt2img("a dog", steps=2, width=32, height=32, seed=result.seeds[0])
    assert np.array_equal(as_array(result.images), as_array(again.images))


def test_same_seed_is_bit_identical_across_processes(tiny_pipe, tiny_sd_path):
    ours = tiny_pipe.txt2img("a (red:1.2) house", steps=3, seed=77, width=32, height=32, sampler="DPM++ SDE")
    digest = hashlib.sha256(np.asarray(ours.image).tobytes()).hexdigest()
    code = (
        "import hashlib, numpy as np, torch, aipaint; torch.set_num_threads(1);"
        f"r = aipaint.load({str(tiny_sd_path)!r}).txt2img('a (red:1.2) house', steps=3, seed=77, width=32, height=32,"
        " sampler='DPM++ SDE');"
        "print(hashlib.sha256(np.asarray(r.image).tobytes()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == digest


def test_cfg_scale_one_skips_negative_prompt(tiny_pipe):
    a = tiny_pipe.txt2img("a dog", "a cat", steps=2, seed=3, width=32, height=32, cfg_scale=1)
    b = tiny_pipe.txt2img("a dog", "something else", steps=2, seed=3, width=32, height=32, cfg_scale=1)
    c = tiny_pipe.txt2img("a dog", "something else", steps=2, seed=3, width=32, height=32, cfg_scale=5)
    assert np.array_equal(as_array(a.images), as_array(b.images))
    assert not np.array_equal(as_array(b.images), as_array(c.images))


def test_result_carries_parameters_and_timings(tiny_pipe, tmp_path):
    from aipaint.infotext import Infotext, read_png_parameters

    result = tiny_pipe.txt2img("a tree", "fog", steps=3, seed=9, width=32, height=40, sampler="Euler", schedule="Karras", clip_skip=2)
    assert result.image.size == (32, 40)
    assert set(result.timings) >= {"denoise", "decode", "total"}
    path = result.save(tmp_path / "out.png")
    info = Infotext.from_text(read_png_parameters(path))
    assert info.prompt == "a tree" and info.negative_prompt == "fog"
    assert info.params["Sampler"] == "Euler" and info.params["Schedule type"] == "Karras"
    assert info.params["Seed"] == "9" and info.params["Size"] == "32x40" and info.params["Clip skip"] == "2"
    assert len(info.params["Model hash"]) == 10


def test_model_hash_is_sha256_prefix_of_weights(tiny_pipe, tiny_sd_path):
    weights = tiny_sd_path / "unet" / "diffusion_pytorch_model.safetensors"
    assert tiny_pipe.model.model_hash == hashlib.sha256(weights.read_bytes()).hexdigest()[:10]


def test_unknown_sampler_lists_valid_ones(tiny_pipe):
    from aipaint.errors import UnknownName

    with pytest.raises(UnknownName) as err:
        tiny_pipe.txt2img("x", sampler="Eulr", width=32, height=32)
    assert "Euler a" in str(err.value) and "DPM++ 2M" in str(err.value)


def test_schedule_not_allowed_for_sampler(tiny_pipe):
    from aipaint.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="schedule"):
        tiny_pipe.txt2img("x", sampler="Euler a", schedule="Karras", width=32, height=32)


def test_lora_tag_without_lora_adapter_is_an_error(tiny_sd_path):
    import os

    import aipaint
    from aipaint.errors import UnsupportedFeature
    from aipaint.plugins import create_plugin_host

    old = os.environ.get("AIPAINT_LOAD_PLUGINS")
    os.environ["AIPAINT_LOAD_PLUGINS"] = "sd15,samplers,torch"
    try:
        host = create_plugin_host()
    finally:
        if old is None:
            del os.environ["AIPAINT_LOAD_PLUGINS"]
        else:
            os.environ["AIPAINT_LOAD_PLUGINS"] = old
    pipe = aipaint.load(tiny_sd_path, host=host)
    with pytest.raises(UnsupportedFeature, match="lora"):
        pipe.txt2img("a cat <lora:style:0.8>", steps=2, width=32, height=32)
