"""Behaviour of the embedded default model (shapes-tiny), measured with the evaluator.

These use the real trained weights shipped in zoo/models/shapes-tiny: a few dozen
20-step 32x32 images, a few seconds of CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
from aipaint_plugins.shapes_world.evaluate import adherence
from aipaint_plugins.shapes_world.scene import random_scene

import aipaint

N_CAPTIONS = 16


@pytest.fixture(scope="module")
def pipe():
    return aipaint.load()


@pytest.fixture(scope="module")
def captions():
    rng = np.random.default_rng(7)
    return [random_scene(rng, "train").caption for _ in range(N_CAPTIONS)]


def mean_adherence(pipe, captions, **params) -> float:
    return float(np.mean([adherence(pipe.txt2img(c, seed=100 + i, **params).image, c).score for i, c in enumerate(captions)]))


@pytest.fixture(scope="module")
def default_adherence(pipe, captions) -> float:
    """Mean adherence over the captions at the model's defaults (CFG 7), drawn once for the two tests that use it."""
    return mean_adherence(pipe, captions)


def test_default_model_is_the_embedded_one(pipe):
    assert pipe.model.name == "shapes-tiny"
    assert (pipe.model.defaults.width, pipe.model.defaults.height, pipe.model.defaults.steps) == (32, 32, 20)
    result = pipe.txt2img("a big red circle in the center, on a white background", seed=1)
    assert result.image.size == (32, 32)
    assert "Model: shapes-tiny" in result.parameters and "Guidance rescale: 0.7" in result.parameters


def test_follows_prompts(default_adherence):
    assert default_adherence >= 0.8


def test_guidance_raises_adherence_over_unconditional(pipe, captions, default_adherence):
    """An empty prompt, scored against the same captions, is the chance level."""
    assert pipe.model.defaults.cfg_scale == 3  # the card's: the shared images are CFG 3 ones
    conditioned = default_adherence
    # one batch: image i has seed 100 + i, as one call per seed would (to within 1 of 255 in a pixel), ~5x faster
    empty = pipe.txt2img("", seed=100, batch_size=len(captions))
    assert empty.seeds == [100 + i for i in range(len(captions))]
    chance = float(np.mean([adherence(image, c).score for image, c in zip(empty.images, captions, strict=True)]))
    assert conditioned > chance + 0.3


def test_cfg_raises_adherence(pipe):
    """Guidance helps: at the card's CFG 3 more images draw every attribute asked for (score 1) than
    with no guidance (CFG 1), at the default 20 steps.

    On these 96 captions (benchmarks/results/embedded_gen4_2026-12-05.txt, the CFG sweep): every
    attribute drawn in 69 at CFG 1 (71.9%), 83 at CFG 3 (86.5%) and 75 at CFG 7 (78.1%): the peak is
    at 3, so the card makes 3 the default. The gain differs from one caption set to another (3 of 48
    on caption seed 7's), so the test takes the measured set and asks for a gain of 5.
    """
    rng = np.random.default_rng(2024)
    captions = [random_scene(rng, "train").caption for _ in range(96)]

    def all_right(cfg_scale: float) -> int:
        images = [pipe.txt2img(c, seed=100 + i, cfg_scale=cfg_scale).image for i, c in enumerate(captions)]
        return sum(adherence(image, c).score == 1 for image, c in zip(images, captions, strict=True))

    assert all_right(3) >= all_right(1) + 5


def test_same_seed_reproduces_and_seeds_differ(pipe):
    prompt = "a small green cross at the top and a big blue square at the bottom, on a gray background"
    a = np.asarray(pipe.txt2img(prompt, seed=3).image)
    b = np.asarray(pipe.txt2img(prompt, seed=3).image)
    c = np.asarray(pipe.txt2img(prompt, seed=4).image)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0


def test_every_sampler_draws_the_prompt(pipe):
    prompt = "a big yellow square on the left, on a black background"
    # LCM is for latent-consistency-distilled models. (LMS and PLMS, linear multistep methods, were left
    # out on the first-generation model, whose zero-terminal-SNR schedule they do not cope with; the
    # current model's moderate schedule suits them: docs/parameters.md.)
    skipped = {"LCM"}
    for sampler in pipe.host.registry.samplers.names():
        if sampler in skipped:
            continue
        result = pipe.txt2img(prompt, seed=1, batch_size=2, sampler=sampler)  # seeds 1 and 2, each its own noise
        assert result.seeds == [1, 2]
        scores = [adherence(image, prompt).score for image in result.images]
        assert np.mean(scores) >= 0.6, sampler


def test_the_cards_emphasis_default_is_used_and_recorded(pipe):
    """The card makes "none" (A1111's "No norm") this model's emphasis; asking for A1111's own
    ("a1111", "Original") is recorded too, since it differs from the model's default."""
    from aipaint.infotext import Infotext, generation_kwargs

    prompt = "a big (red:1.3) circle in the center, on a white background"
    default = pipe.txt2img(prompt, seed=1, steps=4)
    none = pipe.txt2img(prompt, seed=1, steps=4, emphasis="none")
    original = pipe.txt2img(prompt, seed=1, steps=4, emphasis="a1111")
    assert np.array_equal(np.asarray(default.image), np.asarray(none.image))
    assert not np.array_equal(np.asarray(default.image), np.asarray(original.image))
    assert "Emphasis: No norm" in default.parameters and "Emphasis: Original" in original.parameters
    assert generation_kwargs(Infotext.from_text(original.parameters))["emphasis"] == "a1111"
    assert generation_kwargs(Infotext.from_text(default.parameters))["emphasis"] == "none"
