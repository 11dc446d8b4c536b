"""Outpainting: the canvas, its starting fill, the feathered seam, and the untouched original."""

from __future__ import annotations

import numpy as np
import pytest
from image_modes_support import load_embedded, noise_image, pixels
from PIL import Image

from aipaint import imageutil
from aipaint.api.request import OUTPAINT_SIDES, GenerationRequest
from aipaint.engine.modes import Extension
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext, generation_kwargs, read_png_parameters

FAST = {"steps": 4, "seed": 3}


@pytest.fixture(scope="module")
def shapes_pipe(plugin_host):
    return load_embedded(plugin_host)


@pytest.mark.parametrize(
    "left, top, right, bottom",
    [(16, 0, 0, 0), (0, 8, 0, 0), (0, 0, 5, 0), (0, 0, 0, 13), (3, 7, 11, 2), (8, 0, 8, 0)],
)
def test_original_region_is_unchanged_and_new_area_is_painted(tiny_pipe, left, top, right, bottom):
    image = noise_image(32, 24)
    result = tiny_pipe.outpaint(image, "a red circle", left=left, top=top, right=right, bottom=bottom, **FAST)
    out = pixels(result.image)
    assert result.image.size == (32 + left + right, 24 + top + bottom)
    assert np.array_equal(out[top : top + 24, left : left + 32], pixels(image))
    new = np.ones(out.shape[:2], bool)
    new[top : top + 24, left : left + 32] = False
    canvas = pixels(imageutil.extend_canvas(image, left, top, right, bottom, "edge"))
    assert np.abs(out[new] - canvas[new]).mean() > 5  # generated, not just the starting fill


def test_canvas_is_padded_to_the_grid_and_cropped_back():
    extension = Extension(left=5)
    padded = extension.padded_to((32, 30), 8)
    assert (padded.left, padded.top, padded.right, padded.bottom) == (8, 0, 0, 2)
    assert padded.canvas_size((32, 30)) == (40, 32)
    both = Extension(left=3, right=3).padded_to((32, 32), 8)
    assert (both.left, both.right) == (3, 5)


@pytest.mark.parametrize("fill", ["edge", "blur", "noise"])
def test_fills_start_the_new_area_sensibly(fill):
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    image.paste((30, 30, 200), (8, 0, 16, 16))  # red left half, blue right half
    canvas = pixels(imageutil.extend_canvas(image, 8, 0, 8, 0, fill, seed=1))
    assert canvas.shape == (16, 32, 3)
    assert np.array_equal(canvas[:, 8:24], pixels(image))
    if fill == "edge":
        assert (canvas[:, :8] == (200, 30, 30)).all() and (canvas[:, 24:] == (30, 30, 200)).all()
    elif fill == "blur":  # nearer colours dominate: reddish on the left, bluish on the right
        assert canvas[:, :8, 0].mean() > canvas[:, :8, 2].mean() and canvas[:, 24:, 2].mean() > canvas[:, 24:, 0].mean()
    else:
        assert canvas[:, :8].std() > 20
        assert np.array_equal(canvas, pixels(imageutil.extend_canvas(image, 8, 0, 8, 0, fill, seed=1)))
        assert not np.array_equal(canvas, pixels(imageutil.extend_canvas(image, 8, 0, 8, 0, fill, seed=2)))


def test_feather_is_zero_on_the_original_and_ramps_inside_the_new_area():
    mask = imageutil.outpaint_mask((32, 32), 0, 0, 32, 0)
    feather = np.asarray(imageutil.feather_inside(mask, 4)).astype(int)
    assert (feather[:, :32] == 0).all()
    row = feather[16, 32:]
    assert row[0] < 64 and row[-1] == 255 and (np.diff(row) >= 0).all()
    assert np.array_equal(np.asarray(imageutil.feather_inside(mask, 0)), np.asarray(mask))


def test_seam_starts_from_the_fill(tiny_pipe):
    """Next to the original, the output is mostly the edge fill, so there is no hard seam."""
    image = Image.new("RGB", (32, 32), (90, 160, 60))
    result = pixels(tiny_pipe.outpaint(image, "x", right=32, mask_blur=8, **FAST).image)
    seam = np.abs(result[:, 32] - (90, 160, 60)).mean()
    far = np.abs(result[:, 56:] - (90, 160, 60)).mean()
    assert seam < 0.25 * far, (seam, far)


def test_strength_and_blur_defaults_and_infotext(tiny_pipe):
    result = tiny_pipe.outpaint(noise_image(), "x", right=8, **FAST)
    info = Infotext.from_text(result.parameters).params
    assert info["Denoising strength"] == "1" and info["Mask blur"] == "8" and info["Size"] == "40x32"
    partial = tiny_pipe.outpaint(noise_image(), "x", right=8, denoising_strength=0.5, fill="blur", **FAST)
    assert Infotext.from_text(partial.parameters).params["Denoising strength"] == "0.5"


