"""The TensorRT plugin: everything that needs no TensorRT (profiles, manifest, errors) is tested here;
building and running engines needs the ``tensorrt`` package and an NVIDIA GPU and is skipped without them."""

from __future__ import annotations

import json
import shutil
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from aipaint_plugins.onnx_runtime.export import export_onnx
from aipaint_plugins.tensorrt_runtime.build import (
    ENGINE_FORMAT,
    compatibility_problem,
    engine_manifest,
    read_engine_manifest,
)
from aipaint_plugins.tensorrt_runtime.profiles import ProfileSettings, component_profiles, shape_in_profile
from aipaint_plugins.tensorrt_runtime.runtime import (
    TrtOptions,
    check_device,
    check_engine_folder,
    unavailable,
)

import aipaint
from aipaint.cli.main import main as cli_main
from aipaint.errors import InvalidParameter, ModelLoadError
from aipaint.plugin.kit.exports import MANIFEST_NAME, file_record

HAS_TENSORRT = find_spec("tensorrt") is not None
NEEDS_TRT = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="building and running engines needs the tensorrt package and an NVIDIA GPU; neither is installable here",
)

SD15_LIKE = {  # the symbolic I/O an SD1.5 export records (see test_onnx_runtime for a real one)
    "unet": {"inputs": [
        {"name": "sample", "dtype": "float16", "shape": ["batch", 4, "height", "width"]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float16", "shape": ["batch", "sequence", 768]},
        {"name": "down_residual_3", "dtype": "float16", "shape": ["batch", 320, "height/2", "width/2"]},
    ]},
    "text_encoder": {"inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", 77]}]},
    "vae_decoder": {"inputs": [{"name": "latent", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}]},
    "vae_encoder": {"inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, "height*8", "width*8"]}]},
}


def test_unavailable_says_what_is_missing():
    if HAS_TENSORRT:
        assert unavailable() is None
    else:
        assert unavailable() == "the tensorrt package is not installed"


def test_the_runtime_is_registered_and_refuses_to_load_without_tensorrt(plugin_host, tiny_sd_path):
    spec = plugin_host.registry.runtimes.get("trt")
    assert spec.name == "tensorrt"
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(ModelLoadError, match="runtime 'tensorrt' cannot run here: the tensorrt package is not installed"):
        aipaint.load(tiny_sd_path, host=plugin_host, runtime="tensorrt", runtime_options={"engine_dir": "x"})


def test_default_profiles_cover_batch_1_to_4_and_256_to_1024_px():
    profiles = component_profiles(SD15_LIKE, ProfileSettings(), vae_scale_factor=8)
    unet = profiles["unet"]
    # classifier-free guidance doubles the UNet's batch: 1 image → 2, 4 images → 8
    assert unet["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert unet["timestep"] == ((1,), (2,), (8,))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 231, 768))
    assert unet["down_residual_3"] == ((1, 320, 16, 16), (2, 320, 32, 32), (8, 320, 64, 64))
    assert profiles["text_encoder"]["input_ids"] == ((1, 77), (1, 77), (4, 77))
    assert profiles["vae_decoder"]["latent"] == ((1, 4, 32, 32), (1, 4, 64, 64), (4, 4, 128, 128))
    assert profiles["vae_encoder"]["image"] == ((1, 3, 256, 256), (1, 3, 512, 512), (4, 3, 1024, 1024))


def test_custom_profiles_and_their_validation():
    settings = ProfileSettings(min_batch=1, opt_batch=2, max_batch=2, min_size=512, opt_size=768, max_size=768, max_chunks=1)
    unet = component_profiles(SD15_LIKE, settings, vae_scale_factor=8)["unet"]
    assert unet["sample"] == ((1, 4, 64, 64), (4, 4, 96, 96), (4, 4, 96, 96))
    assert unet["encoder_hidden_states"][2] == (4, 77, 768)
    for bad, field in (
        (ProfileSettings(min_batch=3, opt_batch=2), "batch"),
        (ProfileSettings(min_size=1024, opt_size=512), "size"),
        (ProfileSettings(max_size=1000), "max_size"),
        (ProfileSettings(max_chunks=0), "max_chunks"),
    ):
        with pytest.raises(InvalidParameter, match=field):
            component_profiles(SD15_LIKE, bad, vae_scale_factor=8)


def test_shape_in_profile():
    profile = ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))
    assert shape_in_profile((2, 4, 96, 64), profile)
    assert not shape_in_profile((2, 4, 136, 64), profile)
    assert not shape_in_profile((16, 4, 64, 64), profile)
    assert not shape_in_profile((2, 4, 64), profile)


