"""A model family added the way a third-party package would add one.

The plugin below is not in ``plugins/`` and not an entry point: it is an object handed to
``create_plugin_host(extra_plugins=...)``. It brings a latent family that recognises its
folders by a marker file, a function-style sampler, and a second family with its own
pipeline class. Generating through the public API with them — and a scan showing that
the core's code names none of the built-in families — shows that families live entirely
in plugins.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import aipaint
from aipaint import hookimpl
from aipaint.api.result import Result
from aipaint.engine.samplers import SamplerSpec
from aipaint.errors import ModelLoadError, UnsupportedFeature
from aipaint.models.family import GenerativeModel, LoadOptions, ModelFamily, ModelSource
from aipaint.models.latent import LatentDiffusionModel, ModelDefaults

MARKER = "TOY_PAINTER"
PROMPT = "a big red circle on the left"


def sample_toy_euler(denoiser, x, sigmas, *, noise_sampler=None, callback=None):
    """k-diffusion's Euler method, written out by the plugin."""
    calls["toy euler"] += 1
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"i": i, "x": x, "sigma": sigmas[i], "denoised": denoised})
    return x


calls = {"toy euler": 0}


class ToyPainter(ModelFamily):
    """Tiny SD components in a folder marked by a file, with no model_index.json."""

    name = "toy-painter"
    description = "a third-party latent family"
    default_size = (32, 32)

    def identify(self, source: ModelSource) -> bool:
        return source.kind == "folder" and (source.path / MARKER).is_file()

    def load(self, source: ModelSource, options: LoadOptions) -> LatentDiffusionModel:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        path = source.path
        return LatentDiffusionModel(
            family=self.name,
            name=source.name,
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval(),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae").eval(),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval(),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
            scheduler_config=json.loads((path / "scheduler" / "scheduler_config.json").read_text()),
            source_path=path,
            defaults=ModelDefaults(width=32, height=32, steps=3, cfg_scale=5.0, sampler="Toy Euler"),
        )


class SolidColourModel(GenerativeModel):
    """A model with a loop of its own: it implements the family protocol's ``generate``."""

    capabilities = frozenset({"txt2img"})

    def __init__(self, name: str) -> None:
        self.name = name
        self.family = "solid-colour"
        self.defaults = ModelDefaults(width=16, height=16)

    def generate(self, request, *, host, progress=None, preview=None) -> Result:
        from PIL import Image

        colour = (255, 0, 0) if "red" in request.prompt else (0, 0, 255)
        if progress is not None:
            progress(1, 1)
        return Result(images=[Image.new("RGB", (16, 16), colour)], seeds=[0], infotexts=[request.prompt], request=request)


class SolidColour(ModelFamily):
    name = "solid-colour"

    def identify(self, source: ModelSource) -> bool:
        return source.kind == "folder" and (source.path / "SOLID_COLOUR").is_file()

    def load(self, source: ModelSource, options: LoadOptions) -> SolidColourModel:
        return SolidColourModel(source.name)


class ToyPlugin:
    """What a third-party package's entry point would name."""

    @hookimpl
    def register_models(self, register):
        register(ToyPainter())
        register(SolidColour())

    @hookimpl
    def register_samplers(self, register):
        register(SamplerSpec(name="Toy Euler", kind="function", function=sample_toy_euler, schedules=("Automatic", "Karras")))


@pytest.fixture(scope="module")
def toy_host():
    from aipaint.plugin.host import create_plugin_host

    return create_plugin_host(extra_plugins=(ToyPlugin(),))


@pytest.fixture(scope="module")
def toy_folder(tiny_sd_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy") / "my-toy-model"
    shutil.copytree(tiny_sd_path, folder)
    (folder / "model_index.json").unlink()  # nothing a built-in family could recognise
    (folder / MARKER).write_text("")
    return folder


def test_the_toy_folder_is_unknown_without_the_plugin(toy_folder, plugin_host):
    with pytest.raises(ModelLoadError, match="no installed model family recognises"):
        aipaint.load(toy_folder, host=plugin_host)


def test_a_third_party_family_and_sampler_generate_through_the_public_api(toy_folder, toy_host, tiny_sd_path):
    assert toy_host.registry.families.owners["toy-painter"] != toy_host.registry.families.owners["sd15"]
    pipe = aipaint.load(toy_folder, host=toy_host)
    assert isinstance(pipe, aipaint.Pipeline) and pipe.model.family == "toy-painter"
    before = calls["toy euler"]
    result = pipe.txt2img(PROMPT, seed=3)  # the toy defaults: 32 px, 3 steps, "Toy Euler"
    assert calls["toy euler"] == before + 1
    assert result.image.size == (32, 32) and "Sampler: Toy Euler" in result.parameters
    # The plugin's Euler and the built-in diffusers Euler solve the same ODE on the same sigmas.
    reference = aipaint.load(tiny_sd_path, host=toy_host).txt2img(PROMPT, seed=3, steps=3, cfg_scale=5.0, width=32,
                                                                  height=32, sampler="Euler")
    ours, theirs = (np.asarray(r.image).astype(float) for r in (result, reference))
    assert np.abs(ours - theirs).mean() < 1.0  # within rounding, in 0-255 units
    assert ours.std() > 1.0


def test_a_third_party_family_can_bring_its_own_loop(tmp_path, toy_host):
    folder = tmp_path / "solid"
    folder.mkdir()
    (folder / "SOLID_COLOUR").write_text("")
    pipe = aipaint.load(folder, host=toy_host)
    assert isinstance(pipe.model, SolidColourModel)
    steps = []
    assert pipe.txt2img("a red square", progress=lambda done, total: steps.append(done)).image.getpixel((0, 0)) == (255, 0, 0)
    assert steps == [1]
    with pytest.raises(UnsupportedFeature, match="solid-colour model 'solid' cannot do image to image"):
        pipe.img2img(Image.new("RGB", (16, 16)), "a red square")


BUILT_IN_FAMILIES = ("sd15", "sdxl", "deepfloyd", "unclip", "karlo", "IFPipeline", "stable_diffusion_xl", "refiner-1.0")


def _code_words(path: Path) -> list[str]:
    """Identifiers and string literals of a module, leaving out docstrings (prose may cite examples)."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
        elif isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            words.append(node.name)
        elif isinstance(node, ast.alias):
            words.append(node.name)
    return words


def test_the_core_code_names_no_model_family():
    core = Path(aipaint.__file__).parent
    offenders = []
    for path in sorted(core.rglob("*.py")):
        for word in _code_words(path):
            hits = [name for name in BUILT_IN_FAMILIES if name.lower() in word.lower()]
            if hits:
                offenders.append(f"{path.relative_to(core)}: {word!r}")
    assert offenders == []


def test_the_scan_would_catch_a_family_name(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""Mentions SDXL in prose."""\nif family == "sdxl":\n    pass\n')
    words = _code_words(module)
    assert "sdxl" in words and not any("SDXL" in w for w in words)
