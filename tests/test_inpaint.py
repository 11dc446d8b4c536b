"""Inpainting: masks, exact preservation outside the mask, 4- and 9-channel UNets, "only masked"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from image_modes_support import load_embedded, noise_image, pixels
from PIL import Image

from aipaint import imageutil
from aipaint.api.request import INPAINT_FILLS, GenerationRequest
from aipaint.errors import ImageError, InvalidParameter
from aipaint.infotext import Infotext, generation_kwargs

FAST = {"steps": 4, "seed": 3}
BIG_BOX = (24, 20, 40, 40)  # in a 64×64 image: room for a blur of 8 (reach 20) around it


def box_mask(box=(8, 8, 24, 20), size=(32, 32)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def untouched(mask: Image.Image, blur: int, invert: bool = False) -> np.ndarray:
    """Pixels the overlay must leave exactly as they were: where the blurred mask is 0."""
    if invert:
        mask = imageutil.invert_mask(mask)
    return np.asarray(imageutil.blur_mask(mask, blur)) == 0


@pytest.fixture(scope="module")
def inpainting_pipe(tmp_path_factory, plugin_host):
    """A tiny random 9-channel inpainting model, saved as diffusers saves one."""
    from conftest import build_tiny_sd_components
    from diffusers import StableDiffusionInpaintPipeline

    import aipaint

    folder = tmp_path_factory.mktemp("tiny-inpaint") / "tiny-inpaint"
    StableDiffusionInpaintPipeline(**build_tiny_sd_components(in_channels=9), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).save_pretrained(folder)
    return aipaint.load(folder, host=plugin_host)


@pytest.fixture(scope="module")
def shapes_pipe(plugin_host):
    return load_embedded(plugin_host)


# --- the guarantee: nothing changes outside the (blurred) mask -------------------------------
@pytest.mark.parametrize("fill", INPAINT_FILLS)
@pytest.mark.parametrize("invert", [False, True])
def test_pixels_outside_the_blurred_mask_are_exact(tiny_pipe, fill, invert):
    image, mask = noise_image(64, 64), box_mask(BIG_BOX, (64, 64))
    result = tiny_pipe.inpaint(image, mask, "a red circle", inpainting_fill=fill, inpainting_mask_invert=invert,
                               mask_blur=2, **FAST)
    keep = untouched(mask, 2, invert)
    assert keep.sum() > 50
    assert np.array_equal(pixels(result.image)[keep], pixels(image)[keep])
    changed = ~untouched(mask, 0, invert)
    assert np.abs(pixels(result.image)[changed] - pixels(image)[changed]).mean() > 10


@pytest.mark.parametrize("blur", [0, 2, 8])
def test_the_blur_band_is_all_that_changes_outside_the_mask(tiny_pipe, blur):
    image, mask = noise_image(64, 64), box_mask(BIG_BOX, (64, 64))
    result = pixels(tiny_pipe.inpaint(image, mask, "x", mask_blur=blur, **FAST).image)
    differs = (result != pixels(image)).any(axis=2)
    assert not (differs & untouched(mask, blur)).any()
    reach = int(2.5 * blur + 0.5)  # half the Gaussian kernel A1111 uses
    x1, y1, x2, y2 = BIG_BOX
    assert differs[y1:y2, x1:x2].mean() > 0.9
    assert not differs[: y1 - reach].any() and not differs[y2 + reach :].any()
    assert not differs[:, : x1 - reach].any() and not differs[:, x2 + reach :].any()


def test_batch_keeps_every_image_exact_outside(tiny_pipe):
    image, mask = noise_image(), box_mask()
    result = tiny_pipe.inpaint(image, mask, "x", batch_size=3, mask_blur=1, **FAST)
    keep = untouched(mask, 1)
    assert len(result.images) == 3
    for generated in result.images:
        assert np.array_equal(pixels(generated)[keep], pixels(image)[keep])
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))


# --- agreement with diffusers' inpainting pipeline -------------------------------------------------
@pytest.mark.parametrize("channels", [4, 9])
@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_matches_diffusers_inpaint_pipeline(tiny_pipe, inpainting_pipe, tiny_sd_path, channels, strength):
    """Inside the mask, aipaint's image is diffusers' (latent blending for 4 channels, extra
    input channels for 9). Latents are handed over because diffusers samples the VAE posterior."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    from aipaint.engine.modes import to_tensor

    pipe = inpainting_pipe if channels == 9 else tiny_pipe
    folder = pipe.model.source_path if channels == 9 else tiny_sd_path
    image, mask = noise_image(), box_mask((4, 8, 20, 24))
    ours = pipe.inpaint(image, mask, "a red circle", mask_blur=0, sampler="DDIM", steps=6, seed=3, cfg_scale=5,
                        denoising_strength=strength)
    reference = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config, clip_sample=False)  # as SD1.5's config
    reference.set_progress_bar_config(disable=True)
    m = torch.from_numpy(np.asarray(mask) / 255.0).float()[None, None]
    with torch.inference_mode():
        latents = pipe.model.encode(to_tensor(image))
        masked_latents = pipe.model.encode(to_tensor(image) * (1 - m) + 0.5 * m)
    theirs = reference(prompt="a red circle", image=latents, mask_image=mask, masked_image_latents=masked_latents,
                       height=32, width=32, strength=strength, num_inference_steps=6, guidance_scale=5,
                       generator=[torch.Generator("cpu").manual_seed(3)], output_type="np").images[0]
    inside = np.asarray(mask) > 0
    assert np.abs(pixels(ours.image)[inside] - theirs[inside] * 255).max() <= 1.0
    assert theirs[inside].std() > 0.05


