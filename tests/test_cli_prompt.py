"""The command line's prompt front ends: ``--mj`` on generation commands and ``aipaint prompt``."""

from __future__ import annotations

from PIL import Image

from aipaint.cli.main import main
from aipaint.infotext import Infotext, read_png_parameters


def test_generate_mj_aspect_ratio_scales_the_model_default_size(tmp_path, capsys):
    """The embedded model's default is 32x32, so --ar 16:9 means about 32² pixels (not 512²)."""
    out = tmp_path / "wide.png"
    args = ["generate", "a big red circle on the left, on a white background --ar 16:9 --seed 3", "--mj",
            "--steps", "2", "-o", str(out), "--no-progress"]
    assert main(args) == 0
    assert Image.open(out).size == (40, 24)
    info = Infotext.from_text(read_png_parameters(out))
    assert info.params["Size"] == "40x24" and info.params["Seed"] == "3"
    assert "--ar" not in info.prompt


def test_generate_mj_explicit_size_wins(tmp_path):
    out = tmp_path / "explicit.png"
    args = ["generate", "a red square --ar 16:9", "--mj", "-W", "32", "-H", "16", "--steps", "1", "--seed", "1",
            "-o", str(out), "--no-progress"]
    assert main(args) == 0
    assert Image.open(out).size == (32, 16)


def test_prompt_mj_prints_the_resolved_size_and_seed(capsys):
    assert main(["prompt", "--mj", "--no-tokens", "a red cat::3 a blue dog --ar 16:9 --seed 7 --no blur"]) == 0
    out = capsys.readouterr().out
    assert "negative prompt: blur" in out
    assert "size: 40x24 (--ar 16:9 at the pixel count of the model's default 32x32)" in out
    assert "seed: 7" in out
    assert "Sub-prompt 1 of 2, guidance weight 0.75" in out


def test_prompt_mj_without_options_says_default_size_and_random_seed(capsys):
    assert main(["prompt", "--mj", "--no-tokens", "a cat"]) == 0
    out = capsys.readouterr().out
    assert "size: 32x32 (the model's default; no --ar given)" in out
    assert "seed: random (no --seed given)" in out


def test_prompt_mj_steps_set_the_schedule_shown(capsys):
    assert main(["prompt", "--mj", "--no-tokens", "a [cat:dog:0.5] --steps 8"]) == 0
    assert "steps 0-4 of 0-7" in capsys.readouterr().out
