"""The prompt language changes what the embedded model draws, measured over several seeds."""

from __future__ import annotations

import numpy as np
import pytest

import aipaint
from aipaint.world.evaluate import read_scene
from aipaint.world.scene import BACKGROUNDS, COLOURS

SEEDS = range(12)
PALETTE = {**COLOURS, **BACKGROUNDS}
NAMES = list(PALETTE)
TABLE = np.array([PALETTE[n] for n in NAMES], dtype=float)


@pytest.fixture(scope="module")
def pipe():
    return aipaint.load()


def colour_share(image, colour: str) -> float:
    """Fraction of pixels whose nearest palette colour is ``colour``."""
    pixels = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 1, 3)
    nearest = np.argmin(((pixels - TABLE[None]) ** 2).sum(-1), axis=1)
    return float(np.mean(nearest == NAMES.index(colour)))


def mean_share(pipe, prompt: str, colour: str, negative: str = "", **params) -> float:
    return float(np.mean([colour_share(pipe.txt2img(prompt, negative, seed=s, **params).image, colour) for s in SEEDS]))


@pytest.mark.xfail(
    strict=True,
    reason="measured on shapes-tiny: emphasis pushes its 3-layer, 64-wide text encoder out of distribution; "
    "red share over 6 seeds is 0.118, 0.117, 0.097, 0.064, 0.026, 0.001 at weights 0.5, 0.8, 1, 1.1, 1.2, 1.4 "
    "(the same with emphasis='none', and with ComfyUI-style weighting towards the empty prompt). In two-object "
    "prompts, 12 seeds, weights 0.6/1/1.4: red circle beside a blue square 0.082/0.111/0.128, green triangle "
    "above a magenta cross 0.021/0.039/0.068, but a small cyan square beside a yellow circle 0.070/0.065/0.015, "
    "so no prompt family shows it reliably. Strict, so a model that fixes it makes this fail and gets noticed.",
)
def test_raising_a_colour_weight_raises_its_share(pipe):
    low = mean_share(pipe, "a big (red:0.6) circle in the center, on a white background", "red")
    high = mean_share(pipe, "a big (red:1.4) circle in the center, on a white background", "red")
    assert high > low


def test_negative_prompt_lowers_a_colour(pipe):
    prompt = "a big circle in the center, on a white background"
    without = mean_share(pipe, prompt, "red")
    with_negative = mean_share(pipe, prompt, "red", negative="red")
    assert with_negative < without


def test_prompt_editing_ends_with_the_to_content(pipe):
    prompt = "a big [red:blue:0.3] square in the center, on a white background"
    colours = []
    for s in SEEDS:
        objects = read_scene(pipe.txt2img(prompt, seed=s).image).objects
        colours.append(objects[0].colour if objects else None)
    assert colours.count("blue") >= 0.75 * len(colours) and colours.count("red") <= 0.25 * len(colours)


def test_alternation_mixes_both_sides(pipe):
    """``[red|blue]`` alternates every step; the result differs from either plain prompt."""
    base = "a big {} circle in the center, on a white background"
    mixed = np.asarray(pipe.txt2img(base.format("[red|blue]"), seed=1).image, dtype=float)
    red = np.asarray(pipe.txt2img(base.format("red"), seed=1).image, dtype=float)
    blue = np.asarray(pipe.txt2img(base.format("blue"), seed=1).image, dtype=float)
    assert np.abs(mixed - red).mean() > 1 and np.abs(mixed - blue).mean() > 1
