"""The aipaint command line."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from aipaint.cli.main import main


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "aipaint", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_is_quick_and_imports_no_torch():
    started = time.perf_counter()
    out = run_cli("--help")
    assert out.returncode == 0 and "generate" in out.stdout
    code = "import sys, aipaint.cli.main; aipaint.cli.main.build_parser(); print('torch' in sys.modules, 'diffusers' in sys.modules)"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "False False"
    assert time.perf_counter() - started < 20


def test_generate_then_info_then_from_png(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "a.png"
    args = ["generate", "a (red:1.2) circle", "-n", "blue", "-m", str(tiny_sd_path), "--steps", "3", "-W", "32", "-H", "32",
            "--seed", "5", "--sampler", "Euler", "-o", str(out), "--no-progress"]
    assert main(args) == 0
    assert out.is_file()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "a (red:1.2) circle" in text and "Negative prompt: blue" in text and "Seed: 5" in text

    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(out), "-m", str(tiny_sd_path), "-o", str(again), "--no-progress"]) == 0
    assert out.read_bytes() == again.read_bytes()


def test_from_png_options_override_the_file(tiny_sd_path, tmp_path, capsys):
    out = tmp_path / "a.png"
    main(["generate", "x", "-m", str(tiny_sd_path), "--steps", "2", "-W", "32", "-H", "32", "--seed", "1", "-o", str(out), "--no-progress"])
    second = tmp_path / "b.png"
    main(["generate", "--from-png", str(out), "--seed", "2", "-m", str(tiny_sd_path), "-o", str(second), "--no-progress"])
    main(["info", str(second)])
    assert "Seed: 2" in capsys.readouterr().out


def test_batch_writes_numbered_files(tiny_sd_path, tmp_path):
    out = tmp_path / "b.png"
    main(["generate", "x", "-m", str(tiny_sd_path), "--steps", "2", "-W", "32", "-H", "32", "--batch-size", "2", "-o", str(out),
          "--no-progress"])
    assert (tmp_path / "b-0.png").is_file() and (tmp_path / "b-1.png").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "x", "-W", "33"], "invalid width=33"),
        (["generate", "x", "--cfg", "40"], "invalid cfg_scale=40.0"),
        (["generate", "x", "--steps", "0"], "invalid steps=0"),
        (["generate", "x", "--sampler", "nope", "-W", "32", "-H", "32"], "valid values are"),
        (["generate", "x", "-m", "/no/such/model.safetensors"], "no model"),
        (["info", "/no/such/image.png"], "cannot read image"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message, tiny_sd_path, capsys):
    if "-m" not in args and args[0] == "generate":
        args = [*args, "-m", str(tiny_sd_path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aipaint: error:") and message in err
    assert "\n" not in err and "Traceback" not in err


def test_listing_commands(capsys):
    assert main(["samplers"]) == 0
    out = capsys.readouterr().out
    for name in ("Euler a", "DPM++ 2M", "DPM++ SDE", "DPM++ 2S a", "UniPC", "LCM", "PLMS", "DDIM", "Heun", "LMS", "DPM2 a"):
        assert name in out
    assert main(["plugins"]) == 0
    assert "sd15 [sd15]" in capsys.readouterr().out
    assert main(["zoo"]) == 0
    assert "shapes-tiny" in capsys.readouterr().out


def test_pickle_refused_in_cli(tmp_path, capsys):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"\x80\x04N.")
    assert main(["generate", "x", "-m", str(ckpt)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_generate_runs_the_post_processors_in_order(tiny_sd_path, tmp_path, capsys):
    """``--post`` chains after a generation: an upscale to 40x40, then hires fix ×2, gives
    80x80 (the other order would give 40x40), and both record their A1111 keys."""
    from PIL import Image

    from aipaint.infotext import Infotext, read_png_parameters

    out = tmp_path / "post.png"
    assert main(["generate", "a red circle", "-m", str(tiny_sd_path), "--steps", "2", "-W", "32", "-H", "32", "--seed", "3",
                 "--post", "upscale:upscaler=Nearest,resize_to=40x40",
                 "--post", "hires:scale=2,upscaler=Latent (nearest),hires_steps=2,denoising_strength=0.5",
                 "-o", str(out), "--no-progress"]) == 0
    assert Image.open(out).size == (80, 80)
    params = Infotext.from_text(read_png_parameters(out)).params
    assert params["Postprocess upscaler"] == "Nearest" and params["Postprocess upscale to"] == "40x40"
    assert (params["Hires upscale"], params["Hires upscaler"], params["Hires steps"], params["Denoising strength"]) == (
        "2", "Latent (nearest)", "2", "0.5")
    assert params["Size"] == "32x32" and params["Seed"] == "3" and list(params)[-1] == "Version"
    capsys.readouterr()
    typo = tmp_path / "typo.png"
    assert main(["generate", "x", "-m", str(tiny_sd_path), "-W", "32", "-H", "32", "--post", "upscale:scael=2",
                 "-o", str(typo), "--no-progress"]) == 2
    assert "scael" in capsys.readouterr().err and not typo.exists()
