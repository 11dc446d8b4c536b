"""QR-code art (plugins/qrcode): every picture returned decodes to the payload."""

from __future__ import annotations

import numpy as np
import pytest
from aipaint_plugins.qrcode import code as qr_code
from aipaint_plugins.qrcode.art import RepairSettings, blend_weights, carry_code, qr_art, repair
from aipaint_plugins.qrcode.code import (
    QRPayloadTooLong,
    QRUnreadable,
    available_decoders,
    decode,
    decodes_to,
    make_code,
)
from PIL import Image

from aipaint.engine.postprocessing import run_postprocessors
from aipaint.errors import InvalidParameter, UnknownName

URL = "https://example.com"


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def test_code_is_made_at_error_correction_h_in_the_smallest_version():
    code = make_code(URL)
    assert code.version == 3  # 19 bytes at level H need version 3 (level L would fit version 1)
    assert code.size == 17 + 4 * 3 + 2 * 4
    plain = Image.fromarray(np.round(code.render(148) * 255).astype(np.uint8))
    assert decode(plain) == {name: URL for name in available_decoders()}
    assert code.function[0, 0] and code.function[4 + 3, 4 + 3]  # quiet zone and finder are fixed patterns


def test_payload_too_long_is_a_typed_error_that_says_what_to_do():
    with pytest.raises(QRPayloadTooLong, match="needs version 3") as info:
        make_code(URL, version=1)
    assert isinstance(info.value, InvalidParameter) and info.value.name == "payload"
    with pytest.raises(QRPayloadTooLong, match="too long for any QR code"):
        make_code("x" * 2000)
    with pytest.raises(QRPayloadTooLong, match="at least 74 px"):
        make_code(URL, image_size=64)
    with pytest.raises(InvalidParameter):
        make_code("")


def test_decoders_are_real_and_checked():
    assert "opencv" in available_decoders()
    blank = Image.new("RGB", (200, 200), "white")
    assert not decodes_to(blank, URL)
    with pytest.raises(UnknownName):
        decode(blank, ("phone",))


def test_the_art_alone_does_not_decode_and_the_repair_loop_raises_the_code(astronaut):
    art = carry_code(astronaut.resize((256, 256)), URL)
    assert art.attempts[0] == (0.1, False)  # the photograph barely carries the code at first
    assert decodes_to(art.image, URL)
    assert decode(art.image) == {name: URL for name in art.decoders}
    assert art.lowest_contribution <= art.contribution <= 1.0
    assert art.margin == pytest.approx(0.1, abs=1e-6)  # the safety margin above the least that decodes
    # Every attempt at or above the reported lowest contribution that was tried decoded.
    assert all(ok for c, ok in art.attempts if c >= art.lowest_contribution)
    # Module-preserving: between module centres the photograph still shows through.
    weights = blend_weights(make_code(URL), 256, art.contribution)
    assert weights.min() < 0.7 < weights.max() == 1.0


@pytest.mark.parametrize("size", [128, 320])
def test_carried_codes_decode_at_every_size(astronaut, size):
    art = carry_code(astronaut.resize((size, size)), URL, repair_settings=RepairSettings(safety=0.05))
    assert decodes_to(art.image, URL) and art.image.size == (size, size)


def test_a_code_that_cannot_decode_gives_a_clear_error(astronaut, monkeypatch):
    monkeypatch.setitem(qr_code.DECODERS, "opencv", lambda gray: None)
    with pytest.raises(QRUnreadable, match="did not decode even at full contribution"):
        repair(astronaut.resize((148, 148)), make_code(URL), decoders=("opencv",))


def test_qr_post_processor_on_a_photograph(plugin_host, astronaut):
    out = run_postprocessors(astronaut.resize((200, 150)), [f"qr:payload={URL},safety=0.05"], host=plugin_host)
    assert out.image.size == (150, 150)  # cropped to a centred square
    assert decodes_to(out.image, URL)
    assert out.infotext["QR code"] == "version 3, error correction H"
    assert float(out.infotext["QR margin"]) == pytest.approx(0.05, abs=1e-3)


def test_an_installed_qr_controlnet_is_found_by_name(tiny_pipe, tmp_path, monkeypatch):
    from aipaint.plugin.kit.diffusion import choose_controlnet, installed_controlnet

    if "controlnet" not in tiny_pipe.host.registry.adapters:
        pytest.skip("the ControlNet adapter plugin is not installed")
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    assert installed_controlnet(tiny_pipe, ("qr",)) is None  # none installed: QR art falls back to img2img
    (tmp_path / "control_v1p_sd15_qrcode_monster.safetensors").write_bytes(b"")
    (tmp_path / "control_lineart.safetensors").write_bytes(b"")
    assert choose_controlnet(tiny_pipe, "auto", ("qr",)) == "control_v1p_sd15_qrcode_monster"
    assert choose_controlnet(tiny_pipe, "auto", ("lineart",)) == "control_lineart"
    assert choose_controlnet(tiny_pipe, "none", ("qr",)) is None