# --- masked content, 9 channels, only masked --------------------------------------------------------
def test_masked_content_changes_what_the_loop_starts_from(tiny_pipe):
    image, mask = noise_image(), box_mask()
    inside = ~untouched(mask, 0)
    results = {fill: pixels(tiny_pipe.inpaint(image, mask, "x", inpainting_fill=fill, denoising_strength=0.6, **FAST).image)
               for fill in INPAINT_FILLS}
    for a in INPAINT_FILLS:
        for b in INPAINT_FILLS:
            if a < b:
                assert np.abs(results[a][inside] - results[b][inside]).mean() > 1, (a, b)


def test_fill_replaces_the_hole_with_surrounding_colours():
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    image.paste((0, 0, 255), (8, 8, 24, 24))  # a blue square to hide
    filled = pixels(imageutil.fill_masked(image, box_mask((8, 8, 24, 24))))
    assert np.abs(filled - (200, 40, 40)).max() <= 2


def test_nine_channel_model_gets_mask_and_masked_image(inpainting_pipe, monkeypatch):
    seen = []
    call = inpainting_pipe.model.unet_call
    monkeypatch.setattr(inpainting_pipe.model, "unet_call", lambda x, *a, **k: seen.append(x.clone()) or call(x, *a, **k))
    image, mask = noise_image(), box_mask()
    result = inpainting_pipe.inpaint(image, mask, "x", mask_blur=0, **FAST)
    x = seen[0]
    assert x.shape == (2, 9, 16, 16)  # [negative, positive] × (latents, mask, masked image latents)
    latent_mask = x[0, 4]
    expected = torch.zeros(16, 16)
    expected[4:10, 4:12] = 1  # the box (8, 8, 24, 20) at half resolution
    assert torch.equal(latent_mask, expected)
    assert torch.equal(x[0, 4:], x[1, 4:])
    keep = untouched(mask, 0)
    assert np.array_equal(pixels(result.image)[keep], pixels(image)[keep])


def test_nine_channel_model_does_txt2img_and_img2img(inpainting_pipe, monkeypatch):
    seen = []
    call = inpainting_pipe.model.unet_call
    monkeypatch.setattr(inpainting_pipe.model, "unet_call", lambda x, *a, **k: seen.append(x.clone()) or call(x, *a, **k))
    assert inpainting_pipe.txt2img("x", width=32, height=32, **FAST).image.size == (32, 32)
    assert seen[-1].shape[1] == 9 and seen[-1][:, 4].eq(1).all()  # everything is to be painted
    assert inpainting_pipe.img2img(noise_image(), "x", **FAST).image.size == (32, 32)


def test_unknown_unet_input_is_refused(tmp_path, plugin_host):
    from conftest import save_tiny_sd

    import aipaint
    from aipaint.errors import UnsupportedFeature

    pipe = aipaint.load(save_tiny_sd(tmp_path / "odd", in_channels=5), host=plugin_host)
    with pytest.raises(UnsupportedFeature, match="5 input channels"):
        pipe.inpaint(noise_image(), box_mask(), "x", **FAST)


