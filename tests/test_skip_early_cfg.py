"""Skip Early CFG (A1111's "Ignore negative prompt during early sampling"): the first steps of
a run, up to a fraction of it, are taken on the prompt alone, without the negative rows."""

from __future__ import annotations

import numpy as np
import pytest

from aipaint.api.request import GenerationRequest
from aipaint.errors import InvalidParameter
from aipaint.infotext import Infotext, generation_kwargs

KW = dict(width=32, height=32, steps=4, seed=3, cfg_scale=7.0, sampler="DPM++ 2M")


def pixels(result) -> np.ndarray:
    return np.asarray(result.image, dtype=np.int16)


@pytest.fixture
def unet_rows(tiny_pipe, monkeypatch):
    """The number of latent rows of each UNet call (batch 1: 1 unguided, 2 guided)."""
    rows: list[int] = []
    predict = tiny_pipe.model.predict

    def counting(latents, t, cond, **extra):
        rows.append(latents.shape[0])
        return predict(latents, t, cond, **extra)

    monkeypatch.setattr(tiny_pipe.model, "predict", counting)
    return rows


def test_the_early_steps_run_without_the_negative_rows(tiny_pipe, unet_rows):
    tiny_pipe.txt2img("a red circle", negative_prompt="blue", skip_early_cfg=0.5, **KW)
    # As A1111: steps with step / steps <= 0.5 (0/4, 1/4, 2/4) are unguided.
    assert unet_rows == [1, 1, 1, 2]
    unet_rows.clear()
    tiny_pipe.txt2img("a red circle", negative_prompt="blue", **KW)
    assert unet_rows == [2, 2, 2, 2]


def test_skipping_every_step_is_cfg_1_and_part_of_them_is_neither(tiny_pipe):
    guided = tiny_pipe.txt2img("a red circle", negative_prompt="blue", **KW)
    unguided = tiny_pipe.txt2img("a red circle", negative_prompt="blue", **{**KW, "cfg_scale": 1.0})
    all_skipped = tiny_pipe.txt2img("a red circle", negative_prompt="blue", skip_early_cfg=1.0, **KW)
    half = tiny_pipe.txt2img("a red circle", negative_prompt="blue", skip_early_cfg=0.3, **KW)
    assert np.array_equal(pixels(all_skipped), pixels(unguided))
    assert not np.array_equal(pixels(guided), pixels(unguided))
    assert not np.array_equal(pixels(half), pixels(guided)) and not np.array_equal(pixels(half), pixels(unguided))


def test_img2img_counts_the_fraction_over_the_steps_it_runs(tiny_pipe, unet_rows):
    init = tiny_pipe.txt2img("a red circle", **{**KW, "cfg_scale": 1.0}).image
    unet_rows.clear()
    tiny_pipe.img2img(init, "a blue square", denoising_strength=0.5, skip_early_cfg=0.25, **{**KW, "steps": 8})
    assert unet_rows == [1, 1, 2, 2]  # 4 of the 8 steps run; 0/4 and 1/4 are unguided


def test_recorded_in_the_png_and_read_back(tiny_pipe):
    result = tiny_pipe.txt2img("a red circle", skip_early_cfg=0.25, **KW)
    info = Infotext.from_text(result.parameters)
    assert info.params["Skip Early CFG"] == "0.25"
    assert generation_kwargs(info)["skip_early_cfg"] == 0.25
    assert "Skip Early CFG" not in Infotext.from_text(tiny_pipe.txt2img("a red circle", **KW).parameters).params
    at_cfg_1 = tiny_pipe.txt2img("a red circle", skip_early_cfg=0.25, **{**KW, "cfg_scale": 1.0})
    assert "Skip Early CFG" not in Infotext.from_text(at_cfg_1.parameters).params  # nothing to skip


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_out_of_range_is_refused(value):
    with pytest.raises(InvalidParameter, match="skip_early_cfg"):
        GenerationRequest("x", skip_early_cfg=value)


def test_cli_option(tiny_sd_path, tmp_path):
    from aipaint.cli.main import main
    from aipaint.infotext import read_png_parameters

    out = tmp_path / "a.png"
    assert main(["generate", "a red circle", "-m", str(tiny_sd_path), "-W", "32", "-H", "32", "--steps", "2",
                 "--seed", "1", "--skip-early-cfg", "0.5", "-o", str(out), "--no-progress"]) == 0
    assert Infotext.from_text(read_png_parameters(out)).params["Skip Early CFG"] == "0.5"
