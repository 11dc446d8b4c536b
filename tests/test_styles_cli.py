"""``--style NAME`` on the generation commands: A1111's styles.csv merged into the prompts and
recorded in the PNG as A1111 records it (``Styles array``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from aipaint.cli.main import main
from aipaint.infotext import Infotext

EMBEDDED = Path(__file__).resolve().parents[1] / "zoo" / "models" / "shapes-tiny"

STYLES = """name,prompt,negative_prompt
white,"{prompt}, on a white background",blurry
big,a big,
"""


@pytest.fixture
def styles_csv(tmp_path) -> Path:
    path = tmp_path / "styles.csv"
    path.write_text(STYLES)
    return path


@pytest.mark.skipif(not (EMBEDDED / "unet").is_dir(), reason="the embedded model is not built")
def test_styles_are_merged_in_order_and_recorded(styles_csv, tmp_path, capsys):
    out = tmp_path / "styled.png"
    code = main(["generate", "a red circle on the left", "--style", "white", "--style", "big", "--styles-file",
                 str(styles_csv), "--steps", "3", "--seed", "5", "-o", str(out), "--no-progress"])
    assert code == 0
    info = Infotext.from_text(Image.open(out).info["parameters"])
    assert info.prompt == "a red circle on the left, on a white background, a big"
    assert info.negative_prompt == "blurry"
    assert json.loads(info.params["Styles array"]) == ["white", "big"]


@pytest.mark.skipif(not (EMBEDDED / "unet").is_dir(), reason="the embedded model is not built")
def test_the_styles_file_can_come_from_the_environment(styles_csv, tmp_path, monkeypatch):
    monkeypatch.setenv("AIPAINT_STYLES_FILE", str(styles_csv))
    out = tmp_path / "env.png"
    assert main(["generate", "x", "--style", "white", "--steps", "2", "-o", str(out), "--no-progress"]) == 0
    assert Infotext.from_text(Image.open(out).info["parameters"]).prompt == "x, on a white background"


def test_an_unknown_style_or_no_styles_file_is_one_line_before_any_model_loads(styles_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIPAINT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AIPAINT_STYLES_FILE", raising=False)
    assert main(["generate", "x", "--style", "nope", "--styles-file", str(styles_csv), "-m", "/nonexistent/model",
                 "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "style" in err and "'white'" in err and "'big'" in err and len(err.splitlines()) == 1
    assert main(["generate", "x", "--style", "white", "-o", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a styles file" in err and "styles.csv" in err and len(err.splitlines()) == 1


def test_batch_refuses_style_rather_than_dropping_it(styles_csv, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), "--style", "white", "--styles-file", str(styles_csv)]) == 2
    assert "does not apply --style" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