def halves(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    image.paste((255, 255, 255), (size[0] // 2, 0, *size))
    return image


def test_only_masked_generates_the_region_at_full_size(tiny_pipe, monkeypatch):
    """The mask sits in the white half: the model sees only white, upscaled to 32×32."""
    seen = []
    encode = tiny_pipe.model.encode
    monkeypatch.setattr(tiny_pipe.model, "encode", lambda x, *a, **k: seen.append(x.clone()) or encode(x, *a, **k))
    image, mask = halves(), box_mask((44, 20, 52, 28), (64, 64))
    result = tiny_pipe.inpaint(image, mask, "x", inpaint_full_res=True, inpaint_full_res_padding=4, mask_blur=2,
                               width=32, height=32, **FAST)
    assert result.image.size == (64, 64)
    assert seen[0].shape == (1, 3, 32, 32) and seen[0].min() > 0.99
    keep = untouched(mask, 2)
    assert np.array_equal(pixels(result.image)[keep], pixels(image)[keep])
    assert (pixels(result.image)[~keep] != 255).any()
    whole = tiny_pipe.inpaint(image, mask, "x", mask_blur=2, width=32, height=32, **FAST)
    assert whole.image.size == (32, 32)
    assert seen[-1].min() < 0.01  # the whole picture, black half included


def test_crop_region_grows_to_the_output_ratio():
    mask = box_mask((10, 10, 20, 14), (64, 64))
    box = imageutil.crop_region(mask, 2)
    assert box == (8, 8, 22, 16)
    assert imageutil.expand_to_ratio(box, 32, 32, (64, 64)) == (8, 5, 22, 19)
    assert imageutil.expand_to_ratio((0, 0, 30, 4), 32, 32, (32, 32)) == (0, 0, 30, 30)  # pushed inside
    assert imageutil.expand_to_ratio((0, 0, 10, 10), 64, 32, (16, 16)) == (0, 0, 16, 10)  # clipped by the image


# --- masks: formats, threshold, errors ----------------------------------------------------------------
def test_masks_in_every_format_are_read_the_same(tmp_path):
    expected = np.asarray(box_mask()) > 0
    grey = np.asarray(box_mask()).astype(np.float32) / 255
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (8, 8, 24, 20))  # painted strokes on a transparent layer
    box_mask().convert("RGB").save(tmp_path / "mask.png")
    for source in (box_mask(), box_mask().convert("RGB"), box_mask().convert("1"), rgba, expected, grey,
                   (grey * 255).astype(np.uint8), grey[..., None], str(tmp_path / "mask.png"), Path(tmp_path / "mask.png")):
        mask = imageutil.load_mask(source)
        assert mask.mode == "L" and np.array_equal(np.asarray(mask) > 0, expected), type(source)
        assert set(np.unique(np.asarray(mask))) <= {0, 255}


def test_mask_threshold_is_half_way():
    levels = np.array([[0, 127, 128, 255]], np.uint8)
    assert np.asarray(imageutil.load_mask(levels)).tolist() == [[0, 0, 255, 255]]
    assert np.asarray(imageutil.load_mask(np.array([[0.49, 0.5]]))).tolist() == [[0, 255]]
    opaque = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    opaque.putpixel((0, 0), (0, 0, 0, 255))
    assert np.asarray(imageutil.load_mask(opaque)).tolist() == [[0, 255]]  # opaque: luminance, not alpha


def test_mask_errors_say_what_to_do(tmp_path):
    image = noise_image()
    with pytest.raises(ImageError, match="mask is 16x16 but the image is 32x32; resize the mask"):
        GenerationRequest(prompt="x", init_image=image, mask=box_mask((0, 0, 4, 4), (16, 16)))
    with pytest.raises(ImageError, match="mask is empty"):
        GenerationRequest(prompt="x", init_image=image, mask=Image.new("L", (32, 32), 0))
    with pytest.raises(ImageError, match="mask is empty"):
        GenerationRequest(prompt="x", init_image=image, mask=Image.new("L", (32, 32), 255), inpainting_mask_invert=True)
    with pytest.raises(InvalidParameter, match="mask.*needs an init_image"):
        GenerationRequest(prompt="x", mask=box_mask())
    for name, value in (("mask_blur", -1), ("mask_blur", 65), ("inpaint_full_res_padding", 300),
                        ("inpainting_fill", "blur"), ("inpaint_full_res", "yes")):
        with pytest.raises(InvalidParameter, match=name):
            GenerationRequest(prompt="x", init_image=image, mask=box_mask(), **{name: value})
    assert GenerationRequest(prompt="x", init_image=image, mask=box_mask(), inpainting_fill=2).inpainting_fill == "latent noise"


# --- PNG parameters and the CLI -----------------------------------------------------------------------
def test_infotext_as_a1111_writes_it_and_reads_back(tiny_pipe):
    result = tiny_pipe.inpaint(noise_image(), box_mask(), "x", mask_blur=6, inpainting_fill="latent nothing",
                               inpainting_mask_invert=True, inpaint_full_res=True, inpaint_full_res_padding=12,
                               denoising_strength=0.6, **FAST)
    info = Infotext.from_text(result.parameters)
    assert {k: info.params[k] for k in ("Denoising strength", "Mask blur", "Mask mode", "Masked content", "Inpaint area",
                                         "Masked area padding")} == {
        "Denoising strength": "0.6", "Mask blur": "6", "Mask mode": "Inpaint not masked", "Masked content": "latent nothing",
        "Inpaint area": "Only masked", "Masked area padding": "12"}
    request = GenerationRequest(**generation_kwargs(info), init_image=noise_image(), mask=box_mask())
    assert (request.mask_blur, request.inpainting_fill, request.inpainting_mask_invert, request.inpaint_full_res,
            request.inpaint_full_res_padding, request.denoising_strength) == (6, "latent nothing", True, True, 12, 0.6)
    plain = Infotext.from_text(tiny_pipe.inpaint(noise_image(), box_mask(), "x", **FAST).parameters).params
    assert "Masked content" not in plain and "Inpaint area" not in plain and plain["Mask blur"] == "4"


def test_cli_inpaint(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    noise_image().save(tmp_path / "in.png")
    box_mask().save(tmp_path / "mask.png")
    args = ["-m", str(tiny_sd_path), "--no-progress", "--steps", "3", "--seed", "2"]
    out = tmp_path / "out.png"
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "a red circle", "--mask-blur", "2",
                 "--masked-content", "fill", "-o", str(out), *args]) == 0
    keep = untouched(box_mask(), 2)
    assert np.array_equal(pixels(Image.open(out))[keep], pixels(noise_image())[keep])
    assert "Masked content: fill" in Image.open(out).info["parameters"]
    again = tmp_path / "again.png"
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "mask.png"), "--from-png", str(out), "-o", str(again),
                 "-m", str(tiny_sd_path), "--no-progress"]) == 0
    assert np.array_equal(pixels(Image.open(out)), pixels(Image.open(again)))
    box_mask((0, 0, 8, 8), (16, 16)).save(tmp_path / "small.png")
    capsys.readouterr()
    assert main(["inpaint", str(tmp_path / "in.png"), str(tmp_path / "small.png"), "x", "-o", str(out), *args]) == 2
    assert "resize the mask to the image's size" in capsys.readouterr().err


