"""The plugin system: third-party plugins, broken plugins, selection and tracing."""

from __future__ import annotations

import json
import warnings
from importlib.metadata import EntryPoint

import numpy as np
import pytest

import aipaint
from aipaint import hookimpl
from aipaint.engine.samplers import SamplerSpec
from aipaint.models.family import LoadOptions, ModelFamily, ModelSource
from aipaint.plugin.host import create_plugin_host

MARKER = "toy-family.json"


def toy_euler(denoiser, x, sigmas, *, noise_sampler, callback=None):
    """A plain Euler sampler written as a third party would."""
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, sigmas[i])
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
    return x


class ToyFamily(ModelFamily):
    """A family no core module knows: it claims folders that carry a marker file."""

    name = "toy"
    default_size = (32, 32)

    def __init__(self) -> None:
        self.loaded = 0

    def identify(self, source: ModelSource) -> bool:
        return source.kind == "folder" and (source.path / MARKER).is_file()

    def load(self, source: ModelSource, options: LoadOptions):
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from aipaint.models.latent import LatentDiffusionModel, ModelDefaults

        self.loaded += 1
        base = source.path / json.loads((source.path / MARKER).read_text())["weights"]
        return LatentDiffusionModel(
            family=self.name,
            name="toy",
            unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval(),
            vae=AutoencoderKL.from_pretrained(base, subfolder="vae").eval(),
            text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval(),
            tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
            scheduler_config=json.loads((base / "scheduler" / "scheduler_config.json").read_text()),
            defaults=ModelDefaults(width=32, height=32, steps=3, sampler="Toy Euler"),
        )


class ToyPlugin:
    def __init__(self) -> None:
        self.family = ToyFamily()

    @hookimpl
    def register_models(self, register):
        register(self.family)

    @hookimpl
    def register_samplers(self, register):
        register(SamplerSpec(name="Toy Euler", kind="function", function=toy_euler, schedules=("Automatic", "Karras")))


@pytest.fixture()
def toy_folder(tmp_path, tiny_sd_path):
    (tmp_path / MARKER).write_text(json.dumps({"weights": str(tiny_sd_path)}))
    return tmp_path


def test_third_party_family_and_sampler_through_public_api(toy_folder):
    plugin = ToyPlugin()
    host = create_plugin_host(extra_plugins=(plugin,))
    pipe = aipaint.load(toy_folder, host=host)
    assert pipe.model.family == "toy" and plugin.family.loaded == 1
    result = pipe.txt2img("a red circle", seed=4)  # the family's defaults: 32x32, its own sampler
    assert result.image.size == (32, 32)
    assert "Sampler: Toy Euler" in result.parameters
    # The function sampler follows the same noise schedule as diffusers' Euler: close results.
    euler = pipe.txt2img("a red circle", seed=4, sampler="Euler", steps=3)
    diff = np.abs(np.asarray(result.image, dtype=float) - np.asarray(euler.image, dtype=float)).mean() / 255
    assert diff < 0.02
    assert "toy" in host.registry.families and "Toy Euler" in host.registry.samplers


def test_plugin_registered_on_one_host_is_invisible_to_another():
    create_plugin_host(extra_plugins=(ToyPlugin(),))
    assert "Toy Euler" not in create_plugin_host().registry.samplers


def test_builtin_name_is_never_replaced():
    class Impostor:
        @hookimpl
        def register_samplers(self, register):
            register(SamplerSpec(name="euler", kind="function", function=toy_euler))

    with pytest.warns(UserWarning, match="already uses that name"):
        host = create_plugin_host(extra_plugins=(Impostor(),))
    assert host.registry.samplers.get("Euler").kind == "scheduler"
    assert host.registry.samplers.owners["Euler"] == "samplers"


def test_plugin_that_raises_is_named_and_skipped():
    class Broken:
        @hookimpl
        def register_samplers(self, register):
            raise RuntimeError("boom")

    with pytest.warns(UserWarning, match="failed in register_samplers"):
        host = create_plugin_host(extra_plugins=(Broken(),))
    assert "DPM++ 2M" in host.registry.samplers


def test_wrong_registration_type_is_reported():
    class Wrong:
        @hookimpl
        def register_samplers(self, register):
            register("Euler b")

    with pytest.warns(UserWarning, match="expected an instance of aipaint.engine.samplers.SamplerSpec"):
        create_plugin_host(extra_plugins=(Wrong(),))


def test_broken_entry_point_warns_with_its_name(monkeypatch):
    import aipaint.plugin.host as plugins

    real = plugins.entry_points

    def fake_entry_points(group):
        return [*real(group=group), EntryPoint(name="broken-thing", value="no_such_module_for_aipaint", group=group)]

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host = create_plugin_host()
    assert any("broken-thing" in str(w.message) for w in caught)
    assert "sd15" in host.registry.families and "Euler" in host.registry.samplers


def test_load_plugins_env_selects_entry_points(monkeypatch):
    monkeypatch.setenv("AIPAINT_LOAD_PLUGINS", "samplers")
    host = create_plugin_host()
    assert host.plugin_names() == ["samplers"]
    assert "sd15" not in host.registry.families and "Euler" in host.registry.samplers
    monkeypatch.setenv("AIPAINT_LOAD_PLUGINS", "")
    assert create_plugin_host().plugin_names() == []


def test_trace_plugins_env_prints_hook_calls(monkeypatch, capfd):
    monkeypatch.setenv("AIPAINT_TRACE_PLUGINS", "1")
    host = create_plugin_host()
    host.hook.identify_model_family(source=ModelSource(path=__import__("pathlib").Path("."), kind="folder", name="x"))
    err = capfd.readouterr().err
    assert "register_samplers [samplers]" in err and "identify_model_family" in err


def test_every_builtin_is_an_entry_point_in_group_aipaint():
    from importlib.metadata import entry_points

    values = {ep.value for ep in entry_points(group="aipaint")}
    assert {"aipaint_plugins.sd15", "aipaint_plugins.samplers", "aipaint_plugins.torch_runtime"} <= values
    host = create_plugin_host()
    assert host.registry.families.owners["sd15"] == "sd15"


def test_implementations_follow_pluggy_call_order():
    """The host runs a hook one plugin at a time (to name a broken one) in pluggy's own order,
    so a firstresult hook still gives the same plugin the first say."""
    asked = []

    class Claimer:
        def __init__(self, name: str) -> None:
            self.__name__ = name

        @hookimpl
        def identify_model_family(self, source):
            asked.append(self.__name__)

    host = create_plugin_host((Claimer("first"), Claimer("second"), Claimer("third")), load_entry_points=False)
    source = ModelSource(path=__import__("pathlib").Path("."), kind="folder", name="x")
    host.hook.identify_model_family(source=source)
    assert asked == ["third", "second", "first"]
    assert [owner for owner, _ in host.implementations("identify_model_family")] == asked
