"""A family's own load settings (``aipaint.load(..., t5=False)``, CLI ``--load-option t5=false``):
declared by the family (``ModelFamily.load_options``), refused before loading when the family does
not take them, and passed through from the command line."""

from __future__ import annotations

import pytest
from test_sd3 import build_tiny_sd3_components

import aipaint
from aipaint.cli.main import main
from aipaint.errors import InvalidParameter


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    from diffusers import StableDiffusion3Pipeline

    root = tmp_path_factory.mktemp("tiny-sd3-load") / "sd3"
    StableDiffusion3Pipeline(**build_tiny_sd3_components(0)).save_pretrained(root)
    return root


def test_a_setting_the_family_does_not_take_is_refused_before_loading(tiny_sd_path, plugin_host, monkeypatch):
    family = plugin_host.registry.families.get("sd15")

    def no_load(*args, **kwargs):
        raise AssertionError("loaded before the settings were checked")

    monkeypatch.setattr(type(family), "load", no_load)
    with pytest.raises(InvalidParameter, match=r"t5.*not a load option of the sd15 family \(its own: none"):
        aipaint.load(tiny_sd_path, host=plugin_host, t5=False)
    with pytest.raises(InvalidParameter, match="stage2"):
        aipaint.load(tiny_sd_path, host=plugin_host, stage2="x")


def test_sd3_takes_its_own_settings_and_names_them_when_one_is_misspelt(sd3_path, plugin_host):
    with pytest.raises(InvalidParameter, match=r"its own: t5, text_encoder_device"):
        aipaint.load(sd3_path, host=plugin_host, t5_encoder=False)
    assert aipaint.load(sd3_path, host=plugin_host, t5=False).model.text_encoder_3 is None


def test_the_command_line_passes_load_options_to_the_family(sd3_path, tmp_path, capsys, monkeypatch):
    seen = {}
    real = aipaint.load

    def recording_load(source=None, **options):
        seen.update(options)
        return real(source, **options)

    monkeypatch.setattr(aipaint, "load", recording_load)
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "-m", str(sd3_path), "--load-option", "t5=false", "--load-option",
                 "text_encoder_device=cpu", "--steps", "2", "--width", "32", "--height", "32", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert seen["t5"] is False and seen["text_encoder_device"] == "cpu" and out.is_file()
    code = main(["generate", "a red circle", "-m", str(sd3_path), "--load-option", "device=cuda", "-o", str(tmp_path / "b.png")])
    assert code != 0 and "has its own flag" in capsys.readouterr().err
    code = main(["generate", "a red circle", "-m", str(sd3_path), "--load-option", "tee5=false", "-o", str(tmp_path / "c.png")])
    assert code != 0 and "not a load option of the sd3 family" in capsys.readouterr().err