# --- behaviour on the embedded model ----------------------------------------------------------------------
def foreground_colour(image: Image.Image, box: tuple[int, int, int, int]) -> str | None:
    """The palette colour nearest to the mean of the non-white pixels in ``box`` (None: all white)."""
    from aipaint_plugins.shapes_world.scene import COLOURS, HELDOUT_COLOUR

    x1, y1, x2, y2 = box
    region = pixels(image)[y1:y2, x1:x2].reshape(-1, 3).astype(float)
    foreground = region[np.linalg.norm(region - 255, axis=1) > 60]
    if len(foreground) < 20:
        return None
    names = [c for c in COLOURS if c != HELDOUT_COLOUR]
    distances = [np.linalg.norm(foreground.mean(0) - COLOURS[c]) for c in names]
    return names[int(np.argmin(distances))]


def test_embedded_inpainting_paints_the_prompt_inside_and_nothing_outside(shapes_pipe):
    """A red circle on the left of a white image; the right half is repainted asking for a
    square of each of four colours, with a caption of the whole scene (as this model was
    trained on). Every pixel outside the blurred mask stays exact, and the masked half gains
    an object of the asked colour (mean colour of its non-white pixels) well above the chance
    of one colour in five.

    Measured on the embedded model, 4 images per colour, seed 5 (seed 50): blue 3 (3),
    magenta 2 (2), green 1 (2), yellow 4 (4), so 10 of 16; a caption of the new square alone
    does worse (blue 2 (1), magenta 3 (2), green 1 (2), yellow 1 (2)): the model repaints the
    red it sees beside the mask.
    """
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject

    source = render(Scene("white", (SceneObject("circle", "red", "big", "left", 8, 16, 14),)))
    mask = box_mask((16, 0, 32, 32))
    assert foreground_colour(source, (18, 0, 32, 32)) is None
    keep = untouched(mask, 4)
    hits = {}
    for colour in ("blue", "magenta", "green", "yellow"):
        prompt = f"a big red circle on the left and a big {colour} square on the right, on a white background"
        result = shapes_pipe.inpaint(source, mask, prompt, seed=5, batch_size=4)
        for image in result.images:
            assert np.array_equal(pixels(image)[keep], pixels(source)[keep])
        hits[colour] = [foreground_colour(image, (18, 0, 32, 32)) for image in result.images].count(colour)
    assert sum(hits.values()) >= 8, hits