def test_png_parameters_repeat_the_outpaint(tiny_pipe):
    """Sides and fill are recorded, and read back into the same request: the same image again."""
    image = noise_image(32, 24)
    request = GenerationRequest("a red circle", init_image=image, outpaint_left=5, outpaint_bottom=13, outpaint_fill="noise",
                                mask_blur=6, denoising_strength=0.9, **FAST)
    result = tiny_pipe.generate(request)
    info = Infotext.from_text(result.parameters)
    assert info.params["Outpaint left"] == "5" and info.params["Outpaint bottom"] == "13" and info.params["Outpaint fill"] == "noise"
    assert "Outpaint top" not in info.params and "Outpaint right" not in info.params
    again = GenerationRequest(**generation_kwargs(info), init_image=image)
    fields = ("prompt", "seed", "steps", "denoising_strength", "mask_blur", "width", "height", "outpaint_fill", *OUTPAINT_SIDES)
    assert {f: getattr(again, f) for f in fields} == {f: getattr(request, f) for f in fields}
    repeated = tiny_pipe.generate(again)
    assert repeated.image.size == (37, 37)
    assert np.array_equal(pixels(repeated.image), pixels(result.image))


def test_the_result_request_inpaints_the_canvas_without_extending_it_again(tiny_pipe):
    """Post-processors reuse the result's request; it must not outpaint a second time."""
    result = tiny_pipe.outpaint(noise_image(), "x", right=8, **FAST)
    assert not result.request.outpaints and result.request.mask is not None
    assert result.request.init_image.size == (40, 32)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "at least one side"),
        ({"left": -4}, "left"),
        ({"right": 2.5}, "right"),
        ({"right": 4090}, "larger than 4096"),
        ({"right": 8, "width": 64}, "width/height"),
        ({"right": 8, "fill": "mirror"}, "fill"),
        ({"right": 8, "mask": Image.new("L", (32, 32), 255)}, "made by outpainting"),
    ],
)
def test_bad_extensions_are_refused(tiny_pipe, kwargs, message):
    with pytest.raises(InvalidParameter, match=message):
        tiny_pipe.outpaint(noise_image(), "x", **kwargs)


def test_cli_outpaint(tiny_sd_path, tmp_path, capsys):
    from aipaint.cli.main import main

    noise_image().save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    args = ["-m", str(tiny_sd_path), "--no-progress", "--steps", "3", "--seed", "4"]
    assert main(["outpaint", str(tmp_path / "in.png"), "a red circle", "--left", "8", "--bottom", "5", "--fill", "noise",
                 "-o", str(out), *args]) == 0
    image = Image.open(out)
    assert image.size == (40, 37)
    assert np.array_equal(pixels(image)[:32, 8:], pixels(noise_image()))
    again = tmp_path / "again.png"  # the PNG records the sides and the fill: no need to give them again
    assert main(["outpaint", str(tmp_path / "in.png"), "--from-png", str(out),
                 "-o", str(again), "-m", str(tiny_sd_path), "--no-progress"]) == 0
    assert np.array_equal(pixels(image), pixels(Image.open(again)))
    wider = tmp_path / "wider.png"  # a side given on the command line overrides the recorded one
    assert main(["outpaint", str(tmp_path / "in.png"), "--from-png", str(out), "--left", "16",
                 "-o", str(wider), "-m", str(tiny_sd_path), "--no-progress"]) == 0
    assert Image.open(wider).size == (48, 37)
    redrawn = tmp_path / "redrawn.png"  # img2img from an outpainted PNG's parameters does not extend the image
    assert main(["img2img", str(tmp_path / "in.png"), "--from-png", str(out), "-s", "0.5",
                 "-o", str(redrawn), "-m", str(tiny_sd_path), "--no-progress"]) == 0
    assert Image.open(redrawn).size == (32, 32)
    drawn = tmp_path / "drawn.png"  # txt2img from it draws on the canvas it was painted on (padded to the grid)
    assert Infotext.from_text(read_png_parameters(out)).size() == (40, 40)
    assert main(["generate", "--from-png", str(out), "-o", str(drawn), "-m", str(tiny_sd_path), "--no-progress"]) == 0
    assert Image.open(drawn).size == (40, 40)
    capsys.readouterr()
    assert main(["outpaint", str(tmp_path / "in.png"), "x", "-o", str(out), *args]) == 2
    assert "at least one side" in capsys.readouterr().err


def test_embedded_outpainting_paints_the_new_area_from_the_prompt(shapes_pipe):
    """The source has a black background, so the edge fill starts the new strips black. Over
    four seeds the strips' outer halves (away from the seam) follow the background the prompt
    asks for: black stays black, gray is lighter, white far lighter, for every seed; the
    fill alone, or a model blind to the prompt there, would give the same strips every time."""
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject

    source = render(Scene("black", (SceneObject("square", "yellow", "big", "center", 16, 16, 14),)))
    fill = pixels(imageutil.extend_canvas(source, 16, 0, 16, 0, "edge"))
    assert fill[:, :16].max() == 0 and fill[:, 48:].max() == 0
    far = {}
    for background in ("black", "gray", "white"):
        result = shapes_pipe.outpaint(source, f"a big yellow square in the center, on a {background} background",
                                      left=16, right=16, seed=2, batch_size=4)
        assert result.seeds == [2, 3, 4, 5]
        for image in result.images:
            assert image.size == (64, 32)
            assert np.array_equal(pixels(image)[:, 16:48], pixels(source))
        far[background] = np.array([np.concatenate([pixels(im)[:, :8], pixels(im)[:, 56:]], axis=1).mean()
                                    for im in result.images])
    assert (far["black"] < 30).all(), far  # the black background goes on
    assert (far["gray"] > far["black"] + 10).all(), far
    assert (far["white"] > far["gray"] + 40).all() and (far["white"] > 80).all(), far  # painted, not the black fill
