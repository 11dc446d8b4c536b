"""The GAN plugin: a tiny GAN trains a few steps on shapes-world pictures, saves a folder that loads as a
model family, generates through the Pipeline and the CLI, and refuses what a one-pass generator cannot do."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.gan.model import CONFIG_FILE, CRITIC_FILE, GENERATOR_FILE, TRAINING_FILE
from aipaint_plugins.gan.train import train_gan
from PIL import Image
from safetensors.torch import load_file

import aipaint
from aipaint.errors import AipaintWarning, InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.infotext import Infotext, read_png_parameters

TINY = dict(channels=4, z_dim=8, batch_size=8, n_critic=2)


def shapes_data(n: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    from aipaint_plugins.shapes_world.render import render
    from aipaint_plugins.shapes_world.scene import random_scene

    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, "train", n_objects=1) for _ in range(n)]
    return [render(s) for s in scenes], [s.caption for s in scenes]


@pytest.fixture(scope="module")
def gan_folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gan") / "tiny-gan"
    report = train_gan(shapes_data(24), out, loss="wgan", steps=4, **TINY)
    assert report.steps == 4 and report.images == 24
    return out


@pytest.fixture(scope="module")
def gan_pipe(gan_folder):
    return aipaint.load(gan_folder)


def test_training_writes_a_complete_folder(gan_folder):
    assert {p.name for p in gan_folder.iterdir()} == {CONFIG_FILE, GENERATOR_FILE, CRITIC_FILE, TRAINING_FILE}
    config = json.loads((gan_folder / CONFIG_FILE).read_text())
    assert config["format"] == "aipaint-gan" and config["loss"] == "wgan" and config["condition"] == "words"
    # the vocabulary is the captions' words without the stop words
    assert {"red", "circle", "left", "background"} <= set(config["vocabulary"]) and "the" not in config["vocabulary"]
    curves = json.loads((gan_folder / TRAINING_FILE).read_text())["curves"]
    assert curves["step"] == [1.0, 2.0, 3.0, 4.0] and all(np.isfinite(curves["wasserstein"]))


def test_weight_clipping_keeps_every_critic_weight_in_bounds(tmp_path):
    out = tmp_path / "clipped"
    train_gan(shapes_data(16), out, loss="wgan", steps=2, clip_value=0.003, **TINY)
    critic = load_file(str(out / CRITIC_FILE))
    assert max(float(t.abs().max()) for t in critic.values()) <= 0.003 + 1e-9
    # without clipping (the gradient-penalty loss), the same initialisation is not confined
    out_gp = tmp_path / "penalised"
    report = train_gan(shapes_data(16), out_gp, loss="wgan-gp", steps=2, **TINY)
    critic = load_file(str(out_gp / CRITIC_FILE))
    assert max(float(t.abs().max()) for t in critic.values()) > 0.003
    assert min(report.curves["gradient_penalty"]) > 0.0


def test_the_pipeline_generates_reproducibly_with_a1111_parameters(gan_pipe):
    assert gan_pipe.model.family == "gan" and gan_pipe.model.capabilities == frozenset({"txt2img"})
    steps = []
    result = gan_pipe.txt2img("a red circle", seed=5, batch_size=3, progress=lambda d, t: steps.append((d, t)))
    assert steps == [(1, 1)]
    assert [im.size for im in result.images] == [(32, 32)] * 3 and result.seeds == [5, 6, 7]
    info = Infotext.from_text(result.infotexts[1])
    assert info.prompt == "a red circle"
    assert info.params["Seed"] == "6" and info.params["Size"] == "32x32" and info.params["GAN loss"] == "wgan"
    # batch norm runs in eval mode: image i of a batch is the single image of seed + i
    single = gan_pipe.txt2img("a red circle", seed=6).image
    assert np.array_equal(np.asarray(single), np.asarray(result.images[1]))
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(result.images[1]))


def test_the_caption_reaches_the_generator(gan_pipe):
    red = np.asarray(gan_pipe.txt2img("a red circle", seed=1).image).astype(int)
    blue = np.asarray(gan_pipe.txt2img("a blue square", seed=1).image).astype(int)
    assert np.abs(red - blue).sum() > 0


def test_the_variation_seed_moves_the_noise_vector_as_in_a1111(gan_pipe):
    seven = np.asarray(gan_pipe.txt2img("a red circle", seed=7).image)
    fully = gan_pipe.txt2img("a red circle", seed=1, subseed=7, subseed_strength=1.0)
    assert np.array_equal(np.asarray(fully.image), seven)  # strength 1: all the variation seed's noise
    halfway = np.asarray(gan_pipe.txt2img("a red circle", seed=1, subseed=7, subseed_strength=0.5).image)
    assert not np.array_equal(halfway, seven) and "Variation seed: 7" in fully.parameters


def test_truncation_scales_the_noise(gan_pipe):
    plain = np.asarray(gan_pipe.txt2img("a red circle", seed=1).image).astype(int)
    result = gan_pipe.txt2img("a red circle", seed=1, options={"gan": {"truncation": 0.1}})
    assert np.abs(plain - np.asarray(result.image).astype(int)).sum() > 0
    assert "GAN truncation: 0.1" in result.parameters
    with pytest.raises(InvalidParameter, match="gan.truncation"):
        gan_pipe.txt2img("a red circle", options={"gan": {"truncation": 0}})


def test_unknown_words_are_reported_not_silently_dropped(gan_pipe):
    with pytest.warns(AipaintWarning, match="orange"):
        result = gan_pipe.txt2img("an orange circle", seed=1)
    assert "GAN unknown words: orange" in result.parameters


def test_what_a_gan_cannot_do_is_refused_before_any_work(gan_pipe, tmp_path):
    picture = Image.new("RGB", (32, 32))
    with pytest.raises(UnsupportedFeature, match="gan model 'tiny-gan' cannot do image to image"):
        gan_pipe.img2img(picture, "a red circle")
    with pytest.raises(UnsupportedFeature, match="cannot do inpainting"):
        gan_pipe.inpaint(picture, Image.new("L", (32, 32), 255), "a red circle")
    for field, value in (("steps", 20), ("cfg_scale", 7.0), ("sampler", "Euler")):
        with pytest.raises(UnsupportedFeature, match=f"does not use {field}"):
            gan_pipe.txt2img("a red circle", **{field: value})
    with pytest.raises(UnsupportedFeature, match="does not use negative_prompt"):
        gan_pipe.txt2img("a red circle", "blue")
    with pytest.raises(InvalidParameter, match="width=64"):
        gan_pipe.txt2img("a red circle", width=64)
    assert gan_pipe.txt2img("a red circle", width=32, height=32).image.size == (32, 32)


def test_an_unconditional_gan_refuses_a_prompt(tmp_path):
    out = tmp_path / "uncond"
    train_gan(shapes_data(8), out, loss="wgan-gp", condition="none", steps=1, **TINY)
    pipe = aipaint.load(out)
    assert pipe.txt2img("", seed=1).image.size == (32, 32)
    with pytest.raises(UnsupportedFeature, match="unconditional"):
        pipe.txt2img("a red circle")


def test_cli_trains_and_generates(tmp_path, capsys):
    from aipaint.cli.main import main

    data = tmp_path / "data"
    data.mkdir()
    for i, (image, caption) in enumerate(zip(*shapes_data(6), strict=True)):
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    model = tmp_path / "cli-gan"
    assert main(["train", "gan", str(data), "-o", str(model), "--steps", "2", "--channels", "4", "--z-dim", "8",
                 "--batch-size", "4", "--n-critic", "1", "--no-progress", "--print-every", "1"]) == 0
    err = capsys.readouterr().err
    assert "2 generator steps on 6 images" in err and "step 2" in err
    out = tmp_path / "red.png"
    assert main(["generate", "a red circle", "-m", str(model), "--seed", "3", "-o", str(out), "--no-progress"]) == 0
    info = Infotext.from_text(read_png_parameters(out))
    assert info.prompt == "a red circle" and info.params["Seed"] == "3" and info.params["Model"] == "cli-gan"
    again = tmp_path / "again.png"
    main(["generate", "a red circle", "-m", str(model), "--seed", "3", "-o", str(again), "--no-progress"])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(again)))
    # training refuses to replace a folder that is not a GAN folder, even with --overwrite
    capsys.readouterr()
    assert main(["train", "gan", str(data), "-o", str(data), "--steps", "1", "--overwrite", "--no-progress"]) != 0
    assert "not a GAN model folder" in capsys.readouterr().err and (data / "0.png").is_file()


def test_bad_folders_are_typed_errors(gan_folder, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((gan_folder / CONFIG_FILE).read_text())
    (broken / CONFIG_FILE).write_text(json.dumps({**config, "channels": 8}))
    (broken / GENERATOR_FILE).write_bytes((gan_folder / GENERATOR_FILE).read_bytes())
    with pytest.raises(ModelLoadError, match="does not fit the network"):
        aipaint.load(broken)
    (broken / CONFIG_FILE).write_text(json.dumps({**config, "loss": "vanilla"}))
    with pytest.raises(ModelLoadError, match="loss 'vanilla' is not valid"):
        aipaint.load(broken)
    with pytest.raises(InvalidParameter, match="loss"):
        train_gan(shapes_data(2), tmp_path / "x", loss="hinge", steps=1)
    with pytest.raises(InvalidParameter, match="data_dir"):
        train_gan(tmp_path / "missing", tmp_path / "y", steps=1)


def test_training_is_reproducible_for_a_seed(tmp_path):
    data = shapes_data(8)
    for name in ("a", "b"):
        train_gan(data, tmp_path / name, loss="wgan-gp", steps=2, seed=3, **TINY)
    a, b = (load_file(str(tmp_path / n / GENERATOR_FILE)) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # training leaves the global random state alone
        state = torch.random.get_rng_state()
        train_gan(data, tmp_path / "c", loss="wgan", steps=1, **TINY)
        assert torch.equal(state, torch.random.get_rng_state())
