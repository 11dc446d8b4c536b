"""Line-art colouring (plugins/lineart): the colours change, the lines stay."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from aipaint_plugins.lineart.colour import colour_lineart, line_layer, multiply_lines
from PIL import Image, ImageDraw

from aipaint.errors import ImageError, UnsupportedFeature


@pytest.fixture(scope="module")
def drawing() -> Image.Image:
    """Black lines on off-white paper (a scan is rarely pure white)."""
    image = Image.new("RGB", (64, 64), (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse([10, 10, 54, 54], outline=(0, 0, 0), width=3)
    draw.line([32, 10, 32, 54], fill=(30, 30, 30), width=2)
    return image


def _lines(drawing: Image.Image) -> np.ndarray:
    return np.asarray(drawing.convert("L")) < 60


def test_multiplied_lines_stay_dark_and_the_paper_takes_the_colours(drawing):
    colours = Image.new("RGB", drawing.size, (200, 40, 90))
    out = np.asarray(multiply_lines(colours, drawing)).astype(int)
    lines = _lines(drawing)
    assert out[lines].max() <= 60  # every line at least as dark as drawn (30 or less here, times the colour)
    paper = np.asarray(drawing.convert("L")) >= 240
    assert np.abs(out[paper] - [200, 40, 90]).max() <= 2  # off-white paper counts as white
    assert line_layer(drawing)[paper].min() > 0.98


def test_an_all_black_drawing_is_refused():
    with pytest.raises(ImageError, match="entirely black"):
        line_layer(Image.new("RGB", (8, 8)))


def test_colouring_with_a_stand_in_pipeline_keeps_lines(drawing):
    calls = {}

    def img2img(image, prompt, negative_prompt="", *, denoising_strength, **params):
        calls.update(params, prompt=prompt, strength=denoising_strength)
        return SimpleNamespace(images=[Image.new("RGB", image.size, (20, 200, 40))], infotexts=["x"])

    pipe = SimpleNamespace(img2img=img2img, host=None)
    images, info, _ = colour_lineart(pipe, drawing, "a green ring", denoising_strength=0.7, seed=3)
    out = np.asarray(images[0]).astype(int)
    assert calls == {"width": 64, "height": 64, "seed": 3, "prompt": "a green ring", "strength": 0.7}
    assert out[_lines(drawing)].max() <= 60 and tuple(out[2, 2]) == (20, 200, 40)
    assert info["Lineart"] == "img2img, lines multiplied"


def test_lineart_controlnet_needs_the_controlnet_plugin(drawing):
    pipe = SimpleNamespace(host=SimpleNamespace(registry=SimpleNamespace(adapters=[])))
    with pytest.raises(UnsupportedFeature, match="ControlNet adapter"):
        colour_lineart(pipe, drawing, "x", controlnet="control_lineart")


def test_colouring_with_the_model_keeps_every_line(tiny_pipe, drawing, tmp_path, monkeypatch):
    if not hasattr(tiny_pipe, "img2img"):
        pytest.skip("this aipaint has no Pipeline.img2img yet")
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))  # no lineart ControlNet installed: img2img
    images, info, result = colour_lineart(tiny_pipe, drawing, "a red circle", steps=2, seed=1, batch_size=2)
    assert info["Lineart"] == "img2img, lines multiplied"
    lines = _lines(drawing)
    for image, coloured in zip(images, result.images):
        out = np.asarray(image).astype(int)
        assert out[lines].max() <= 60
        # On the paper the picture is the model's colouring (the paper multiplies by ~1).
        paper = np.asarray(drawing.convert("L")) >= 240
        assert np.abs(out[paper] - np.asarray(coloured).astype(int)[paper]).max() <= 3


def test_colouring_with_a_lineart_controlnet_keeps_every_line(tiny_pipe, drawing, tmp_path, monkeypatch):
    if "controlnet" not in tiny_pipe.host.registry.adapters:
        pytest.skip("the ControlNet adapter plugin is not installed")
    from test_controlnet import _tiny_controlnet

    from aipaint.infotext import Infotext

    _tiny_controlnet(tiny_pipe.model.unet, 2).save_pretrained(tmp_path / "control_lineart_tiny")
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    images, info, result = colour_lineart(tiny_pipe, drawing, "a red circle", steps=2, seed=1)
    assert info == {"Lineart": "controlnet control_lineart_tiny, lines multiplied"}
    params = Infotext.from_text(result.infotexts[0]).params
    assert params["ControlNet 0"].startswith("Module: none, Model: control_lineart_tiny [") and "Denoising strength" not in params
    free = tiny_pipe.txt2img("a red circle", width=64, height=64, steps=2, seed=1).image
    painted = np.asarray(result.images[0]).astype(int)
    assert np.abs(painted - np.asarray(free).astype(int)).mean() > 5  # the ControlNet steered the painting
    # The lines: every line pixel of the result is at most as light as the drawing's, scaled by
    # the paper's normalisation (255 / paper level), whatever the ControlNet painted under it.
    lines = _lines(drawing)
    grey_in = np.asarray(drawing.convert("L")).astype(float)
    grey_out = np.asarray(images[0].convert("L")).astype(float)
    assert (grey_out[lines] <= grey_in[lines] * 255 / np.percentile(grey_in, 90) + 1).all()
    assert grey_out[lines].max() <= 60
    paper = grey_in >= 240
    assert np.abs(np.asarray(images[0]).astype(int)[paper] - painted[paper]).max() <= 3


def test_lineart_post_processor_needs_a_model(plugin_host, drawing):
    from aipaint.engine.postprocessing import run_postprocessors

    with pytest.raises(UnsupportedFeature):
        run_postprocessors(drawing, ["lineart:prompt=x"], host=plugin_host)


def test_lineart_post_processor_records_its_controlnet_unit(tiny_pipe, drawing, tmp_path, monkeypatch):
    """In a chain the image keeps its own parameters, so the post-processor carries the unit the
    colouring used, in the ControlNet adapter's own format, under a key of its own."""
    if "controlnet" not in tiny_pipe.host.registry.adapters:
        pytest.skip("the ControlNet adapter plugin is not installed")
    from aipaint_plugins.controlnet.units import units_from_params
    from aipaint_plugins.lineart.colour import LINEART_CONTROLNET_KEY
    from test_controlnet import _tiny_controlnet

    from aipaint.engine.postprocessing import run_postprocessors
    from aipaint.infotext import Infotext
    from aipaint.plugin.postprocess import merge_infotext

    _tiny_controlnet(tiny_pipe.model.unet, 2).save_pretrained(tmp_path / "control_lineart_tiny")
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    out = run_postprocessors(drawing, [("lineart", {"prompt": "a red circle", "steps": 2, "seed": 1})], tiny_pipe)
    assert out.infotext["Lineart"] == "controlnet control_lineart_tiny, lines multiplied"
    _, _, direct = colour_lineart(tiny_pipe, drawing, "a red circle", steps=2, seed=1)
    assert out.infotext[LINEART_CONTROLNET_KEY] == Infotext.from_text(direct.infotexts[0]).params["ControlNet 0"]
    (unit,) = units_from_params({"ControlNet 0": out.infotext[LINEART_CONTROLNET_KEY]})
    assert unit["model"].startswith("control_lineart_tiny [") and unit["preprocessor"] == "none" and unit["weight"] == 1.0
    # After a generation made without a ControlNet, the PNG still says it had none of its own.
    params = Infotext.from_text(merge_infotext("a red circle\nSteps: 2, Seed: 1, Size: 64x64", out.infotext)).params
    assert "ControlNet 0" not in params and LINEART_CONTROLNET_KEY in params


def test_lineart_post_processor_by_img2img_records_no_controlnet(tiny_pipe, drawing, tmp_path, monkeypatch):
    from aipaint_plugins.lineart.colour import LINEART_CONTROLNET_KEY

    from aipaint.engine.postprocessing import run_postprocessors
    from aipaint.infotext import Infotext
    from aipaint.plugin.postprocess import merge_infotext

    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))  # none installed: img2img
    out = run_postprocessors(drawing, [("lineart", {"prompt": "a red circle", "steps": 2, "seed": 1})], tiny_pipe)
    assert out.infotext["Lineart"] == "img2img, lines multiplied" and LINEART_CONTROLNET_KEY not in out.infotext
    # After an img2img generation the chain keeps that generation's own strength.
    params = Infotext.from_text(merge_infotext("a red circle\nSteps: 2, Seed: 1, Denoising strength: 0.3", out.infotext)).params
    assert params["Denoising strength"] == "0.3" and params["Lineart denoising strength"] == "0.8"
