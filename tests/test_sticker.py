"""Stickers (plugins/sticker): transparent background, opaque subject, an outline."""

from __future__ import annotations

import numpy as np
import pytest
from aipaint_plugins.sticker.cutout import make_sticker, subject_mask
from PIL import Image

from aipaint.engine.postprocessing import run_postprocessors
from aipaint.errors import ImageError, InvalidParameter, UnknownName


@pytest.fixture(scope="module")
def red_circle() -> Image.Image:
    """A shapes-world picture: a big red circle in the centre of a white background, 128 px."""
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import Scene, SceneObject

    return render(Scene("white", (SceneObject("circle", "red", "big", "center", 16.0, 16.0, 15.0),)), size=128)


def test_sticker_has_a_transparent_background_an_opaque_subject_and_an_outline(red_circle):
    sticker, mask = make_sticker(red_circle, outline_width=5, outline_colour="black")
    pixels = np.asarray(sticker)
    pad = 5 + 2
    assert sticker.mode == "RGBA" and sticker.size == (128 + 2 * pad, 128 + 2 * pad)
    centre = 64 + pad
    assert tuple(pixels[centre, centre]) == (*np.asarray(red_circle)[64, 64], 255)  # subject: opaque, its own colour
    for corner in [(0, 0), (0, -1), (-1, 0), (-1, -1), (pad + 2, pad + 2)]:
        assert pixels[corner][3] == 0  # background: transparent
    # The circle (60 px across) ends at its edge; 2 px further out lies the black outline.
    row = pixels[centre, centre:]
    subject_edge = int(np.argmin(mask[centre, centre:]))
    assert tuple(row[subject_edge + 2]) == (0, 0, 0, 255)
    assert row[subject_edge + 8][3] == 0
    radius = np.sqrt(mask.sum() / np.pi)
    assert 28 < radius < 32


def test_sticker_of_a_shipped_silhouette_photograph():
    """skimage's horse: a black silhouette on white; the horse must be the sticker."""
    import skimage.data

    horse = skimage.data.horse()  # True on the white background
    image = Image.fromarray(np.where(horse, 255, 0).astype(np.uint8)).convert("RGB")
    sticker, mask = make_sticker(image, outline_width=0, padding=0)
    alpha = np.asarray(sticker)[..., 3]
    assert (alpha[~horse] == 255).mean() > 0.99  # the horse is opaque
    assert (alpha[horse] == 0).mean() > 0.99  # the background is transparent


def test_grabcut_cuts_a_subject_from_a_photograph():
    import skimage.data

    cup = Image.fromarray(skimage.data.coffee()).resize((150, 100))
    mask = subject_mask(cup, "grabcut")
    assert mask[50, 75]  # the cup is in the middle
    assert not mask[:3].any() and not mask[-3:].any()
    assert 0.1 < mask.mean() < 0.9


def test_segmentation_model_as_a_callable(red_circle):
    square = np.zeros((128, 128), dtype=bool)
    square[40:80, 40:80] = True
    sticker, mask = make_sticker(red_circle, method=lambda image: square, outline_width=0, padding=0)
    assert np.array_equal(np.asarray(sticker)[..., 3] == 255, square)


def test_bad_input_is_refused(red_circle):
    with pytest.raises(ImageError, match="no subject"):
        make_sticker(Image.new("RGB", (64, 64), "white"))
    with pytest.raises(InvalidParameter, match="outline_colour"):
        make_sticker(red_circle, outline_colour="not-a-colour")
    with pytest.raises(UnknownName):
        make_sticker(red_circle, method="magic")
    with pytest.raises(InvalidParameter, match="outline_width"):
        make_sticker(red_circle, outline_width=-1)


def test_sticker_post_processor_and_command_save_a_transparent_png(plugin_host, red_circle, tmp_path):
    from aipaint.cli.main import main
    from aipaint.infotext import read_png_parameters

    out = run_postprocessors(red_circle, ["sticker:outline_width=3,outline_colour=#00ff00"], host=plugin_host)
    assert out.image.mode == "RGBA" and out.infotext["Sticker"].startswith("floodfill")
    source, target = tmp_path / "in.png", tmp_path / "sticker.png"
    red_circle.save(source)
    assert main(["sticker", str(source), "-o", str(target), "--outline-width", "4"]) == 0
    saved = Image.open(target)
    assert saved.mode == "RGBA" and np.asarray(saved)[0, 0, 3] == 0
    assert "Sticker" in read_png_parameters(target)


def test_sticker_of_a_picture_from_the_embedded_model(plugin_host):
    """The embedded model draws a shape on a plain background; the sticker keeps the shape."""
    from pathlib import Path

    if not (Path(__file__).resolve().parent.parent / "zoo" / "models" / "shapes-tiny" / "unet").is_dir():
        pytest.skip("the embedded shapes-tiny model is not trained yet (zoo/models/shapes-tiny)")
    from aipaint_plugins.shapes_world.evaluate import read_scene

    import aipaint

    pipe = aipaint.load(host=plugin_host)
    picture = pipe.txt2img("a big blue square in the center, on a white background", seed=2, steps=12).image
    sticker, mask = make_sticker(picture, outline_width=1, padding=0)
    alpha = np.asarray(sticker)[..., 3]
    assert alpha[0, 0] == alpha[0, -1] == alpha[-1, 0] == alpha[-1, -1] == 0
    reading = read_scene(picture)
    assert reading.objects, "the model drew nothing to cut out"
    cx, cy = (int(v) for v in (reading.objects[0].cx, reading.objects[0].cy))
    assert alpha[cy, cx] == 255  # the drawn square is opaque
    assert 0.05 < mask.mean() < 0.7
