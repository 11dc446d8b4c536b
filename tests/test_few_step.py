"""Few-step samplers: TCD (and LCM without CFG) equal diffusers' own pipeline on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def as_array(images) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images])


@pytest.fixture(scope="module")
def reference(tiny_sd_path):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return ref, dict(ref.scheduler.config)


# The reference written from diffusers' documentation: TCD's gamma is the pipeline's eta (0.3 in
# the TCD examples; the pipeline's own default would be 0).
@pytest.mark.parametrize(("sampler", "cls", "call"), [
    ("TCD", "TCDScheduler", {"eta": 0.3}),
    ("LCM", "LCMScheduler", {}),
])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_matches_diffusers_pipeline(tiny_pipe, reference, sampler, cls, call, cfg):
    import diffusers

    ref, config = reference
    seeds = [11, 12]
    ours = tiny_pipe.txt2img("a red circle", "blue", steps=4, cfg_scale=cfg, sampler=sampler, seed=11, width=32,
                             height=32, batch_size=2)
    ref.scheduler = getattr(diffusers, cls).from_config(config, clip_sample=False)
    theirs = ref("a red circle", negative_prompt="blue" if cfg > 1 else None, num_inference_steps=4,
                 guidance_scale=cfg, generator=[torch.Generator().manual_seed(s) for s in seeds], height=32,
                 width=32, num_images_per_prompt=2, output_type="pil", **call).images
    assert np.abs(as_array(ours.images) - as_array(theirs)).mean() < 1e-3
    assert f"Sampler: {sampler}" in ours.infotexts[0]


def test_tcd_gamma_draws_noise_from_the_seed(tiny_pipe):
    a = tiny_pipe.txt2img("a red circle", steps=4, cfg_scale=1, sampler="TCD", seed=3, width=32, height=32)
    b = tiny_pipe.txt2img("a red circle", steps=4, cfg_scale=1, sampler="tcd", seed=3, width=32, height=32)
    lcm = tiny_pipe.txt2img("a red circle", steps=4, cfg_scale=1, sampler="LCM", seed=3, width=32, height=32)
    assert np.array_equal(as_array(a.images), as_array(b.images))
    assert np.abs(as_array(a.images) - as_array(lcm.images)).mean() > 1e-3
