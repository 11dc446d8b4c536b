"""ControlNet preprocessors: what each algorithm makes of known images, and the registry's contract."""

from __future__ import annotations

import numpy as np
import pytest
from aipaint_plugins.shapes_world.render import render
from aipaint_plugins.shapes_world.scene import Scene, SceneObject
from PIL import Image

from aipaint.errors import ImageError, InvalidParameter, MissingWeights, UnknownName

SIZE = 128  # render at 4x the world's 32 px: edges are then placed to within a pixel
SCALE = SIZE / 32


@pytest.fixture(scope="module")
def registry():
    from aipaint.plugin.host import create_plugin_host

    return create_plugin_host().registry.preprocessors


def square_scene(colour="red", background="white", cx=10.0, cy=16.0, extent=14.0) -> Scene:
    return Scene(background, (SceneObject("square", colour, "big", "left", cx, cy, extent),))


def boundary_distance(cx=10.0, cy=16.0, extent=14.0) -> np.ndarray:
    """Distance (px at SIZE) of every pixel centre from the square's outline."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    half = extent / 2 * SCALE
    dx, dy = np.abs(xs - cx * SCALE), np.abs(ys - cy * SCALE)
    inside = np.maximum(dx, dy) <= half
    outside_dist = np.hypot(np.clip(dx - half, 0, None), np.clip(dy - half, 0, None))
    return np.where(inside, half - np.maximum(dx, dy), outside_dist)


def white(image: Image.Image, threshold: int = 127) -> np.ndarray:
    a = np.asarray(image.convert("RGB"))
    assert (a[:, :, 0] == a[:, :, 1]).all() and (a[:, :, 1] == a[:, :, 2]).all()  # a gray map
    return a[:, :, 0] > threshold


def all_round(lines: np.ndarray, reach: int = 3) -> bool:
    """Each side of the square (cx=10, cy=16, extent 14) has line pixels along ≥ 90% of its length."""
    left, right = round((10 - 7) * SCALE), round((10 + 7) * SCALE)
    top, bottom = round((16 - 7) * SCALE), round((16 + 7) * SCALE)
    sides = (
        lines[top:bottom, left - reach:left + reach].any(axis=1),
        lines[top:bottom, right - reach:right + reach].any(axis=1),
        lines[top - reach:top + reach, left:right].any(axis=0),
        lines[bottom - reach:bottom + reach, left:right].any(axis=0),
    )
    return all(side.mean() > 0.9 for side in sides)


@pytest.mark.parametrize(("colour", "background"), [("red", "white"), ("cyan", "gray"), ("yellow", "black")])
def test_canny_finds_the_edges_of_a_rendered_square(registry, colour, background):
    edges = white(registry.get("canny").apply(render(square_scene(colour, background), SIZE)))
    distance = boundary_distance()
    assert edges.sum() > 0
    assert distance[edges].max() <= 1.5  # every edge pixel lies on the outline
    assert all_round(edges, reach=2)  # and the outline is found all round


def test_canny_thresholds_matter(registry):
    faint = np.full((64, 64, 3), 128, np.uint8)
    faint[16:48, 16:48] = 140  # a low-contrast square
    image = Image.fromarray(faint)
    low = white(registry.get("canny").apply(image, {"low_threshold": 20, "high_threshold": 40}))
    high = white(registry.get("canny").apply(image, {"threshold_a": 250, "threshold_b": 255}))
    assert low.sum() > 2 * high.sum()


def test_scribble_draws_thick_strokes_along_the_outline(registry):
    image = render(square_scene(), SIZE)
    strokes = white(registry.get("scribble").apply(image))
    edges = white(registry.get("canny").apply(image))
    distance = boundary_distance()
    assert strokes.sum() > 2 * edges.sum()  # thicker than bare edges
    assert distance[strokes].max() <= 4  # but still along the outline
    assert not strokes[distance > 6].any()  # the square's middle and the background stay empty
    wide = white(registry.get("scribble").apply(image, {"stroke_width": 9}))
    assert wide.sum() > 1.5 * strokes.sum()


@pytest.mark.parametrize(("colour", "background"), [("red", "white"), ("cyan", "gray"), ("yellow", "black")])
def test_lineart_outlines_the_square_and_nothing_else(registry, colour, background):
    lines = white(registry.get("lineart").apply(render(square_scene(colour, background), SIZE)), threshold=0)
    distance = boundary_distance()
    assert lines.sum() > 0
    assert distance[lines].max() <= 4
    assert all_round(lines)  # a line all round, not a few dots


def test_lineart_drops_specks(registry):
    rng = np.random.default_rng(0)
    noisy = np.full((64, 64, 3), 255, np.uint8)
    for y, x in rng.integers(2, 62, size=(10, 2)):
        noisy[y, x] = 150  # isolated single dark pixels
    assert not white(registry.get("lineart").apply(Image.fromarray(noisy))).any()


def test_invert_and_none(registry):
    drawing = Image.fromarray(np.full((16, 16, 3), 255, np.uint8))
    assert np.asarray(registry.get("invert").apply(drawing)).max() == 0
    assert np.array_equal(np.asarray(registry.get("none").apply(drawing)), np.asarray(drawing))


def test_tile_removes_detail_but_keeps_size_and_colour(registry):
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = Image.fromarray(np.dstack([checker] * 3))
    tiled = np.asarray(registry.get("tile").apply(image, {"down_sampling_rate": 4}), np.float32)
    assert tiled.shape == (64, 64, 3)
    assert tiled.std() < 20 and abs(tiled.mean() - 127.5) < 10
    assert np.array_equal(np.asarray(registry.get("tile").apply(image)), np.asarray(image))  # rate 1: unchanged
    blurred = np.asarray(registry.get("tile").apply(image, {"blur_sigma": 2}), np.float32)
    assert blurred.std() < 20


def test_qrcode_passes_codes_and_refuses_photos(registry):
    import cv2

    code = cv2.QRCodeEncoder.create().encode("https://example.org/aipaint")
    code = cv2.resize(code, (code.shape[1] * 4, code.shape[0] * 4), interpolation=cv2.INTER_NEAREST)
    image = Image.fromarray(code).convert("RGB")
    assert np.array_equal(np.asarray(registry.get("qrcode").apply(image)), np.asarray(image))
    with pytest.raises(ImageError, match="black-and-white"):
        registry.get("qrcode").apply(render(square_scene("red", "gray"), 64))


def test_inpaint_marks_the_masked_area_unknown(registry):
    from aipaint_plugins.controlnet.units import control_tensor

    image = render(square_scene(), 32)
    with pytest.raises(ImageError, match="needs a mask"):
        registry.get("inpaint").apply(image)
    with pytest.raises(ImageError, match="empty"):
        registry.get("inpaint").apply(image, mask=Image.new("L", (32, 32), 0))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 10, 32))
    out = registry.get("inpaint").apply(image, mask=mask)
    assert out.mode == "RGBA"
    tensor = control_tensor([out])[0]
    assert (tensor[:, :, :10] == -1).all()
    assert np.allclose(tensor[:, :, 10:].permute(1, 2, 0).numpy(), np.asarray(image)[:, 10:] / 255)


def test_unknown_preprocessor_lists_the_valid_ones(registry):
    with pytest.raises(UnknownName) as info:
        registry.get("depth_leres_unknown")
    assert {"canny", "scribble", "lineart", "tile", "qrcode", "inpaint", "none"} <= set(info.value.valid)


def test_a1111_names_are_accepted(registry):
    assert registry.get("lineart_standard").name == "lineart"
    assert registry.get("tile_resample").name == "tile"
    assert registry.get("inpaint_only").name == "inpaint"


@pytest.mark.parametrize(
    "params", [{"low_threshold": 0}, {"low_threshold": "high"}, {"sigma": 1}, {"low_threshold": 10, "threshold_a": 10}]
)
def test_bad_settings_are_refused(registry, params):
    with pytest.raises(InvalidParameter):
        registry.get("canny").apply(render(square_scene(), 32), params)


def test_minus_one_means_the_default_as_in_a1111(registry):
    image = render(square_scene(), 64)
    default = registry.get("canny").apply(image)
    assert np.array_equal(np.asarray(registry.get("canny").apply(image, {"threshold_a": -1, "threshold_b": -1})),
                          np.asarray(default))


# --------------------------------------------------------------------------- weight-needing plugins
class DepthPlugin:
    """What a third-party depth preprocessor looks like: it needs a weights file."""

    from aipaint import hookimpl

    @staticmethod
    @hookimpl
    def register_preprocessors(register):
        from aipaint.plugin.preprocess import PreprocessorSpec, find_weights

        def depth(image, params, mask):
            weights = find_weights("preprocessor 'depth_test'", "depth_test_v1.onnx",
                                   "download it from https://example.org/depth_test_v1.onnx")
            value = len(weights.read_bytes()) % 256  # stands in for running the network
            return Image.new("RGB", image.size, (value,) * 3)

        register(PreprocessorSpec("depth_test", depth, weights=("depth_test_v1.onnx",), description="test depth"))


def test_weight_needing_preprocessor_from_a_plugin_names_the_missing_file(tmp_path, monkeypatch):
    from aipaint.plugin.host import create_plugin_host

    monkeypatch.setenv("AIPAINT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AIPAINT_PREPROCESSOR_DIR", str(tmp_path / "weights"))
    host = create_plugin_host(extra_plugins=(DepthPlugin(),))
    spec = host.registry.preprocessors.get("depth_test")
    with pytest.raises(MissingWeights) as info:
        spec.apply(Image.new("RGB", (8, 8)))
    assert info.value.file == "depth_test_v1.onnx"
    assert str(tmp_path / "weights") in info.value.searched and "example.org" in str(info.value)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "depth_test_v1.onnx").write_bytes(b"x" * 300)
    assert spec.apply(Image.new("RGB", (8, 8))).getpixel((0, 0)) == (44, 44, 44)


def test_missing_preprocessor_weights_stop_a_generation_before_it_runs(tiny_pipe, tmp_path, monkeypatch):
    import aipaint
    from aipaint.plugin.adapters import AdapterUnit
    from aipaint.plugin.host import create_plugin_host

    monkeypatch.setenv("AIPAINT_HOME", str(tmp_path))
    monkeypatch.delenv("AIPAINT_PREPROCESSOR_DIR", raising=False)
    pipe = aipaint.Pipeline(tiny_pipe.model, create_plugin_host(extra_plugins=(DepthPlugin(),)))
    unit = AdapterUnit("controlnet", {"model": "anything", "image": Image.new("RGB", (32, 32)), "preprocessor": "depth_test"})
    with pytest.raises(MissingWeights, match="depth_test_v1.onnx"):
        pipe.txt2img("x", width=32, height=32, steps=2, adapters=(unit,))


def test_find_weights_takes_bare_file_names_only():
    from aipaint.plugin.preprocess import find_weights

    with pytest.raises(ValueError):
        find_weights("x", "../outside.onnx")


# --------------------------------------------------------------------------- resizing and the CLI
@pytest.mark.parametrize(("mode", "stripe_kept", "padded"), [("Crop and Resize", False, False),
                                                            ("Resize and Fill", True, True), ("Just Resize", True, False)])
def test_resize_modes(mode, stripe_kept, padded):
    from aipaint_plugins.controlnet.units import fit_image

    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 6, 32))  # a blue stripe at the left edge
    fitted = fit_image(wide, 32, 32, mode)
    assert fitted.size == (32, 32)
    assert fitted.getpixel((16, 16)) == (255, 0, 0)
    left = fitted.getpixel((0, 16))
    assert (left[2] > 200) == stripe_kept  # cropping removes the sides; stretching and fitting keep them
    if padded:  # a 2:1 image fitted into a square: bands above and below, in the border's (mostly red) colour
        band = {fitted.getpixel((x, y)) for x in range(32) for y in (0, 1, 2, 29, 30, 31)}
        assert len(band) == 1 and band.pop()[0] > 200


def test_preprocess_command(tmp_path, capsys, registry):
    from aipaint.cli.main import main

    source = tmp_path / "scene.png"
    render(square_scene(), SIZE).save(source)
    out = tmp_path / "edges.png"
    assert main(["preprocess", str(source), "-p", "canny", "-o", str(out), "--set", "low_threshold=80"]) == 0
    expected = registry.get("canny").apply(Image.open(source).convert("RGB"), {"low_threshold": 80})
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    assert main(["preprocess", str(source), "-p", "lineart", "-W", "64", "-H", "64"]) == 0
    assert (tmp_path / "scene-lineart.png").is_file() and Image.open(tmp_path / "scene-lineart.png").size == (64, 64)
    assert main(["preprocess", "--list"]) == 0
    listing = capsys.readouterr().out
    assert "canny" in listing and "low_threshold=100" in listing
    assert main(["preprocess", str(source), "-p", "nope"]) == 2
    assert "valid values are" in capsys.readouterr().err
