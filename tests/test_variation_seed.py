"""A1111's variation seed and "resize seed from": the noise, the images, the PNG parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_modes_support import noise_image, pixels
from PIL import Image

from aipaint.api.request import GenerationRequest
from aipaint.engine.noise import initial_noise, slerp
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext, generation_kwargs

KW = {"steps": 3, "width": 32, "height": 32, "sampler": "DPM++ 2M"}  # a deterministic sampler


def a1111_noise(shape, seeds, subseeds, subseed_strength, resize_from_h, resize_from_w):
    """A1111's create_random_tensors (modules/processing.py, CPU random source), transcribed
    as written there, with its /8 latent factor; the reference the implementation must match."""

    def randn(seed, shape):
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))

    def a1111_slerp(val, low, high):
        low_norm = low / torch.norm(low, dim=1, keepdim=True)
        high_norm = high / torch.norm(high, dim=1, keepdim=True)
        dot = (low_norm * high_norm).sum(1)
        omega = torch.acos(dot)
        so = torch.sin(omega)
        return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high

    xs = []
    for i, seed in enumerate(seeds):
        noise_shape = shape if resize_from_h <= 0 or resize_from_w <= 0 else (shape[0], resize_from_h // 8, resize_from_w // 8)
        subnoise = randn(subseeds[i], noise_shape) if subseed_strength != 0 else None
        noise = randn(seed, noise_shape)
        if subnoise is not None:
            noise = a1111_slerp(subseed_strength, noise, subnoise)
        if noise_shape != shape:
            x = randn(seed, shape)
            dx = (shape[2] - noise_shape[2]) // 2
            dy = (shape[1] - noise_shape[1]) // 2
            w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
            h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
            tx = 0 if dx < 0 else dx
            ty = 0 if dy < 0 else dy
            dx = max(-dx, 0)
            dy = max(-dy, 0)
            x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
            noise = x
        xs.append(noise)
    return torch.stack(xs)


def ours(shape, seeds, subseeds, strength, resize_from=None):
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return initial_noise(seeds, shape, generators, subseeds=subseeds, subseed_strength=strength, resize_from=resize_from)


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("resize_from", [None, (48, 80), (96, 40)])  # pixels (h, w): same, smaller, mixed
def test_noise_is_a1111s(strength, resize_from):
    shape, seeds, subseeds = (4, 8, 8), [7, 8], [100, 101]
    expected = a1111_noise(shape, seeds, subseeds, strength, *(resize_from or (0, 0)))
    latent_from = (resize_from[0] // 8, resize_from[1] // 8) if resize_from else None
    assert torch.allclose(ours(shape, seeds, subseeds, strength, latent_from), expected, atol=1e-6)


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-6)
    assert torch.allclose(slerp(1.0, low, high), high, atol=1e-5)
    middle = slerp(0.5, low, high)
    smaller, larger = sorted((float(low.norm()), float(high.norm())))
    assert 0.98 * smaller < middle.norm() < 1.02 * larger  # keeps the noise's size, unlike a straight average
    assert (low + high).div(2).norm() < 0.8 * smaller
    assert torch.allclose(slerp(0.3, low, low), low, atol=1e-6)  # parallel: no division by zero


def test_resized_seed_keeps_its_noise_in_the_centre():
    small = ours((4, 4, 4), [3], [], 0.0)  # the seed's noise at 4×4 latents
    grown = ours((4, 8, 8), [3], [], 0.0, resize_from=(4, 4))
    assert torch.equal(grown[0, :, 2:6, 2:6], small[0])
    shrunk = ours((4, 4, 4), [3], [], 0.0, resize_from=(8, 8))
    assert torch.equal(shrunk[0], ours((4, 8, 8), [3], [], 0.0)[0, :, 2:6, 2:6])


def test_variation_strength_zero_and_one(tiny_pipe):
    base = tiny_pipe.txt2img("a red circle", seed=1, **KW).image
    assert np.array_equal(pixels(base), pixels(tiny_pipe.txt2img("a red circle", seed=1, subseed=9, subseed_strength=0.0, **KW).image))
    full = tiny_pipe.txt2img("a red circle", seed=1, subseed=9, subseed_strength=1.0, **KW).image
    assert np.array_equal(pixels(full), pixels(tiny_pipe.txt2img("a red circle", seed=9, **KW).image))


def test_small_variation_stays_near_the_original(tiny_pipe):
    base = pixels(tiny_pipe.txt2img("x", seed=1, **KW).image).astype(float)
    near = pixels(tiny_pipe.txt2img("x", seed=1, subseed=9, subseed_strength=0.05, **KW).image)
    far = pixels(tiny_pipe.txt2img("x", seed=1, subseed=9, subseed_strength=0.6, **KW).image)
    assert 0 < np.abs(near - base).mean() < np.abs(far - base).mean()


def test_batch_variation_seeds_count_up_and_are_recorded(tiny_pipe):
    result = tiny_pipe.txt2img("x", seed=10, subseed=20, subseed_strength=0.3, batch_size=2, **KW)
    params = [Infotext.from_text(t).params for t in result.infotexts]
    assert [p["Variation seed"] for p in params] == ["20", "21"]
    assert params[1]["Variation seed strength"] == "0.3" and params[1]["Seed"] == "11"
    second = tiny_pipe.txt2img("x", seed=11, subseed=21, subseed_strength=0.3, **KW)
    # Within one 8-bit level, as docs/parameters.md promises: CPU kernels may round a batch of 2
    # differently from a single image. A variation seed that did not count up is far outside it.
    assert np.abs(pixels(result.images[1]) - pixels(second.image)).max() <= 1
    stuck = tiny_pipe.txt2img("x", seed=11, subseed=20, subseed_strength=0.3, **KW)
    assert np.abs(pixels(stuck.image) - pixels(second.image)).max() > 20


def test_random_variation_seed_is_fixed_and_recorded(tiny_pipe):
    result = tiny_pipe.txt2img("x", seed=1, subseed_strength=0.2, **KW)
    assert result.request.subseed >= 0
    assert Infotext.from_text(result.parameters).params["Variation seed"] == str(result.request.subseed)
    plain = Infotext.from_text(tiny_pipe.txt2img("x", seed=1, **KW).parameters).params
    assert "Variation seed" not in plain and "Seed resize from" not in plain


def test_resize_seed_from_reaches_the_image_and_the_png(tiny_pipe, tmp_path):
    plain = tiny_pipe.txt2img("x", seed=4, **KW).image
    same = tiny_pipe.txt2img("x", seed=4, seed_resize_from_w=32, seed_resize_from_h=32, **KW).image
    assert np.array_equal(pixels(plain), pixels(same))  # the same size: nothing moves
    resized = tiny_pipe.txt2img("x", seed=4, seed_resize_from_w=48, seed_resize_from_h=16, **KW)
    assert not np.array_equal(pixels(plain), pixels(resized.image))
    info = Infotext.from_text(resized.parameters)
    assert info.params["Seed resize from"] == "48x16"
    kwargs = generation_kwargs(info)
    assert (kwargs["seed_resize_from_w"], kwargs["seed_resize_from_h"]) == (48, 16)


def test_image_modes_use_the_variation_noise(tiny_pipe):
    a = tiny_pipe.img2img(noise_image(), "x", seed=1, **KW).image
    b = tiny_pipe.img2img(noise_image(), "x", seed=1, subseed=2, subseed_strength=0.5, **KW)
    assert not np.array_equal(pixels(a), pixels(b.image)) and "Variation seed: 2" in b.parameters


def test_cli_generate_from_png_honours_the_seed_extras(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    first, second = tmp_path / "a.png", tmp_path / "b.png"
    args = ["-m", str(tiny_sd_path), "--no-progress", "-W", "32", "-H", "32"]
    assert main(["generate", "a red circle", "--steps", "3", "--seed", "5", "--variation-seed", "77", "--variation-strength",
                 "0.4", "--seed-resize-from", "48x40", "-o", str(first), *args]) == 0
    with Image.open(first) as image:
        text = image.info["parameters"]
    assert "Variation seed: 77, Variation seed strength: 0.4, Seed resize from: 48x40" in text
    assert main(["generate", "--from-png", str(first), "-o", str(second), *args]) == 0
    with Image.open(first) as made, Image.open(second) as remade:
        assert np.array_equal(pixels(made), pixels(remade))  # the same request: bit-identical
    with pytest.raises(SystemExit):
        main(["generate", "x", "--seed-resize-from", "48by40"])
    assert "WIDTHxHEIGHT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, value",
    [("subseed_strength", 1.5), ("subseed_strength", -0.1), ("subseed", -2), ("subseed", 2**32),
     ("seed_resize_from_w", 8), ("seed_resize_from_h", 5000)],
)
def test_bad_seed_extras_are_refused(name, value):
    with pytest.raises(InvalidParameter, match=name):
        GenerationRequest(prompt="x", **{name: value})