def test_every_generated_qr_picture_decodes(tiny_pipe, tmp_path, monkeypatch):
    if not hasattr(tiny_pipe, "img2img"):
        pytest.skip("this aipaint has no Pipeline.img2img yet")
    from aipaint.infotext import Infotext

    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))  # no QR ControlNet installed: img2img
    results = qr_art(tiny_pipe, "hi", "a red circle", size=64, steps=2, seed=1, batch_size=3)
    assert len(results) == 3
    for art, text in results:
        assert decodes_to(art.image, "hi")
        params = Infotext.from_text(text).params
        assert params["QR method"] == "img2img" and params["Size"] == "64x64" and params["Denoising strength"] == "0.75"
        assert "ControlNet 0" not in params
        assert float(params["QR contribution"]) == pytest.approx(art.contribution, abs=1e-3)
    assert [Infotext.from_text(t).params["Seed"] for _, t in results] == ["1", "2", "3"]


@pytest.fixture(scope="module")
def qr_controlnet_dir(tmp_path_factory, tiny_pipe):
    """A ControlNet folder holding a tiny random ControlNet named as QR ones are."""
    if "controlnet" not in tiny_pipe.host.registry.adapters:
        pytest.skip("the ControlNet adapter plugin is not installed")
    from test_controlnet import _tiny_controlnet

    folder = tmp_path_factory.mktemp("qr-controlnet")
    _tiny_controlnet(tiny_pipe.model.unet, 1).save_pretrained(folder / "control_qr_tiny")
    return folder


def test_an_installed_qr_controlnet_draws_the_art_and_every_picture_decodes(tiny_pipe, qr_controlnet_dir, monkeypatch):
    from aipaint.infotext import Infotext

    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(qr_controlnet_dir))
    results = qr_art(tiny_pipe, "hi", "a red circle", size=64, steps=2, seed=1, batch_size=2)
    without = tiny_pipe.txt2img("a red circle", width=64, height=64, steps=2, seed=1, batch_size=2).images
    assert len(results) == 2
    for (art, text), free, seed in zip(results, without, ("1", "2")):
        assert decodes_to(art.image, "hi")
        assert art.attempts[-1] == (round(art.contribution, 4), True)  # the returned blend was verified
        assert art.margin == pytest.approx(0.1, abs=1e-6)
        # The ControlNet, not img2img, drew the art: it differs from the same seed drawn freely.
        assert np.abs(np.asarray(art.art, dtype=int) - np.asarray(free, dtype=int)).mean() > 5
        params = Infotext.from_text(text).params
        assert params["QR method"] == "controlnet control_qr_tiny" and params["Seed"] == seed
        assert params["ControlNet 0"].startswith("Module: none, Model: control_qr_tiny [")
        assert ", Weight: 1.3, " in params["ControlNet 0"]
        assert "Denoising strength" not in params and params["Size"] == "64x64"


def test_the_qr_controlnet_route_says_so_when_nothing_decodes(tiny_pipe, qr_controlnet_dir, monkeypatch):
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(qr_controlnet_dir))
    monkeypatch.setitem(qr_code.DECODERS, "opencv", lambda gray: None)
    with pytest.raises(QRUnreadable, match="'hi'.*did not decode even at full contribution"):
        qr_art(tiny_pipe, "hi", "a red circle", size=64, steps=2, seed=1, decoders=("opencv",))


def test_qr_command_records_the_controlnet_unit_in_the_png(tiny_sd_path, qr_controlnet_dir, tmp_path, monkeypatch):
    from aipaint.cli.main import main
    from aipaint.infotext import Infotext, read_png_parameters

    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(qr_controlnet_dir))
    out = tmp_path / "qr.png"
    assert main(["qr", "hi", "--prompt", "a red circle", "--size", "64", "--steps", "2", "--seed", "3",
                 "-m", str(tiny_sd_path), "-o", str(out)]) == 0
    assert decodes_to(Image.open(out), "hi")
    params = Infotext.from_text(read_png_parameters(out)).params
    assert params["QR method"] == "controlnet control_qr_tiny"
    assert params["ControlNet 0"].startswith("Module: none, Model: control_qr_tiny [")


def test_qr_command_carries_a_code_in_a_picture(tmp_path, astronaut):
    from aipaint.api.result import save_png
    from aipaint.cli.main import main
    from aipaint.infotext import Infotext, read_png_parameters

    source, out = tmp_path / "photo.png", tmp_path / "qr.png"
    save_png(astronaut.resize((160, 160)), source, "an astronaut\nSteps: 2, Seed: 4, Size: 160x160, Version: v1")
    assert main(["qr", URL, "--image", str(source), "-o", str(out)]) == 0
    assert decodes_to(Image.open(out), URL)
    info = Infotext.from_text(read_png_parameters(out))  # the picture's own parameters stay
    assert info.prompt == "an astronaut" and info.params["Seed"] == "4" and info.params["Version"] == "v1"
    assert info.params["QR method"] == "blend"
    assert main(["qr", "x" * 2000, "--image", str(source), "-o", str(out)]) == 2


def test_every_qr_picture_from_the_embedded_model_decodes(plugin_host, tmp_path, monkeypatch):
    from pathlib import Path

    if not (Path(__file__).resolve().parent.parent / "zoo" / "models" / "shapes-tiny" / "unet").is_dir():
        pytest.skip("the embedded shapes-tiny model is not trained yet (zoo/models/shapes-tiny)")
    import aipaint

    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    pipe = aipaint.load(host=plugin_host)
    results = qr_art(pipe, "aipaint", "a big red circle in the center, on a white background", size=64, steps=12,
                     seed=1, batch_size=2)
    for art, _ in results:
        assert decodes_to(art.image, "aipaint")
        assert art.lowest_contribution < 1.0  # the art carried part of the code: not just the plain code
