"""img2img: plumbing on the tiny random model, agreement with diffusers, behaviour on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_modes_support import load_embedded, noise_image, pixels, steps_reported
from PIL import Image

from aipaint.api.request import GenerationRequest
from aipaint.errors import ImageError, InvalidParameter
from aipaint.imageutil import resize_image
from aipaint.infotext import Infotext, generation_kwargs

FAST = {"steps": 4, "seed": 3}


@pytest.fixture(scope="module")
def shapes_pipe(plugin_host):
    return load_embedded(plugin_host)


# --- agreement with diffusers ---------------------------------------------------------------
@pytest.mark.parametrize("sampler, scheduler", [("Euler", "EulerDiscreteScheduler"), ("DDIM", "DDIMScheduler")])
def test_matches_diffusers_img2img_pipeline(tiny_pipe, tiny_sd_path, sampler, scheduler):
    import diffusers
    from diffusers import StableDiffusionImg2ImgPipeline

    from aipaint.engine.modes import to_tensor

    image = noise_image()
    ours = tiny_pipe.img2img(image, "a red circle", "blurry", denoising_strength=0.6, steps=10, sampler=sampler,
                             seed=3, batch_size=2, cfg_scale=5)
    reference = StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd_path, safety_checker=None, requires_safety_checker=False)
    # Latent models never clip x0 (SD1.5's published scheduler config sets clip_sample=false).
    reference.scheduler = getattr(diffusers, scheduler).from_config(reference.scheduler.config, clip_sample=False)
    reference.set_progress_bar_config(disable=True)
    # diffusers samples the VAE posterior with the generators; aipaint (like A1111's default
    # "Full" encoder) uses its mean. Handing diffusers the same latents compares the rest.
    with torch.inference_mode():
        latents = tiny_pipe.model.encode(to_tensor(image))
    generators = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    theirs = reference(prompt="a red circle", negative_prompt="blurry", image=latents, num_images_per_prompt=2,
                       strength=0.6, num_inference_steps=10, guidance_scale=5, generator=generators, output_type="np").images
    ours_array = np.stack([pixels(i) for i in ours.images]).astype(np.float64)
    assert np.abs(ours_array - theirs * 255).max() <= 1.0
    assert ours_array.std() > 10 and np.abs(ours_array[0] - pixels(image)).mean() > 10  # not a trivial image


# --- strength and steps -----------------------------------------------------------------------
@pytest.mark.parametrize("strength, expected", [(0.3, 3), (0.5, 5), (0.75, 7), (1.0, 10)])
def test_steps_run_are_steps_times_strength(tiny_pipe, strength, expected):
    steps, _ = steps_reported(tiny_pipe, "img2img", noise_image(), "x", denoising_strength=strength, steps=10, seed=1)
    assert steps == expected


@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_exact_steps_runs_the_steps_asked_for(tiny_pipe, strength):
    steps, result = steps_reported(tiny_pipe, "img2img", noise_image(), "x", denoising_strength=strength, steps=6, seed=1,
                                img2img_exact_steps=True)
    assert steps == 6
    info = Infotext.from_text(result.parameters)
    assert info.params["Steps"] == "6" and info.params["Img2img exact steps"] == "True"
    assert generation_kwargs(info)["img2img_exact_steps"] is True


def test_exact_steps_beyond_the_schedule_is_refused(tiny_pipe):
    with pytest.raises(InvalidParameter, match="img2img_exact_steps"):
        tiny_pipe.img2img(noise_image(), "x", denoising_strength=0.01, steps=50, img2img_exact_steps=True)


def test_strength_one_ignores_the_input(tiny_pipe):
    a = tiny_pipe.img2img(noise_image(seed=1), "a cat", denoising_strength=1.0, **FAST).image
    b = tiny_pipe.img2img(noise_image(seed=2), "a cat", denoising_strength=1.0, **FAST).image
    txt = tiny_pipe.txt2img("a cat", width=32, height=32, **FAST).image
    assert np.array_equal(pixels(a), pixels(b)) and np.array_equal(pixels(a), pixels(txt))


def test_strength_zero_returns_the_input_through_the_vae(tiny_pipe):
    image = noise_image()
    steps, result = steps_reported(tiny_pipe, "img2img", image, "x", denoising_strength=0.0, **FAST)
    from aipaint.engine.modes import to_tensor
    from aipaint.engine.preview import to_pictures

    with torch.inference_mode():
        expected = to_pictures(tiny_pipe.model.decode(tiny_pipe.model.encode(to_tensor(image))))[0]
    assert steps == 0
    assert np.array_equal(pixels(result.image), pixels(expected))


def test_lower_strength_stays_closer_to_the_input(tiny_pipe):
    image = noise_image()
    distances = [np.abs(pixels(tiny_pipe.img2img(image, "x", denoising_strength=s, steps=10, seed=5).image) - pixels(image)).mean()
                 for s in (0.1, 0.5, 1.0)]
    assert distances[0] < distances[1] < distances[2]


@pytest.mark.parametrize("sampler", ["DPM++ 2S a", "Heun", "Euler a"])
def test_other_samplers_start_part_way(tiny_pipe, sampler):
    steps, result = steps_reported(tiny_pipe, "img2img", noise_image(), "x", denoising_strength=0.5, steps=4, seed=2, sampler=sampler)
    assert steps in (2, 3)  # Heun reports its half-steps: 2 steps = 3 scheduler calls
    assert result.image.size == (32, 32)


# --- noising on the sampling plans --------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler", "DDIM", "DPM++ 2S a"])
def test_noising_does_not_depend_on_the_loop_having_run(plugin_host, tiny_pipe, sampler):
    """Schedulers' add_noise reads their step index; the plan must not inherit that state."""
    spec = plugin_host.registry.samplers.get(sampler)
    plan = spec.plan(tiny_pipe.model.scheduler_config, "Automatic", 6)
    clean, noise = torch.zeros(1, 4, 4, 4), torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    before = [plan.noised_after(clean, noise, 2, done) for done in range(4)]
    plan.run(lambda x, t, step: torch.zeros_like(x), plan.noised_latents(clean, noise, 2), [torch.Generator()], start=2)
    after = [plan.noised_after(clean, noise, 2, done) for done in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert before[0].std() > before[1].std() > before[2].std() > 0  # noise falls step by step
    assert torch.equal(plan.noised_after(clean, noise, 2, 4), clean)  # the run is over: clean


def test_euler_noising_matches_its_sigmas(plugin_host, tiny_pipe):
    plan = plugin_host.registry.samplers.get("Euler").plan(tiny_pipe.model.scheduler_config, "Automatic", 8)
    clean, noise = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0)
    for start in (0, 3, 7):
        expected = clean + noise * plan.scheduler.sigmas[start]
        assert torch.allclose(plan.noised_latents(clean, noise, start), expected)


