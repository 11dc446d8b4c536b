"""``aipaint generate --post``: the chain is checked before any model is loaded or image drawn."""

from __future__ import annotations

import pytest

from aipaint.cli.main import main


class ModelLoaded(Exception):
    """Raised instead of loading a model: the command got past the chain check."""


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise ModelLoaded

    monkeypatch.setattr("aipaint.load", refuse)


@pytest.mark.parametrize(
    ("post", "named"),
    [
        ("facefx", "'facefx'"),  # an unknown post-processor: the valid names are listed
        ("face-restore:restorer=GFPGANv1.4,visiblity=0.5", "'visiblity'"),  # an unknown option
        ("upscale:scale", "'scale' is not key=value"),  # not NAME:key=value
        (":scale=2", "must be NAME"),
    ],
)
def test_a_bad_post_step_fails_before_the_model_is_loaded(no_model, tmp_path, capsys, post, named):
    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "--post", "upscale:upscaler=Nearest,scale=2", "--post", post, "-o", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("aipaint: error: invalid ") and err.count("\n") == 1 and named in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_the_error_lists_what_is_valid(no_model, capsys):
    assert main(["generate", "x", "--post", "facefx"]) == 2
    err = capsys.readouterr().err
    assert "'facefix'" in err and "'face-restore'" in err
    assert main(["generate", "x", "--post", "face-restore:visiblity=1"]) == 2
    assert "'visibility'" in capsys.readouterr().err


@pytest.mark.parametrize("post", ["adetailer:prompt=a face,inpaint_width=64", "Face-Restore:restorer=x,visibility=0.5", "qr"])
def test_a_valid_chain_goes_on_to_load_the_model(no_model, post):
    """Aliases, any case of a name, and every listed option pass the check."""
    with pytest.raises(ModelLoaded):
        main(["generate", "x", "--post", post])


def test_allow_pickle_reaches_the_steps_that_load_weight_files():
    """``--allow-pickle`` is the run's opt-in: the chain's steps that take ``allow_pickle`` get it,
    a step's own value wins, and without the flag nothing is switched on."""
    from aipaint.cli.api import check_post_chain

    chain = ["upscale:upscaler=x.pth", "sticker", "face-restore:restorer=y,allow_pickle=no"]
    upscale, sticker, restore = check_post_chain(chain, allow_pickle=True)
    assert upscale.options["allow_pickle"] is True
    assert "allow_pickle" not in sticker.options
    assert restore.options["allow_pickle"] == "no"
    assert all("allow_pickle" not in step.options for step in check_post_chain(chain[:2]))


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_the_image_commands_check_their_post_chain_first_too(no_model, tmp_path, capsys, command):
    from PIL import Image

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "white").save(image)
    extra = [str(image)] if command == "inpaint" else []  # the image doubles as the mask
    sides = ["--right", "8"] if command == "outpaint" else []
    assert main([command, str(image), *extra, "x", *sides, "--post", "facefx", "-o", str(tmp_path / "o.png")]) == 2
    assert "'facefx'" in capsys.readouterr().err and not (tmp_path / "o.png").exists()
    with pytest.raises(ModelLoaded):
        main([command, str(image), *extra, "x", *sides, "--post", "upscale:upscaler=Nearest,scale=2"])


def test_img2img_runs_the_post_chain_on_its_result(tmp_path, capsys):
    """On the embedded model: an img2img at 32x32 with a 2x upscale comes out 64x64, and its
    infotext records both the generation and the upscale."""
    from PIL import Image

    from aipaint.infotext import read_png_parameters

    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "white").save(image)
    out = tmp_path / "o.png"
    assert main(["img2img", str(image), "a big red circle in the center, on a white background", "--steps", "4",
                 "--seed", "3", "--no-progress", "--post", "upscale:upscaler=Nearest,scale=2", "-o", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    text = read_png_parameters(out)
    assert "Denoising strength: 0.75" in text and "Nearest" in text