@pytest.fixture(scope="module")
def fake_engine_dir(tiny_pipe, tmp_path_factory) -> Path:
    """An engine folder as `aipaint export tensorrt` writes it, with placeholder plans (no TensorRT here)."""
    onnx = export_onnx(tiny_pipe.model, tmp_path_factory.mktemp("trt") / "onnx", components=("unet", "vae_decoder"))
    folder = onnx.root.parent / "engines"
    folder.mkdir()
    settings = ProfileSettings(min_size=64, opt_size=64, max_size=128)
    profiles = component_profiles(onnx.components, settings, tiny_pipe.model.vae_scale_factor)
    components = {}
    for name, entry in onnx.components.items():
        (folder / f"{name}.plan").write_bytes(b"plan:" + name.encode())
        components[name] = {"file": f"{name}.plan", "precision": "fp16", "inputs": entry["inputs"],
                            "outputs": entry["outputs"], "files": {f"{name}.plan": file_record(folder / f"{name}.plan")}}
    data = engine_manifest(onnx, profiles, components, tensorrt_version="10.9.0", device_name="NVIDIA H100",
                           compute_capability="9.0", fp16=True, refittable=True, settings=settings)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    return folder


def test_engine_manifest_round_trips_and_keeps_the_model_identity(tiny_pipe, fake_engine_dir):
    manifest = read_engine_manifest(fake_engine_dir)
    assert manifest.data["format"] == ENGINE_FORMAT
    assert manifest.model["model_hash"] == tiny_pipe.model.model_hash
    trt = manifest.data["tensorrt"]
    assert trt["refittable"] and trt["compute_capability"] == "9.0"
    assert trt["profiles"]["unet"]["sample"] == [[1, 4, 32, 32], [2, 4, 32, 32], [8, 4, 64, 64]]
    check_engine_folder(tiny_pipe.model, TrtOptions.parse({"engine_dir": str(fake_engine_dir)}))


def test_engines_are_tied_to_tensorrt_version_and_gpu(fake_engine_dir):
    manifest = read_engine_manifest(fake_engine_dir)
    assert compatibility_problem(manifest, "10.9.0", "9.0") is None
    assert "TensorRT 10.9.0, this is TensorRT 10.11.0" in compatibility_problem(manifest, "10.11.0", "9.0")
    assert "compute capability 9.0 (NVIDIA H100), this GPU has 8.9" in compatibility_problem(manifest, "10.9.0", "8.9")


def test_bad_engine_folders_are_refused_before_any_gpu_work(tiny_pipe, fake_engine_dir, tmp_path):
    options = TrtOptions.parse({"engine_dir": str(tmp_path / "copy")})
    shutil.copytree(fake_engine_dir, tmp_path / "copy")
    (tmp_path / "copy" / "unet.plan").write_bytes(b"plan:tenu")  # same size, other bytes
    with pytest.raises(ModelLoadError, match="unet.plan is corrupt.*aipaint export tensorrt"):
        check_engine_folder(tiny_pipe.model, options)
    (tmp_path / "copy" / "unet.plan").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        check_engine_folder(tiny_pipe.model, options)
    onnx_folder = fake_engine_dir.parent / "onnx"
    with pytest.raises(ModelLoadError, match="expected 'aipaint-tensorrt'"):  # an ONNX export is not an engine folder
        check_engine_folder(tiny_pipe.model, TrtOptions.parse({"engine_dir": str(onnx_folder)}))
    with pytest.raises(ModelLoadError, match="device='cuda'"):
        check_device(tiny_pipe.model)


def test_runtime_options_are_validated():
    with pytest.raises(InvalidParameter, match="engine_dir"):
        TrtOptions.parse({})
    with pytest.raises(InvalidParameter, match="accepts"):
        TrtOptions.parse({"engine_dir": "x", "onnx_dir": "y"})
    with pytest.raises(InvalidParameter, match="cuda_graphs"):
        TrtOptions.parse({"engine_dir": "x", "cuda_graphs": "yes"})
    assert TrtOptions.parse({"engine_dir": "x"}).cuda_graphs is True


def test_cli_export_tensorrt_explains_what_is_missing(tmp_path, capsys):
    if HAS_TENSORRT:
        pytest.skip("tensorrt is installed here")
    assert cli_main(["export", "tensorrt", str(tmp_path), "-o", str(tmp_path / "engines")]) == 2
    assert "the tensorrt package is not installed" in capsys.readouterr().err


@NEEDS_TRT
def test_build_run_and_refit_engines(tiny_sd_path, plugin_host, tmp_path):  # pragma: no cover - needs a GPU
    import numpy as np
    from aipaint_plugins.tensorrt_runtime.build import build_engines, refit_engines

    reference = aipaint.load(tiny_sd_path, host=plugin_host, device="cuda")
    onnx = export_onnx(reference.model, tmp_path / "onnx")
    settings = ProfileSettings(min_size=64, opt_size=64, max_size=128)
    engines = build_engines(onnx.root, tmp_path / "engines", settings=settings, fp16=False)
    pipe = aipaint.load(tiny_sd_path, host=plugin_host, device="cuda", runtime="tensorrt",
                        runtime_options={"engine_dir": str(engines.root)})
    params = dict(seed=1, steps=3, width=64, height=64)
    a = np.asarray(reference.txt2img("a red circle", **params).images[0], dtype=int)
    b = np.asarray(pipe.txt2img("a red circle", **params).images[0], dtype=int)
    assert np.abs(a - b).max() <= 2
    refit_engines(engines.root, onnx.root)
