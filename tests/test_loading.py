"""Resolving and loading models: zoo ids, folders, files, hub ids; safety of pickles."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch

import aipaint
from aipaint.errors import DownloadError, ModelLoadError, UnknownName, UnsafeFileError
from aipaint.models.family import ModelFamily
from aipaint.models.loading import identify_family, resolve_source
from aipaint.models.weights import load_state_dict


class Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_checkpoint_is_refused_by_default(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        aipaint.load(path)
    with pytest.raises(UnsafeFileError):
        load_state_dict(path)


def test_opt_in_loads_tensors_only_with_weights_only(tmp_path, capsys):
    good = tmp_path / "good.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(load_state_dict(good, allow_pickle=True)["w"], torch.ones(2))
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_state_dict(evil, allow_pickle=True)
    assert "pwned" not in capsys.readouterr().out


def test_missing_path_explains_what_is_accepted(tmp_path):
    with pytest.raises(ModelLoadError, match="not a zoo id"):
        aipaint.load(str(tmp_path / "nope.safetensors"))


def test_unknown_format_is_refused(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unknown checkpoint format"):
        aipaint.load(path)


def test_corrupt_safetensors_is_a_typed_error(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not really safetensors")
    with pytest.raises(ModelLoadError):
        aipaint.load(path)


def test_hub_id_offline_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline") as err:
        aipaint.load("someone/some-model")
    assert "\n" not in str(err.value)


def test_zoo_hub_model_offline_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="v1-5-pruned-emaonly.safetensors"):
        aipaint.load("sd15")


def test_folder_without_known_family(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "SomethingElse"}')
    with pytest.raises(ModelLoadError, match="no installed model family"):
        aipaint.load(tmp_path)


def test_explicit_unknown_family_lists_valid_ones(tiny_sd_path):
    with pytest.raises(UnknownName, match="sd15"):
        aipaint.load(tiny_sd_path, family="sd99")


def test_unknown_runtime_and_dtype(tiny_sd_path):
    with pytest.raises(UnknownName, match="torch"):
        aipaint.load(tiny_sd_path, runtime="warp-drive")
    with pytest.raises(UnknownName, match="float16"):
        aipaint.load(tiny_sd_path, dtype="float8")


def test_incomplete_folder_names_the_missing_part(tiny_sd_path, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd_path, copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(ModelLoadError, match="vae"):
        aipaint.load(copy)


def test_folder_is_identified_as_sd15(tiny_sd_path):
    source = resolve_source(tiny_sd_path)
    assert source.kind == "folder"
    assert aipaint.load(tiny_sd_path).model.family == "sd15"


def test_zoo_lists_default_and_sd15():
    from aipaint.models import zoo

    ids = {c.id for c in zoo.cards()}
    assert {"shapes-tiny", "sd15"} <= ids
    assert zoo.get("stable-diffusion-v1-5").id == "sd15"
    with pytest.raises(UnknownName):
        zoo.get("no-such-model")


def test_zoo_download_verifies_sha256(tmp_path, monkeypatch):
    import huggingface_hub

    from aipaint.models import zoo

    fake = tmp_path / "v1-5-pruned-emaonly.safetensors"
    fake.write_bytes(b"tampered")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: str(fake))
    with pytest.raises(DownloadError, match="sha256"):
        zoo.fetch(zoo.get("sd15"))


class NamedPlugin:
    """A plugin object with the name pluggy registers it under (and warnings show)."""

    def __init__(self, name: str) -> None:
        self.__name__ = name


class CrashingIdentifier(NamedPlugin):
    @aipaint.hookimpl
    def identify_model_family(self, source):
        raise RuntimeError("bug in the plugin")


class ClaimsUnregisteredFamily(NamedPlugin):
    @aipaint.hookimpl
    def identify_model_family(self, source):
        return "no-such-family"


class ArgumentlessIdentifier(NamedPlugin):
    """pluggy lets an implementation take fewer arguments than the hookspec names."""

    @aipaint.hookimpl
    def identify_model_family(self):
        return None


class CrashingFamily(ModelFamily):
    name = "crashing"

    def identify(self, source):
        raise KeyError("bug in identify")


class ClaimingFamily(ModelFamily):
    name = "claiming"

    def identify(self, source):
        return source.model_index().get("_class_name") == "TestPipeline"


class FamiliesPlugin(NamedPlugin):
    @aipaint.hookimpl
    def register_models(self, register):
        register(CrashingFamily())
        register(ClaimingFamily())


def identify_with(source, *plugins):
    from aipaint.plugin.host import create_plugin_host

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        family = identify_family(source, create_plugin_host(extra_plugins=plugins))
    return family, [str(w.message) for w in caught]


@pytest.mark.parametrize(
    ("plugin", "problem"),
    [(CrashingIdentifier("crashing-identifier"), "raised RuntimeError('bug in the plugin')"),
     (ClaimsUnregisteredFamily("claims-unregistered"), "claimed the unregistered family 'no-such-family'")],
)
def test_broken_identify_hook_is_named_and_skipped(tiny_sd_path, plugin, problem):
    family, messages = identify_with(resolve_source(tiny_sd_path), plugin)
    assert family.name == "sd15"
    assert [m for m in messages if plugin.__name__ in m and "identify_model_family" in m and problem in m]


def test_identify_hook_may_take_no_arguments(tiny_sd_path):
    family, messages = identify_with(resolve_source(tiny_sd_path), ArgumentlessIdentifier("argumentless"))
    assert family.name == "sd15"
    assert not [m for m in messages if "argumentless" in m]


def test_family_whose_identify_raises_is_named_and_skipped(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "TestPipeline"}')
    family, messages = identify_with(resolve_source(tmp_path), FamiliesPlugin("families-plugin"))
    assert family.name == "claiming"
    assert [m for m in messages if "'families-plugin'" in m and "CrashingFamily.identify()" in m and "bug in identify" in m]


def test_identify_hook_calls_are_traced(tiny_sd_path, monkeypatch, capfd):
    monkeypatch.setenv("AIPAINT_TRACE_PLUGINS", "1")
    identify_with(resolve_source(tiny_sd_path), ArgumentlessIdentifier("argumentless"))
    assert "identify_model_family [argumentless]" in capfd.readouterr().err


@pytest.mark.parametrize(("text", "problem"), [('{"_class_name": "StableDiff', "is not readable JSON"),
                                               ('["unet", "vae"]', "must hold a JSON object")])
def test_malformed_model_index_is_a_typed_error_naming_the_file(tmp_path, text, problem):
    index = tmp_path / "model_index.json"
    index.write_text(text)
    with pytest.raises(ModelLoadError, match=problem) as err:
        aipaint.load(tmp_path)
    assert str(index) in str(err.value)


def test_diffusers_folder_helpers_name_what_is_missing(tmp_path):
    """The folder checks the family plugins share (DeepFloyd IF, unCLIP) say which file or
    sub-folder is missing or unreadable."""
    from aipaint.models.family import read_model_index, read_scheduler_config, require_subfolders

    with pytest.raises(ModelLoadError, match="no model_index.json"):
        read_model_index(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "IFPipeline"}')
    assert read_model_index(tmp_path) == {"_class_name": "IFPipeline"}
    (tmp_path / "unet").mkdir()
    require_subfolders(tmp_path, ("unet",), "an IF folder")
    with pytest.raises(ModelLoadError, match=r"is not an IF folder: it has no scheduler/ sub-folder"):
        require_subfolders(tmp_path, ("unet", "scheduler"), "an IF folder")
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(ModelLoadError, match="scheduler_config.json is not readable"):
        read_scheduler_config(tmp_path, "scheduler")
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 1000}')
    assert read_scheduler_config(tmp_path, "scheduler") == {"num_train_timesteps": 1000}


def test_a_model_named_by_its_source_is_installed_once_then_loaded(monkeypatch, tiny_sd_path):
    """``-m civitai:123`` (or an AIR, a Hugging Face file link, a URL, a hash) goes through
    aipaint.sources.ensure as a checkpoint; a zoo id, a path or a hub id does not."""
    from aipaint import sources
    from aipaint.models import loading

    calls = []

    def ensure(text, *, kind=None, **options):
        calls.append((text, kind))
        return Path(tiny_sd_path)

    monkeypatch.setattr(sources, "ensure", ensure)
    found = loading.resolve_source("civitai:123@456")
    assert calls == [("civitai:123@456", "checkpoint")] and found.path == Path(tiny_sd_path) and found.kind == "folder"
    loading.resolve_source(str(tiny_sd_path))
    assert len(calls) == 1


def test_every_zoo_cards_defaults_name_a_sampler_and_schedule_it_offers(plugin_host):
    """A card's defaults are what a user gets by naming the model: a typo in its sampler or schedule
    type would fail only on a connected machine, after the download."""
    from aipaint.models import zoo

    checked = 0
    for card in zoo.cards():
        defaults = card.defaults
        if "sampler" in defaults:
            spec = plugin_host.registry.samplers.get(defaults["sampler"])
            assert spec.check_schedule(defaults.get("schedule", "Automatic")), card.id
            checked += 1
    assert checked >= 3
    few_step = {c.id: c.defaults for c in zoo.cards() if c.id.startswith(("sdxl-turbo", "sdxl-lightning"))}
    assert set(few_step) == {"sdxl-turbo", "sdxl-lightning-4step", "sdxl-lightning-8step"}
    assert all(d["schedule"] == "SGM Uniform" and d["cfg_scale"] == 1.0 and d["steps"] <= 8 for d in few_step.values())
