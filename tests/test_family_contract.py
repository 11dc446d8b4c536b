"""Every family on the one contract: loaded behind ``aipaint.Pipeline``, driven by the core
``GenerationRequest`` from Python and from the ``aipaint`` command, with declared capabilities
and typed plugin options.

The tiny DeepFloyd IF, Karlo and Stable unCLIP folders are the family tests' own fixtures.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from test_deepfloyd_if import if_paths  # noqa: F401  (fixture)
from test_unclip import references, stable_paths, stable_references, unclip_paths  # noqa: F401  (fixtures)

import aipaint
from aipaint.cli.main import main
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.infotext import read_png_parameters
from aipaint.models.family import CAPABILITIES, GenerativeModel

PROMPT = "a big red circle on the left"
KARLO_STEPS = ["--steps", "2", "--option", "unclip.prior_steps=2", "--option", "unclip.super_res_steps=2"]


def picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8))


def run_cli(tmp_path, capsys, *args: str) -> tuple[int, str, str]:
    """``aipaint ARGS… --seed 3 -o tmp/out.png``: exit code, PNG parameters (or ""), stderr."""
    out = tmp_path / "out.png"
    code = main([*args, "--seed", "3", "-o", str(out)])
    return code, (read_png_parameters(out) or "") if out.exists() else "", capsys.readouterr().err


def generate(tmp_path, capsys, *args: str) -> tuple[int, str, str]:
    return run_cli(tmp_path, capsys, "generate", PROMPT, *args)


# --- the command line, end to end ----------------------------------------------------------------
def test_cli_generates_with_a_deepfloyd_if_folder(if_paths, tmp_path, capsys):  # noqa: F811
    code, params, err = generate(tmp_path, capsys, "-m", str(if_paths["stage1"]), "--steps", "2", "--cfg", "5")
    assert code == 0, err
    assert PROMPT in params and "Seed: 3" in params and "Steps: 2" in params and "Stages: 1" in params
    assert Image.open(tmp_path / "out.png").size == (8, 8)


def test_cli_generates_with_a_karlo_folder(unclip_paths, tmp_path, capsys):  # noqa: F811
    code, params, err = generate(tmp_path, capsys, "-m", str(unclip_paths["text"]), *KARLO_STEPS)
    assert code == 0, err
    assert "unCLIP mode: txt2img" in params and "Prior steps: 2" in params and "Super-resolution steps: 2" in params
    assert Image.open(tmp_path / "out.png").size == (64, 64)


def test_cli_generates_with_a_stable_unclip_folder_and_its_prior(stable_paths, tmp_path, capsys):  # noqa: F811
    code, params, err = generate(tmp_path, capsys, "-m", str(stable_paths["text"]), "--steps", "2",
                                 "--option", "unclip.prior_steps=2", "--option", "unclip.noise_level=10")
    assert code == 0, err
    assert "unCLIP mode: txt2img" in params and "Prior steps: 2" in params and "Noise level: 10" in params
    assert "Sampler: DDIM" in params and Image.open(tmp_path / "out.png").size == (32, 32)


def test_cli_option_typos_name_the_close_matches(if_paths, tmp_path, capsys):  # noqa: F811
    code, params, err = generate(tmp_path, capsys, "-m", str(if_paths["stage1"]), "--option", "if.stage2_step=3")
    assert code == 2 and not params
    assert "if.stage2_step" in err and "'stage2_steps'" in err
    code, _, err = generate(tmp_path, capsys, "-m", str(if_paths["stage1"]), "--option", "iff.stages=1")
    assert code == 2 and "'if'" in err


def test_cli_a_mode_the_family_lacks_is_one_error_line(if_paths, tmp_path, capsys):  # noqa: F811
    source = tmp_path / "in.png"
    picture(0).resize((8, 8)).save(source)
    code = main(["img2img", str(source), PROMPT, "-m", str(if_paths["stage1"]), "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out.png").exists()
    assert "aipaint: error: deepfloyd-if model" in err and "(img2img)" in err


def test_cli_variations_with_a_karlo_variations_folder(unclip_paths, tmp_path, capsys):  # noqa: F811
    source = tmp_path / "in.png"
    picture(1).save(source)
    code, params, err = run_cli(tmp_path, capsys, "variations", str(source), "-m", str(unclip_paths["variations"]),
                                "--steps", "2", "--option", "unclip.super_res_steps=2")
    assert code == 0, err
    assert "unCLIP mode: variations" in params and "Seed: 3" in params


def test_cli_blend_with_a_stable_unclip_image_folder(stable_paths, tmp_path, capsys):  # noqa: F811
    images = [tmp_path / "a.png", tmp_path / "b.png"]
    for seed, path in enumerate(images):
        picture(seed).save(path)
    code, params, err = run_cli(tmp_path, capsys, "blend", *map(str, images), "--weights", "2,1",
                                "-m", str(stable_paths["image"]), "--steps", "2", "--option", "unclip.noise_level=5")
    assert code == 0, err
    assert "unCLIP mode: blend" in params and "Blend weights: 2 1" in params and "Noise level: 5" in params


def test_cli_variations_on_a_text_only_family_is_one_error_line(if_paths, tmp_path, capsys):  # noqa: F811
    source = tmp_path / "in.png"
    picture(1).save(source)
    code, params, err = run_cli(tmp_path, capsys, "variations", str(source), "-m", str(if_paths["stage1"]))
    assert code == 2 and not params
    assert "aipaint: error: deepfloyd-if model" in err and "(variations)" in err


# --- capabilities: a missing mode is a typed error before any work --------------------------------
@pytest.fixture(scope="module")
def pipes(if_paths, unclip_paths, stable_paths, plugin_host):  # noqa: F811
    return {
        "deepfloyd-if": aipaint.load(if_paths["stage1"], host=plugin_host),
        "karlo-text": aipaint.load(unclip_paths["text"], host=plugin_host),
        "karlo-variations": aipaint.load(unclip_paths["variations"], host=plugin_host),
        "stable-image": aipaint.load(stable_paths["image"], host=plugin_host),
        "stable-text": aipaint.load(stable_paths["text"], host=plugin_host),
    }


EXPECTED_CAPABILITIES = {
    "deepfloyd-if": {"txt2img"},
    "karlo-text": {"txt2img"},
    "karlo-variations": {"variations", "blend"},
    "stable-image": {"variations", "blend", "adapters"},
    "stable-text": {"txt2img", "adapters"},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CAPABILITIES))
def test_every_family_is_a_generative_model_behind_the_one_pipeline(pipes, name):
    pipe = pipes[name]
    assert type(pipe) is aipaint.Pipeline and isinstance(pipe.model, GenerativeModel)
    assert pipe.model.capabilities == EXPECTED_CAPABILITIES[name]
    assert set(pipe.model.capabilities) <= set(CAPABILITIES)


CALLS = {
    "txt2img": lambda pipe: pipe.txt2img(PROMPT, seed=1, steps=2),
    "img2img": lambda pipe: pipe.img2img(picture(0), PROMPT, seed=1, steps=2),
    "inpaint": lambda pipe: pipe.inpaint(picture(0), Image.new("L", (48, 48), 255), PROMPT, seed=1, steps=2),
    "variations": lambda pipe: pipe.variations(picture(0), seed=1, steps=2),
    "blend": lambda pipe: pipe.blend([picture(0), picture(1)], seed=1, steps=2),
}
FAMILY = {"deepfloyd-if": "deepfloyd-if", "karlo-text": "unclip", "karlo-variations": "unclip",
          "stable-image": "stable-unclip", "stable-text": "stable-unclip"}


@pytest.mark.parametrize(("name", "feature"), [(name, feature) for name in sorted(EXPECTED_CAPABILITIES) for feature in CALLS
                                               if feature not in EXPECTED_CAPABILITIES[name]])
def test_a_missing_mode_is_unsupported_before_any_work(pipes, name, feature, monkeypatch):
    from aipaint.engine import run

    pipe = pipes[name]
    started = lambda *a, **k: pytest.fail("the model started")  # noqa: E731
    monkeypatch.setattr(type(pipe.model), "generate", started)
    monkeypatch.setattr(run, "generate", started)  # latent models run through the engine
    with pytest.raises(UnsupportedFeature) as info:
        CALLS[feature](pipe)
    message = str(info.value)
    assert message.startswith(f"{FAMILY[name]} model ") and f"({feature})" in message


def test_adapter_units_are_refused_by_the_families_without_them(pipes):
    with pytest.raises(UnsupportedFeature, match=r"deepfloyd-if model .*\(adapters\)"):
        pipes["deepfloyd-if"].txt2img(PROMPT, seed=1, adapters=(object(),))


# --- options: typed, by namespace, close matches named ---------------------------------------------
@pytest.mark.parametrize(("name", "options", "suggestion"), [
    ("deepfloyd-if", {"if": {"stage2_cfg": 4}}, "'stage2_cfg_scale'"),
    ("karlo-text", {"unclip": {"prior_step": 2}}, "'prior_steps'"),
    ("stable-text", {"unclip": {"noise_levle": 2}}, "'noise_level'"),
    ("karlo-text", {"unclp": {"prior_steps": 2}}, "'unclip'"),
])
def test_an_unknown_option_names_the_close_matches(pipes, name, options, suggestion):
    with pytest.raises(InvalidParameter, match="did you mean") as info:
        pipes[name].txt2img(PROMPT, seed=1, steps=2, options=options)
    assert suggestion in str(info.value)


def test_options_given_as_text_are_typed_once(pipes):
    """The CLI's text values become the group's types; a bad one names its option."""
    result = pipes["karlo-text"].txt2img(PROMPT, seed=1, steps=2,
                                         options={"unclip": {"prior_steps": "2", "super_res_steps": "2"}})
    assert "Prior steps: 2" in result.parameters
    with pytest.raises(InvalidParameter) as info:
        pipes["karlo-text"].txt2img(PROMPT, seed=1, options={"unclip": {"prior_steps": "two"}})
    assert info.value.name == "unclip.prior_steps"
