"""aipaint.explain and ``aipaint explain``: the views are what they claim to be, on the embedded model."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import aipaint
from aipaint import explain
from aipaint.errors import InvalidParameter, UnknownName, UnsupportedFeature

PROMPT = "a big red circle on the left, on a white background"


@pytest.fixture(scope="module")
def pipe(plugin_host):
    return aipaint.load(host=plugin_host)


@pytest.fixture(scope="module")
def square(pipe):
    return pipe.txt2img("a big blue square on the right, on a white background", seed=2, steps=8).image


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# --- the forward process ------------------------------------------------------------------------
def test_the_forward_strip_is_the_schedulers_add_noise(pipe, square):
    from diffusers import DDPMScheduler

    timesteps = [0, 250, 600, 999]
    result = explain.noise(pipe, square, timesteps=timesteps, seed=3)
    data = result.data
    scheduler = DDPMScheduler.from_config(pipe.model.scheduler_config)  # the model's own training schedule
    clean, noise = torch.from_numpy(data["clean_latents"]), torch.from_numpy(data["noise"])
    for i, t in enumerate(timesteps):
        expected = scheduler.add_noise(clean, noise, torch.tensor([t]))
        np.testing.assert_allclose(data["latents"][i : i + 1], expected.numpy(), rtol=0, atol=1e-6)
    # the clean latents are the image's, the noise is the seed's
    pixels_in = torch.from_numpy(pixels(square).astype(np.float32) / 255).permute(2, 0, 1)[None]
    np.testing.assert_allclose(data["clean_latents"], pipe.model.encode(pixels_in).detach().numpy(), atol=1e-5)
    np.testing.assert_array_equal(data["noise"], torch.randn(clean.shape, generator=torch.Generator().manual_seed(3)))
    # the SNR is the schedule's and falls with t; the last timestep is (almost) pure noise
    assert np.all(np.diff(data["snr"]) < 0)
    for i, t in enumerate(timesteps[1:], start=1):
        alpha = scheduler.alphas_cumprod[t].item()
        assert data["snr"][i] == pytest.approx(alpha / (1 - alpha))
    assert data["snr"][-1] < 1e-3
    np.testing.assert_allclose(data["latents"][-1], data["noise"][0], atol=0.05 * np.abs(data["clean_latents"]).max())
    # the t = 0 frame is the image again (through the VAE); the last is not
    assert np.abs(pixels(result.images["noised"][0]) - pixels(square)).mean() < 12
    assert np.abs(pixels(result.images["noised"][-1]) - pixels(square)).mean() > 30
    assert result.columns == [f"t {t}" for t in timesteps]
    assert result.sheet.width > 4 * 128


@pytest.mark.parametrize("bad", [[], [1000], [-1], [0.5], list(range(40))])
def test_the_forward_view_refuses_bad_timesteps(pipe, square, bad):
    with pytest.raises(InvalidParameter, match="timesteps"):
        explain.noise(pipe, square, timesteps=bad)


# --- a generation step by step ------------------------------------------------------------------
def test_the_denoise_strips_last_column_is_the_generated_image(pipe, tmp_path):
    result = explain.denoise(pipe, PROMPT, seed=5, steps=6, at=[1, 3, 6])
    plain = pipe.txt2img(PROMPT, seed=5, steps=6).image
    assert np.array_equal(pixels(result.images["latents"][-1]), pixels(plain))
    assert np.array_equal(pixels(result.images["result"][0]), pixels(plain))
    data = result.data
    assert data["latents"].shape == data["x0"].shape == (6, pipe.model.latent_channels, 8, 8)
    assert list(data["shown"]) == [1, 3, 6] and result.columns == ["step 1/6", "step 3/6", "step 6/6"]
    sigmas, schedule = data["sigmas"], data["schedule"]
    assert len(schedule) == 7 and schedule[-1] == 0 and sigmas[-1] == 0
    assert np.all(np.diff(sigmas) < 0)  # the noise clears at every step
    np.testing.assert_allclose(sigmas, schedule[1:])  # after step k the latents are at the schedule's k-th sigma
    # the first columns are not the result yet
    assert np.abs(pixels(result.images["latents"][0]) - pixels(plain)).mean() > 10
    # one animation frame a step, as GIF and as WebP
    from PIL import Image

    assert len(result.frames) == 6
    for name in ("run.gif", "run.webp"):
        path = result.save_animation(tmp_path / name)
        with Image.open(path) as movie:
            assert movie.n_frames == 6
    assert result.save(tmp_path / "sheet.png").stat().st_size > 1000


def test_second_order_samplers_report_twice_a_step(pipe):
    result = explain.denoise(pipe, PROMPT, seed=5, steps=4, sampler="Heun", animation=False)
    assert len(result.data["sigmas"]) == 7  # Heun reports after its first and its correcting evaluation
    assert result.data["sigmas"][-1] == 0 and len(result.data["schedule"]) == 5
    assert result.frames == []


# --- cross-attention ------------------------------------------------------------------------------
def test_attention_maps_sum_to_one_and_leave_the_picture_alone(pipe):
    unet = pipe.model.unet
    before = dict(unet.attn_processors)
    result = explain.attention(pipe, PROMPT, seed=4, steps=6, layers="all", combine="probability")
    assert dict(unet.attn_processors) == before  # the model's processors are back
    run = result.data["runs"][0]
    assert np.array_equal(pixels(run["image"]), pixels(pipe.txt2img(PROMPT, seed=4, steps=6).image))
    assert len(run["layers"]) == 10  # every cross-attention layer of the embedded UNet
    (phase,) = run["phases"]
    token_maps = phase["token_maps"]
    assert token_maps.shape == (77, 8, 8)
    np.testing.assert_allclose(token_maps.sum(0), 1.0, atol=1e-4)  # each pixel's attention over the tokens
    words = [w.text for w in phase["words"]]
    assert words == ["a", "big", "red", "circle", "on", "the", "left", ",", "on", "a", "white", "background"]
    red = phase["words"][2]
    assert red.positions == (3,)  # after BOS, "a", "big"
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(token_maps[list(red.positions)].sum(0))[None, None],
                                                size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(phase["word_maps"][2], upsampled.numpy(), atol=1e-6)
    assert phase["steps"] == [1, 2, 3, 4, 5, 6]
    # the sheet shows the content words only
    assert [c for c, shown in zip(words, phase["shown"]) if shown] == ["big", "red", "circle", "left", "white",
                                                                        "background"]


def test_the_processors_come_back_after_an_error(pipe):
    from aipaint.explain.crossattn import CrossAttentionRecord, record_cross_attention

    unet = pipe.model.unet
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError), record_cross_attention(unet, CrossAttentionRecord((8, 8)), "finest"):
        assert dict(unet.attn_processors) != before
        raise RuntimeError("boom")
    assert dict(unet.attn_processors) == before


COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("on the left", "on the right", "at the top", "at the bottom")


def colour_word_readings(pipe, layers: str, combine: str = "auto") -> tuple[list[bool], list[bool]]:
    """For 16 one-object prompts (each colour at each position, seeds 0-15, 10 steps): does the
    colour word's map peak inside the box of the object the evaluator finds (from pixels only),
    and is its mean higher on the object's pixels than off them?"""
    from aipaint_plugins.shapes_world.evaluate import read_scene

    peaks, higher = [], []
    for i, (colour, position) in enumerate((c, p) for c in COLOURS for p in POSITIONS):
        prompt = f"a big {colour} {SHAPES[i % 4]} {position}, on a white background"
        run = explain.attention(pipe, prompt, seed=i, steps=10, layers=layers, combine=combine,
                                words=[colour]).data["runs"][0]
        (phase,) = run["phases"]
        reading = read_scene(run["image"])
        assert reading.objects, prompt
        found = max(reading.objects, key=lambda o: o.area)
        k = [w.text for w in phase["words"]].index(colour)
        x, y = phase["peaks"][k]
        peaks.append(abs(x + 0.5 - found.cx) <= found.extent / 2 and abs(y + 0.5 - found.cy) <= found.extent / 2)
        on_object = np.linalg.norm(pixels(run["image"]) - np.array(reading.background_rgb), axis=2) > 60
        word_map = phase["word_maps"][k]
        higher.append(word_map[on_object].mean() > word_map[~on_object].mean())
    return peaks, higher