# --- sizes and resize modes ----------------------------------------------------------------------
def bands(width: int = 64, height: int = 32) -> Image.Image:
    """Red | green | blue vertical bands, the green one twice as wide."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, : width // 4] = (255, 0, 0)
    array[:, width // 4 : 3 * width // 4] = (0, 255, 0)
    array[:, 3 * width // 4 :] = (0, 0, 255)
    return Image.fromarray(array)


def test_resize_modes():
    image = bands()
    stretched = pixels(resize_image(image, 32, 32, "just resize"))
    assert tuple(stretched[16, 2]) == (255, 0, 0) and tuple(stretched[16, 29]) == (0, 0, 255)
    cropped = pixels(resize_image(image, 32, 32, "crop and resize"))  # covers, centre crop: only green
    assert (np.abs(cropped - (0, 255, 0)) <= 2).all()
    filled = pixels(resize_image(image, 32, 32, "resize and fill"))  # fits as 32×16, bands of 8 rows
    middle = pixels(image.resize((32, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(filled[8:24], middle)
    assert np.abs(filled[:8] - middle[:1]).max() <= 2 and np.abs(filled[24:] - middle[-1:]).max() <= 2
    assert resize_image(image, 64, 32, "crop and resize") is image


def test_size_defaults_to_the_image_rounded(tiny_pipe):
    assert tiny_pipe.img2img(noise_image(40, 24), "x", **FAST).image.size == (40, 24)
    result = tiny_pipe.img2img(noise_image(37, 30), "x", **FAST)
    assert result.image.size == (40, 32) and "Size: 40x32" in result.parameters


def encoded_images(pipe, monkeypatch) -> list[torch.Tensor]:
    """Record every image the pipeline hands to the VAE encoder."""
    seen: list[torch.Tensor] = []
    encode = pipe.model.encode

    def spy(images, *args, **kwargs):
        seen.append(images.clone())
        return encode(images, *args, **kwargs)

    monkeypatch.setattr(pipe.model, "encode", spy)
    return seen


def test_resize_mode_reaches_the_model_and_the_infotext(tiny_pipe, monkeypatch):
    seen = encoded_images(tiny_pipe, monkeypatch)
    result = tiny_pipe.img2img(bands(), "x", resize_mode="crop and resize", width=32, height=32, **FAST)
    assert result.image.size == (32, 32)
    green = torch.tensor([0.0, 1.0, 0.0])[:, None, None]
    assert seen[0].shape == (1, 3, 32, 32) and (seen[0][0] - green).abs().max() < 0.01  # only the green band is left
    info = Infotext.from_text(result.parameters)
    assert info.params["Resize mode"] == "Crop and resize"
    assert GenerationRequest(**generation_kwargs(info), init_image=bands()).resize_mode == "crop and resize"


# --- input checks ------------------------------------------------------------------------------
@pytest.mark.parametrize("strength", [-0.1, 1.5, "high", True])
def test_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(InvalidParameter, match="denoising_strength"):
        GenerationRequest(prompt="x", init_image=noise_image(), denoising_strength=strength)


def test_bad_resize_mode_and_images_are_refused(tmp_path):
    with pytest.raises(InvalidParameter, match="resize_mode.*crop and resize"):
        GenerationRequest(prompt="x", init_image=noise_image(), resize_mode="stretch")
    assert GenerationRequest(prompt="x", init_image=noise_image(), resize_mode=2).resize_mode == "resize and fill"
    with pytest.raises(ImageError, match="cannot read the image"):
        GenerationRequest(prompt="x", init_image=tmp_path / "missing.png")
    with pytest.raises(ImageError, match="PIL image, a numpy array or a file path"):
        GenerationRequest(prompt="x", init_image=42)
    with pytest.raises(ImageError, match="shape"):
        GenerationRequest(prompt="x", init_image=np.zeros((4, 4, 5)))


def test_images_of_every_kind_are_accepted(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: flattened onto white
    assert GenerationRequest(prompt="x", init_image=rgba).init_image.getpixel((0, 0)) == (255, 255, 255)
    assert GenerationRequest(prompt="x", init_image=np.ones((8, 8, 3))).init_image.getpixel((0, 0)) == (255, 255, 255)
    noise_image().save(tmp_path / "in.png")
    assert GenerationRequest(prompt="x", init_image=str(tmp_path / "in.png")).init_image.size == (32, 32)


# --- PNG parameters and the CLI -----------------------------------------------------------------
def test_cli_img2img_and_from_png_reproduce(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    noise_image().save(tmp_path / "in.png")
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    args = ["-m", str(tiny_sd_path), "--no-progress"]
    assert main(["img2img", str(tmp_path / "in.png"), "a red circle", "-s", "0.5", "--steps", "4", "--seed", "9",
                 "--variation-seed", "4", "--variation-strength", "0.5", "-o", str(first), *args]) == 0
    text = Image.open(first).info["parameters"]
    assert "Denoising strength: 0.5" in text and "Variation seed: 4" in text
    assert main(["img2img", str(tmp_path / "in.png"), "--from-png", str(first), "-o", str(second), *args]) == 0
    assert np.array_equal(pixels(Image.open(first)), pixels(Image.open(second)))
    capsys.readouterr()
    assert main(["img2img", str(tmp_path / "in.png"), "x", "-s", "2", "-o", str(second), *args]) == 2
    assert "denoising_strength" in capsys.readouterr().err


# --- behaviour on the embedded model ---------------------------------------------------------------
def test_embedded_lower_strength_keeps_the_output_closer(shapes_pipe):
    """Mean pixel distance to the input, over 4 seeds, grows with the strength."""
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject

    source = render(Scene("white", (SceneObject("circle", "red", "big", "center", 16, 16, 14),)))
    prompt = "a big blue square on the left, on a black background"
    strengths = (0.2, 0.4, 0.6, 0.8, 1.0)
    distances = []
    for strength in strengths:
        result = shapes_pipe.img2img(source, prompt, denoising_strength=strength, seed=11, batch_size=4)
        distances.append(np.mean([np.abs(pixels(i) - pixels(source)).mean() for i in result.images]))
    assert all(a <= b + 2.0 for a, b in zip(distances, distances[1:])), distances  # monotone, up to noise
    assert distances[-1] - distances[0] > 40, distances