def test_the_colour_words_map_peaks_on_the_object_the_evaluator_finds(pipe):
    """With the defaults (the embedded model's card: all of the decoder's layers, each standardised)
    the peak lands in the object's box in 16 of these 16 images at 10 steps (the box covers about
    18% of the image); on 100 prompts of every colour, shape and position at 20 steps, 82%, and 80%
    on 100 held-out ones (benchmarks/explain_attention_peaks.py: the yellow and purple prompts,
    which these 16 do not have, are the hard ones). The test asks for 13 of 16."""
    peaks, _ = colour_word_readings(pipe, "auto")
    assert sum(peaks) >= 13, peaks


def test_the_colour_words_map_is_higher_on_the_object(pipe):
    """The embedded model paints colour in its finest decoder layers: there the colour word's
    map is higher on the object than off it in 16 of these 16 images."""
    _, higher = colour_word_readings(pipe, "finest", "probability")
    assert np.mean(higher) >= 0.9, higher


def test_auto_takes_the_cards_layers_and_standardises_each_layers_map(pipe):
    from types import SimpleNamespace

    from aipaint.explain.crossattn import attention_settings

    run = explain.attention(pipe, PROMPT, seed=4, steps=4).data["runs"][0]
    assert run["combine"] == "standardised" == pipe.model.card["explain"]["attention"]["combine"]
    assert pipe.model.card["explain"]["attention"]["layers"] == "up"  # the decoder's layers, of every size
    assert run["layers"] and all(name.startswith("up_blocks.") for name in run["layers"])
    assert {name.split(".")[1] for name in run["layers"]} == {"0", "1", "2"}
    (phase,) = run["phases"]
    # each layer's map is rescaled to mean 0 and spread 1 before the layers are averaged (where the
    # layers disagree, as the 2×2 and 8×8 ones do, the average spreads less)
    for word_map in phase["word_maps"]:
        assert abs(float(word_map.mean())) < 1e-4 and 0.2 < float(word_map.std()) <= 1.0 + 1e-4
    np.testing.assert_allclose(phase["token_maps"].sum(0), 1.0, atol=1e-4)  # the token maps stay probabilities
    flat = int(np.argmax(phase["word_maps"][2]))
    assert phase["peaks"][2] == (flat % 32, flat // 32)
    # a model without such a card entry gets the decoder's layers, averaged as probabilities
    assert attention_settings(SimpleNamespace(card=None), "auto", "auto") == ("up", "probability")
    assert attention_settings(SimpleNamespace(card={}), "finest", "standardised") == ("finest", "standardised")
    with pytest.raises(InvalidParameter, match="combine"):
        attention_settings(SimpleNamespace(card=None), "up", "median")


def test_emphasis_and_prompt_editing_show_in_the_maps(pipe):
    result = explain.attention(pipe, [PROMPT, "a big (red:1.5) circle on the left", "a big [red:blue:0.5] circle"],
                               seed=6, steps=6)
    plain, emphasised, edited = result.data["runs"]
    assert len({run["seed"] for run in result.data["runs"]}) == 1  # compared with one seed
    red = plain["phases"][0]["words"][2]
    assert (red.text, red.weight, red.label) == ("red", 1.0, "red")
    strong = emphasised["phases"][0]["words"][2]
    assert (strong.text, strong.weight, strong.label) == ("red", 1.5, "red ×1.5")
    assert [p["text"] for p in edited["phases"]] == ["a big red circle", "a big blue circle"]
    first, second = (p["steps"] for p in edited["phases"])
    assert first + second == [1, 2, 3, 4, 5, 6] and first and second
    assert not np.allclose(plain["phases"][0]["word_maps"][2], emphasised["phases"][0]["word_maps"][2])
    assert "a big blue circle" in result.images and len(result.images["result"]) == 3


def test_attention_refuses_what_it_cannot_follow(pipe, monkeypatch):
    from types import SimpleNamespace

    with pytest.raises(UnsupportedFeature, match="latent diffusion model"):
        explain.denoise(SimpleNamespace(model=object()), PROMPT)
    with monkeypatch.context() as patch:
        patch.setattr(pipe.model, "runtime", "onnxruntime")
        with pytest.raises(UnsupportedFeature, match="torch UNet"):
            explain.attention(pipe, PROMPT)
    with pytest.raises(InvalidParameter, match="batch_size"):
        explain.attention(pipe, PROMPT, batch_size=2)
    with pytest.raises(InvalidParameter, match="layers"):
        explain.attention(pipe, PROMPT, layers="sideways")
    with pytest.raises(InvalidParameter, match="at"):
        explain.attention(pipe, PROMPT, steps=4, at=[5])


# --- samplers and CFG ---------------------------------------------------------------------------------
def test_samplers_side_by_side(pipe):
    from diffusers import EulerDiscreteScheduler

    result = explain.samplers(pipe, PROMPT, samplers=["Euler", "DDIM"], schedules=["Automatic", "Karras"], steps=4,
                              seed=7, columns=2)
    runs = {run["name"]: run for run in result.data["runs"]}
    assert list(runs) == ["Euler · Automatic", "Euler · Karras", "DDIM · Automatic"]
    assert result.data["skipped"] == ["DDIM · Karras"]
    for run in runs.values():
        plain = pipe.txt2img(PROMPT, seed=7, steps=4, sampler=run["sampler"], schedule=run["schedule"]).image
        assert np.array_equal(pixels(run["image"]), pixels(plain))
        assert len(run["sigmas"]) == 5 and run["sigmas"][-1] == 0
    euler = EulerDiscreteScheduler.from_config(pipe.model.scheduler_config)
    euler.set_timesteps(4)
    np.testing.assert_allclose(runs["Euler · Automatic"]["sigmas"], euler.sigmas.numpy(), rtol=1e-5)
    np.testing.assert_allclose(runs["DDIM · Automatic"]["sigmas"], euler.sigmas.numpy(), rtol=1e-3)
    assert not np.allclose(runs["Euler · Karras"]["sigmas"], runs["Euler · Automatic"]["sigmas"])
    assert len(result.images["Euler · Karras"]) == 2
    with pytest.raises(UnknownName):
        explain.samplers(pipe, PROMPT, samplers=["Eulerr"])


def test_cfg_across_scales(pipe):
    result = explain.cfg(pipe, PROMPT, scales=[4, 1], steps=4, seed=8)
    data = result.data
    assert list(data["scales"]) == [1.0, 4.0] and result.columns == ["CFG 1", "CFG 4"]
    for scale, image in zip((1.0, 4.0), result.images["images"]):
        assert np.array_equal(pixels(image), pixels(pipe.txt2img(PROMPT, seed=8, steps=4, cfg_scale=scale).image))
    assert np.all(data["change"][0] == 0) and data["change"][1].max() > 0
    assert np.isnan(data["guidance_maps"][0]).all() and result.images["guidance"][0] is None
    assert len(data["guidance_rms"][0]) == 0 and len(data["guidance_rms"][1]) == 4  # one guided call a step
    assert np.all(np.isfinite(data["guidance_maps"][1])) and data["guidance_maps"][1].min() >= 0
    assert list(data["guidance_steps"][1]) == [1, 2, 3, 4]
    with pytest.raises(InvalidParameter, match="scales"):
        explain.cfg(pipe, PROMPT, scales=[0.5])


def test_guidance_is_cond_minus_uncond(pipe):
    """The recorded difference at the first step is x0(cond) − x0(uncond) at the starting noise."""
    from aipaint.engine.preview import X0Estimator
    from aipaint.explain.guidance import GuidanceRecord

    model = pipe.model
    record = GuidanceRecord(model.scheduler_config, [1.0])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(500)
    record.add(x, t, out)
    estimate = X0Estimator(model.scheduler_config)
    delta = estimate(x[1:], t, out[1:]) - estimate(x[:1], t, out[:1])
    np.testing.assert_allclose(record.maps[0].numpy(), delta[0].norm(dim=0).numpy(), rtol=1e-5)
    record.add(x[:1], t, out[:1])  # a call without the negative's rows is no CFG call
    assert len(record.maps) == 1


# --- pictures, figures and the command line -----------------------------------------------------------
def test_labels_use_a_real_font():
    from PIL import ImageFont

    from aipaint.explain import drawing

    assert isinstance(drawing.font(14), ImageFont.FreeTypeFont)
    path = drawing.font_path()
    assert path is None or path.lower().endswith(".ttf")
    sheet = drawing.contact_sheet([("row", [None])], title="Title", notes=["note"], cell=32)
    assert (np.asarray(sheet) < 128).any()  # the text is drawn


def test_plots_without_matplotlib_say_how_to_get_it(pipe, square, monkeypatch):
    result = explain.noise(pipe, square, timesteps=[0, 999])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if it were not installed
    with pytest.raises(UnsupportedFeature, match="pip install matplotlib"):
        result.figure()


def test_figures_with_matplotlib(pipe, square, tmp_path):
    pytest.importorskip("matplotlib")
    result = explain.noise(pipe, square, timesteps=[0, 500, 999])
    assert len(result.figure().axes) == 2
    assert result.save_figure(tmp_path / "f.png").stat().st_size > 1000


def test_the_command_line(pipe, square, tmp_path, capsys, monkeypatch):
    from aipaint.cli.main import main

    monkeypatch.chdir(tmp_path)
    square.save(tmp_path / "square.png")
    assert main(["explain", "noise", "square.png", "--timesteps", "0,500,999"]) == 0
    assert main(["explain", "denoise", PROMPT, "--steps", "3", "--seed", "1", "--animation", "run.webp"]) == 0
    assert main(["explain", "cfg", PROMPT, "--steps", "2", "--seed", "1", "--scales", "1,3", "-o", "cfg.png"]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["explain-noise.png", "explain-denoise.png", "run.webp", "cfg.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in out)
    # an existing file is an error before any work, and a second run without -o takes a new name
    assert main(["explain", "cfg", PROMPT, "--steps", "2", "-o", "cfg.png"]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["explain", "denoise", PROMPT, "--steps", "2"]) == 0
    assert capsys.readouterr().out.split() == ["explain-denoise-1.png", "explain-denoise-1.gif"]
    assert main(["explain", "samplers", PROMPT, "--samplers", "Eulerr"]) == 2
    assert "sampler" in capsys.readouterr().err
