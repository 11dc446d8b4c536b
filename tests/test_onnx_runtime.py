"""ONNX export and the onnxruntime runtime: parity with torch, the manifest, and refusing bad folders.

The shared export (``onnx_dir``) holds every component plus two ControlNets built like
tests/test_controlnet.py's tiny ones: a diffusers folder (``tiny-cn``) and a single
safetensors file (``file-cn``); ``Other-CN`` stays out of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from aipaint_plugins.onnx_runtime.export import LoraSpec, export_onnx, residual_layout
from aipaint_plugins.onnx_runtime.runtime import ExportedControlNet
from conftest import save_tiny_sd
from PIL import Image
from test_controlnet import _control_image, _tiny_controlnet

import aipaint
from aipaint.cli.main import main as cli_main
from aipaint.errors import AipaintError, InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.plugin.kit.exports import (
    MANIFEST_NAME,
    bind_symbols,
    probe_mismatch,
    read_manifest,
    resolve_shape,
)
from aipaint.plugin.kit.stand_ins import NotInExport

pytest.importorskip("onnxruntime")

GEN = dict(seed=7, steps=3, width=32, height=32, cfg_scale=5.0)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.fixture(scope="module")
def cn_folder(tiny_pipe, tmp_path_factory) -> Path:
    """A ControlNet folder, set as ``AIPAINT_CONTROLNET_DIR`` for the whole module."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("controlnets")
    _tiny_controlnet(tiny_pipe.model.unet, 1).save_pretrained(folder / "tiny-cn")
    _tiny_controlnet(tiny_pipe.model.unet, 2).save_pretrained(folder / "styles" / "Other-CN")
    state = _tiny_controlnet(tiny_pipe.model.unet, 3).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "file-cn.safetensors"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIPAINT_CONTROLNET_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def onnx_dir(tiny_pipe, cn_folder, tmp_path_factory) -> Path:
    controlnets = [cn_folder / "tiny-cn", cn_folder / "file-cn.safetensors"]  # paths here, names in the units
    return export_onnx(tiny_pipe.model, tmp_path_factory.mktemp("export") / "tiny-onnx", controlnets=controlnets).root


@pytest.fixture(scope="module")
def ort_pipe(tiny_sd_path, plugin_host, onnx_dir):
    return aipaint.load(tiny_sd_path, host=plugin_host, runtime="onnxruntime", runtime_options={"onnx_dir": str(onnx_dir)})


def load_with(tiny_sd_path, plugin_host, folder, **options):
    return aipaint.load(tiny_sd_path, host=plugin_host, runtime="onnxruntime", runtime_options={"onnx_dir": str(folder), **options})


@pytest.fixture(scope="module")
def untouched_model(tiny_sd_path, plugin_host):
    """A torch model of its own for the tests where preparing must fail (a failed prepare changes nothing)."""
    model = aipaint.load(tiny_sd_path, host=plugin_host).model
    yield model
    assert model.runtime == "torch" and type(model.unet).__name__ == "UNet2DConditionModel"


def prepare_with(model, folder, **options) -> None:
    from aipaint_plugins.onnx_runtime.runtime import prepare_onnxruntime

    prepare_onnxruntime(model, {"onnx_dir": str(folder), **options})


def damaged_copy(onnx_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(onnx_dir, copy)
    return copy


# --- parity with torch ---------------------------------------------------------------------------


def test_txt2img_matches_torch_with_cfg_batch_and_other_sizes(tiny_pipe, ort_pipe):
    assert ort_pipe.model.runtime == "onnxruntime"
    assert ort_pipe.model.unet.providers[0] == "CPUExecutionProvider"
    for params in (GEN, dict(GEN, width=40, height=48, batch_size=2), dict(GEN, cfg_scale=1.0)):
        torch_pixels = pixels(tiny_pipe.txt2img("a red circle", "blurry", **params))
        ort_pixels = pixels(ort_pipe.txt2img("a red circle", "blurry", **params))
        assert np.abs(torch_pixels - ort_pixels).max() <= 1, params


def test_prompt_features_run_through_the_exported_text_encoder(tiny_pipe, ort_pipe):
    """Clip skip needs every hidden state, long prompts several chunks, emphasis the raw output."""
    long_prompt = "(a red circle:1.3), " + ", ".join(["a blue square"] * 30)
    for prompt, extra in (("a red circle", {"clip_skip": 2}), (long_prompt, {})):
        a = pixels(tiny_pipe.txt2img(prompt, **GEN, **extra))
        b = pixels(ort_pipe.txt2img(prompt, **GEN, **extra))
        assert np.abs(a - b).max() <= 1, prompt
    encoded = ort_pipe.model.encode_texts([long_prompt])[0].embeds
    assert encoded.shape[1] == 2 * 77


def test_img2img_and_inpaint_match_torch(tiny_pipe, ort_pipe):
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    for run in (
        lambda p: p.img2img(image, "a red circle", denoising_strength=0.6, **GEN),
        lambda p: p.inpaint(image, mask, "a red circle", denoising_strength=0.8, **GEN),
    ):
        assert np.abs(pixels(run(tiny_pipe)) - pixels(run(ort_pipe))).max() <= 1
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(tiny_pipe.model.encode(x), ort_pipe.model.encode(x), atol=1e-4)


def test_controlnet_residuals_reach_the_exported_unet(tiny_pipe, ort_pipe):
    """ControlNet runs beside the runtime; its residuals must steer the exported UNet exactly as the torch one."""
    unet = tiny_pipe.model.unet
    g = torch.Generator().manual_seed(0)
    sample, embeds, t = torch.randn(2, 4, 12, 12, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor(321.0)
    layout = residual_layout(unet)
    residuals = [torch.randn(2, c, -(-12 // 2**lvl), -(-12 // 2**lvl), generator=g) for c, lvl in layout]
    kwargs = {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
    with torch.inference_mode():
        expected = tiny_pipe.model.unet_call(sample, t, embeds, **kwargs)
        got = ort_pipe.model.unet_call(sample, t, embeds, **kwargs)
        plain = ort_pipe.model.unet_call(sample, t, embeds)
    assert torch.allclose(expected, got, atol=1e-4)
    assert not torch.allclose(plain, got, atol=1e-2)  # the residuals did something
    with pytest.raises(UnsupportedFeature, match="residuals"):
        ort_pipe.model.unet_call(sample, t, embeds, down_block_additional_residuals=residuals[:-2],
                                 mid_block_additional_residual=residuals[-1])


def cn_unit(model="tiny-cn", **options):
    from aipaint.plugin.adapters import AdapterUnit

    return AdapterUnit("controlnet", {"model": model, "image": _control_image(), **options})


def controlnets_used(pipe, *units) -> list:
    """The ControlNet module each unit's loop contributor runs (a torch module or an exported stand-in)."""
    from engine_support import record_job

    from aipaint.api.request import GenerationRequest

    with record_job() as job:
        pipe.generate(GenerationRequest(prompt="a red square", adapters=units, **{**GEN, "steps": 1}))
    return [c.controlnet for c in job.contributors]


def test_a_controlnet_not_in_the_export_runs_in_torch_beside_it(tiny_pipe, ort_pipe):
    units = (cn_unit("Other-CN", preprocessor="none"),)
    [used] = controlnets_used(ort_pipe, *units)
    assert type(used).__name__ == "ControlNetModel"  # torch, by default
    with_torch = pixels(tiny_pipe.txt2img("a red square", adapters=units, **GEN))
    with_ort = pixels(ort_pipe.txt2img("a red square", adapters=units, **GEN))
    assert np.abs(with_torch - with_ort).max() <= 1
    assert np.abs(with_ort - pixels(ort_pipe.txt2img("a red square", **GEN))).mean() > 1


# --- exported ControlNets ----------------------------------------------------------------------


def test_exported_controlnets_run_through_onnx_runtime_and_match_torch(tiny_pipe, ort_pipe):
    """Every mode, several units, other sizes and a batch: the control image's axes are dynamic too."""
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    two = (cn_unit(weight=0.8), cn_unit("file-cn", control_mode="ControlNet is more important", guidance_end=0.5))
    runs = {
        "txt2img": lambda p, u: p.txt2img("a red square", adapters=u, **GEN),
        "other size, batch": lambda p, u: p.txt2img("a red square", adapters=u, **dict(GEN, width=40, height=48, batch_size=2)),
        "img2img": lambda p, u: p.img2img(image, "a red square", adapters=u, denoising_strength=0.6, **GEN),
        "inpaint": lambda p, u: p.inpaint(image, mask, "a red square", adapters=u, denoising_strength=0.8, **GEN),
    }
    for label, run in runs.items():
        for units in ((cn_unit(),), two):
            assert np.abs(pixels(run(tiny_pipe, units)) - pixels(run(ort_pipe, units))).max() <= 1, (label, len(units))
    used = controlnets_used(ort_pipe, *two)
    assert [type(c) for c in used] == [ExportedControlNet, ExportedControlNet]
    assert [c.key for c in used] == ["tiny-cn", "file-cn"]
    plain = pixels(ort_pipe.txt2img("a red square", **GEN))
    controlled = ort_pipe.txt2img("a red square", adapters=(cn_unit(),), **GEN)
    assert np.abs(pixels(controlled) - plain).mean() > 1  # the exported ControlNet steered the image
    assert controlled.parameters == tiny_pipe.txt2img("a red square", adapters=(cn_unit(),), **GEN).parameters


def test_the_exported_controlnet_is_called_like_diffusers_one(ort_pipe, cn_folder):
    from diffusers import ControlNetModel

    [stand_in] = controlnets_used(ort_pipe, cn_unit())
    reference = ControlNetModel.from_pretrained(cn_folder / "tiny-cn")
    g = torch.Generator().manual_seed(0)
    sample, embeds = torch.randn(2, 4, 9, 13, generator=g), torch.randn(2, 77, 32, generator=g)  # sizes never traced
    control = torch.rand(2, 3, 18, 26, generator=g)
    with torch.inference_mode():
        expected = reference(sample, torch.tensor(321.0), encoder_hidden_states=embeds, controlnet_cond=control)
        got = stand_in(sample, torch.tensor(321.0), encoder_hidden_states=embeds, controlnet_cond=control)
    assert len(got.down_block_res_samples) == len(expected.down_block_res_samples)
    for a, b in zip([*expected.down_block_res_samples, expected.mid_block_res_sample],
                    [*got.down_block_res_samples, got.mid_block_res_sample]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
    with pytest.raises(UnsupportedFeature, match="does not take conditioning_scale"):
        stand_in(sample, 321, encoder_hidden_states=embeds, controlnet_cond=control, conditioning_scale=0.5)


def test_only_the_exported_file_runs_from_the_export(tiny_pipe, ort_pipe, tiny_sd_path, plugin_host, onnx_dir, tmp_path,
                                                     monkeypatch):
    """A name alone never picks an exported ControlNet: another file of that name runs in torch
    (or is refused with torch_controlnets=false), so results never silently differ."""
    strict = load_with(tiny_sd_path, plugin_host, onnx_dir, torch_controlnets=False)
    assert [type(c) for c in controlnets_used(strict, cn_unit())] == [ExportedControlNet]
    with pytest.raises(UnsupportedFeature, match="'Other-CN'.*not in the export.*'tiny-cn', 'file-cn'") as caught:
        controlnets_used(strict, cn_unit("Other-CN"))
    assert "--controlnet NAME" in str(caught.value) and "torch_controlnets=true" in str(caught.value)

    _tiny_controlnet(tiny_pipe.model.unet, 5).save_pretrained(tmp_path / "tiny-cn")  # same name, other weights
    monkeypatch.setenv("AIPAINT_CONTROLNET_DIR", str(tmp_path))
    [used] = controlnets_used(ort_pipe, cn_unit())
    assert type(used).__name__ == "ControlNetModel"
    units = (cn_unit(),)
    assert np.abs(pixels(ort_pipe.txt2img("a red square", adapters=units, **GEN))
                  - pixels(tiny_pipe.txt2img("a red square", adapters=units, **GEN))).max() <= 1
    with pytest.raises(UnsupportedFeature, match="of that name, but made from another file"):
        controlnets_used(strict, cn_unit())


def test_a_unit_that_configures_the_file_otherwise_runs_in_torch(ort_pipe, tiny_sd_path, plugin_host, onnx_dir, cn_folder):
    """file-cn was exported configured from the base UNet; a unit's own config builds another model."""
    unit = cn_unit("file-cn", config=str(cn_folder / "tiny-cn"))
    assert type(controlnets_used(ort_pipe, unit)[0]).__name__ == "ControlNetModel"
    assert [type(c) for c in controlnets_used(ort_pipe, cn_unit("file-cn"))] == [ExportedControlNet]
    strict = load_with(tiny_sd_path, plugin_host, onnx_dir, torch_controlnets=False)
    with pytest.raises(UnsupportedFeature, match="another file or config"):
        controlnets_used(strict, unit)


def test_an_exported_controlnet_is_checked_against_the_model_like_a_torch_one(tiny_sd_path, plugin_host, onnx_dir,
                                                                            tmp_path):
    folder = damaged_copy(onnx_dir, tmp_path)
    _edit_manifest(folder, lambda m: m["controlnets"]["tiny-cn"]["config"].update(cross_attention_dim=768))
    pipe = load_with(tiny_sd_path, plugin_host, folder)
    with pytest.raises(ModelLoadError, match="another base model"):
        controlnets_used(pipe, cn_unit())


def test_a_controlnet_given_as_an_object_runs_in_torch(ort_pipe, tiny_sd_path, plugin_host, onnx_dir, cn_folder):
    from diffusers import ControlNetModel

    exported_weights = ControlNetModel.from_pretrained(cn_folder / "tiny-cn")  # no file to recognise it by
    [used] = controlnets_used(ort_pipe, cn_unit(exported_weights))
    assert isinstance(used, ControlNetModel)
    strict = load_with(tiny_sd_path, plugin_host, onnx_dir, torch_controlnets=False)
    with pytest.raises(UnsupportedFeature, match="ControlNetModel object"):
        controlnets_used(strict, cn_unit(exported_weights))
    with pytest.raises(InvalidParameter, match="torch_controlnets"):
        load_with(tiny_sd_path, plugin_host, onnx_dir, torch_controlnets="no")


def test_the_exported_unet_is_found_at_sizes_the_trace_did_not_see(tiny_pipe, ort_pipe):
    """Traced at an odd latent size, the graph passes explicit up-sampling sizes: odd sizes work too."""
    sample, embeds = torch.randn(1, 4, 9, 13), torch.randn(1, 77, 32)
    with torch.inference_mode():
        expected = tiny_pipe.model.unet_call(sample, torch.tensor(10.0), embeds)
        got = ort_pipe.model.unet_call(sample, torch.tensor(10.0), embeds)
    assert torch.allclose(expected, got, atol=1e-4)


def test_sdxl_exports_both_text_encoders_and_its_extra_unet_inputs(plugin_host, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from test_sdxl import build_tiny_sdxl_components

    folder = tmp_path / "sdxl"
    StableDiffusionXLPipeline(**build_tiny_sdxl_components()).save_pretrained(folder)
    reference = aipaint.load(folder, host=plugin_host)
    manifest = export_onnx(reference.model, tmp_path / "sdxl-onnx", components=("unet", "text_encoder", "vae_decoder"))
    assert set(manifest.components) == {"unet", "text_encoder", "text_encoder_2", "vae_decoder"}
    assert [io["name"] for io in manifest.io("unet", "inputs")][3:5] == ["text_embeds", "time_ids"]
    pipe = load_with(folder, plugin_host, manifest.root)
    params = dict(seed=1, steps=3, width=64, height=64)
    assert np.abs(pixels(pipe.txt2img("a red circle", **params)) - pixels(reference.txt2img("a red circle", **params))).max() <= 1


def test_stand_ins_refuse_weight_patching_loudly(ort_pipe):
    unet = ort_pipe.model.unet
    assert unet.config.in_channels == 4  # configs stay readable
    assert not hasattr(unet, "down_blocks")  # hasattr works (an AttributeError) …
    with pytest.raises(NotInExport, match="fused at export"):  # … and the message says what to do
        _ = unet.down_blocks
    assert isinstance(NotInExport("x"), UnsupportedFeature)
    assert list(ort_pipe.model.unet.parameters()) == []  # the torch weights are gone


def test_fp16_export_runs_close_to_torch(tiny_pipe, tiny_sd_path, plugin_host, cn_folder, tmp_path):
    manifest = export_onnx(tiny_pipe.model, tmp_path / "fp16", fp16=True, components=("unet", "text_encoder", "vae_decoder"),
                           controlnets=["tiny-cn"])
    assert manifest.data["precision"] == "fp16"
    assert manifest.components["unet"]["precision"] == "fp16"
    assert {io["name"]: io["dtype"] for io in manifest.io("unet", "inputs")}["sample"] == "float16"
    assert manifest.components["vae_decoder"]["precision"] == "fp32"  # --fp16-vae is separate
    assert manifest.components["text_encoder"]["precision"] == "fp32"
    assert manifest.controlnets["tiny-cn"]["precision"] == "fp16"  # ControlNets follow the UNet
    assert {io["name"]: io["dtype"] for io in manifest.io("controlnet/tiny-cn", "inputs")}["controlnet_cond"] == "float16"
    pipe = load_with(tiny_sd_path, plugin_host, manifest.root)
    assert np.abs(pixels(pipe.txt2img("a red circle", **GEN)) - pixels(tiny_pipe.txt2img("a red circle", **GEN))).max() <= 3
    units = (cn_unit(),)
    assert [type(c) for c in controlnets_used(pipe, *units)] == [ExportedControlNet]
    assert np.abs(pixels(pipe.txt2img("a red circle", adapters=units, **GEN))
                  - pixels(tiny_pipe.txt2img("a red circle", adapters=units, **GEN))).max() <= 3


# --- the manifest ------------------------------------------------------------------------------------


def test_manifest_records_what_a_runtime_needs(tiny_pipe, onnx_dir):
    data = json.loads((onnx_dir / MANIFEST_NAME).read_text())
    assert data["format"] == "aipaint-onnx" and data["opset"] == 17 and data["precision"] == "fp32"
    assert data["aipaint_version"] == aipaint.__version__
    assert set(data["components"]) == {"unet", "text_encoder", "vae_decoder", "vae_encoder"}
    assert data["model"]["model_hash"] == tiny_pipe.model.model_hash and data["model"]["model_hash"]
    assert data["loras"] == []
    unet_inputs = {io["name"]: io["shape"] for io in data["components"]["unet"]["inputs"]}
    assert unet_inputs["sample"] == ["batch", 4, "height", "width"]
    assert unet_inputs["encoder_hidden_states"] == ["batch", "sequence", 32]
    assert unet_inputs["down_residual_2"] == ["batch", 32, "height/2", "width/2"]  # the first down-sampler
    assert unet_inputs["mid_residual"] == ["batch", 64, "height/2", "width/2"]
    assert len([n for n in unet_inputs if "residual" in n]) == len(residual_layout(tiny_pipe.model.unet))
    assert data["components"]["vae_decoder"]["outputs"][0]["shape"] == ["batch", 3, "height*2", "width*2"]
    for entry in data["components"].values():
        for relative, record in entry["files"].items():
            assert (onnx_dir / relative).stat().st_size == record["size"]


def test_manifest_records_the_exported_controlnets(tiny_pipe, onnx_dir, cn_folder):
    import onnx
    from aipaint_plugins.controlnet.models import a1111_model_hash

    from aipaint.plugin.kit.hashing import sha256_file

    data = json.loads((onnx_dir / MANIFEST_NAME).read_text())
    assert set(data["controlnets"]) == {"tiny-cn", "file-cn"}
    folder_weights = cn_folder / "tiny-cn" / "diffusion_pytorch_model.safetensors"
    assert data["controlnets"]["tiny-cn"]["source"] == {
        "name": "tiny-cn",
        "short_hash": a1111_model_hash(folder_weights),
        "sha256": sha256_file(folder_weights),
        "size": folder_weights.stat().st_size,
        "config_sha256": sha256_file(cn_folder / "tiny-cn" / "config.json"),
    }
    single = data["controlnets"]["file-cn"]["source"]
    assert single["sha256"] == sha256_file(cn_folder / "file-cn.safetensors")
    assert single["config_sha256"] is None  # configured from the base UNet
    entry = data["controlnets"]["tiny-cn"]
    assert entry["precision"] == "fp32" and entry["file"] == "controlnet/tiny-cn/model.onnx"
    assert entry["config"]["conditioning_embedding_out_channels"] == [8, 16]
    assert not any(key.startswith("_") for key in entry["config"])  # no local paths
    inputs = {io["name"]: io["shape"] for io in entry["inputs"]}
    assert inputs == {
        "sample": ["batch", 4, "height", "width"],
        "timestep": ["batch"],
        "encoder_hidden_states": ["batch", "sequence", 32],
        "controlnet_cond": ["batch", 3, "height*2", "width*2"],  # the control image, at image resolution
    }
    unet_residuals = [io for io in data["components"]["unet"]["inputs"] if "residual" in io["name"]]
    assert entry["outputs"] == unet_residuals
    graph = onnx.load(str(onnx_dir / entry["file"]), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["controlnet_cond"] == ["batch", 3, "height*2", "width*2"]  # dynamic axes in the graph itself
    for relative, record in entry["files"].items():
        assert (onnx_dir / relative).stat().st_size == record["size"]


def test_symbolic_shapes_resolve_and_bind():
    values = {"batch": 2, "height": 9, "width": 12, "sequence": 154}
    assert resolve_shape(["batch", 320, "height/2", "width*8", "sequence", 77], values) == (2, 320, 5, 96, 154, 77)
    bound: dict[str, int] = {}
    bind_symbols(["batch", 3, "height*8", "width*8"], (1, 3, 256, 512), bound)
    assert bound == {"batch": 1, "height": 32, "width": 64}
    with pytest.raises(ValueError, match="multiple of 8"):
        bind_symbols(["batch", 3, "height*8", "width*8"], (1, 3, 250, 512), {})
    with pytest.raises(ValueError, match="fixed"):
        bind_symbols(["batch", 4], (1, 9), {})
    with pytest.raises(ValueError, match="another input"):
        bind_symbols(["batch"], (3,), {"batch": 2})


def test_weight_probe_tolerates_dtype_changes_but_not_other_weights(tiny_pipe):
    import copy

    from aipaint.plugin.kit.exports import weights_probe

    unet = tiny_pipe.model.unet
    probe = weights_probe({"unet": unet})
    assert probe_mismatch(probe, weights_probe({"unet": copy.deepcopy(unet).to(torch.bfloat16)})) is None
    assert probe_mismatch(probe, weights_probe({"unet": copy.deepcopy(unet).half()})) is None
    shifted = {k: [v * 1.1 + 0.01 for v in vals] for k, vals in probe.items()}
    assert "differ" in probe_mismatch(probe, shifted)


# --- refusing bad folders ---------------------------------------------------------------------------


def test_missing_folder_and_missing_option_say_what_to_do(tiny_sd_path, plugin_host, untouched_model, tmp_path):
    with pytest.raises(ModelLoadError, match="aipaint export onnx"):
        prepare_with(untouched_model, tmp_path / "nothing-here")
    with pytest.raises(InvalidParameter, match="onnx_dir"):  # through aipaint.load, as users call it
        aipaint.load(tiny_sd_path, host=plugin_host, runtime="onnxruntime")
    with pytest.raises(InvalidParameter, match="accepts"):
        prepare_with(untouched_model, tmp_path, onnx_folder="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no manifest.json"):
        prepare_with(untouched_model, tmp_path / "empty")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / MANIFEST_NAME).write_text("{not json"), "not readable JSON"),
        (lambda d: _edit_manifest(d, lambda m: m.update(format_version=99)), "format_version 99"),
        (lambda d: _edit_manifest(d, lambda m: m["components"].pop("unet")), "no unet"),
        (lambda d: _edit_manifest(d, lambda m: m["components"]["unet"]["inputs"][0].update(shape=["rows"])),
         "not a symbolic dimension"),
        (lambda d: (d / "unet" / "model.onnx.data").unlink(), "incomplete: unet/model.onnx.data"),
        (lambda d: _truncate(d / "vae_decoder" / "model.onnx.data"), "corrupt"),
        (lambda d: _flip_byte(d / "unet" / "model.onnx.data"), "sha256 differs"),
        (lambda d: _edit_manifest(d, lambda m: m["components"]["unet"]["files"].update({"../../etc/passwd": {"size": 1, "sha256": "0"}})),
         "outside the folder"),
        (lambda d: _flip_byte(d / "controlnet" / "tiny-cn" / "model.onnx.data"), "controlnet/tiny-cn/model.onnx.data is corrupt"),
        (lambda d: (d / "controlnet" / "file-cn" / "model.onnx").unlink(), "incomplete: controlnet/file-cn/model.onnx"),
        (lambda d: _edit_manifest(d, lambda m: m["controlnets"]["tiny-cn"]["outputs"].pop(0)),
         "ControlNet 'tiny-cn' does not fit the exported UNet"),
        (lambda d: _edit_manifest(d, lambda m: m["components"]["unet"].update(
            inputs=[io for io in m["components"]["unet"]["inputs"] if "residual" not in io["name"]])),
         "UNet was exported without ControlNet inputs"),
        (lambda d: _edit_manifest(d, lambda m: m["controlnets"].update({"../x": m["controlnets"].pop("tiny-cn")})),
         "not a plain name"),
        (lambda d: _edit_manifest(d, lambda m: m["controlnets"]["tiny-cn"].pop("source")), "ControlNet 'tiny-cn' lacks 'source'"),
        (lambda d: _edit_manifest(d, lambda m: m["controlnets"]["tiny-cn"]["source"].pop("sha256")), "lacks its source record"),
        (lambda d: _edit_manifest(d, lambda m: m["controlnets"]["file-cn"]["files"].update({"../cn.data": {"size": 1, "sha256": "0"}})),
         "outside the folder"),
    ],
    ids=["bad-json", "future-version", "no-unet", "bad-shape", "missing-file", "truncated", "bit-flip", "escaping-path",
         "controlnet-bit-flip", "controlnet-missing-file", "controlnet-residuals-differ", "unet-without-residuals",
         "controlnet-escaping-key", "controlnet-no-source", "controlnet-partial-source", "controlnet-escaping-path"],
)
def test_corrupt_folders_are_refused_with_a_reason(untouched_model, onnx_dir, tmp_path, damage, message):
    folder = damaged_copy(onnx_dir, tmp_path)
    damage(folder)
    with pytest.raises(ModelLoadError, match=message) as caught:
        prepare_with(untouched_model, folder)
    assert "export onnx" in str(caught.value)


def test_a_controlnet_graph_that_is_another_network_is_refused(untouched_model, onnx_dir, tmp_path):
    """Even with the manifest's hashes made to match, a swapped-in graph is caught by its inputs."""
    from aipaint.plugin.kit.exports import file_record

    folder = damaged_copy(onnx_dir, tmp_path)
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(folder / "vae_decoder" / name, folder / "controlnet" / "tiny-cn" / name)

    def rehash(manifest):
        files = manifest["controlnets"]["tiny-cn"]["files"]
        for relative in files:
            files[relative] = file_record(folder / relative)

    _edit_manifest(folder, rehash)
    with pytest.raises(ModelLoadError, match=r"controlnet/tiny-cn/model.onnx has inputs \['latent'\]") as caught:
        prepare_with(untouched_model, folder)
    assert "export onnx" in str(caught.value)


def test_a_damaged_graph_that_passes_size_checks_is_still_refused(untouched_model, onnx_dir, tmp_path):
    folder = damaged_copy(onnx_dir, tmp_path)
    graph = folder / "vae_encoder" / "model.onnx"
    graph.write_bytes(b"\0" * graph.stat().st_size)
    with pytest.raises(ModelLoadError, match="could not open"):
        prepare_with(untouched_model, folder, verify="size")


def test_an_export_of_another_model_is_refused(tiny_sd_path, plugin_host, onnx_dir, tmp_path):
    other = save_tiny_sd(tmp_path / "other", seed=1)  # same architecture, other weights
    with pytest.raises(ModelLoadError, match="has hash") as caught:
        load_with(other, plugin_host, onnx_dir)
    assert "load the model it was exported from" in str(caught.value)
    folder = damaged_copy(onnx_dir, tmp_path)
    _edit_manifest(folder, lambda m: m["model"].update(model_hash=""))  # e.g. a model built in memory
    with pytest.raises(ModelLoadError, match="weights differ"):
        load_with(other, plugin_host, folder)
    _edit_manifest(folder, lambda m: m["model"].update(structure_hash="0" * 64))
    with pytest.raises(ModelLoadError, match="architecture differs"):
        load_with(tiny_sd_path, plugin_host, folder)  # through aipaint.load: a user's view


def test_probe_positions_stay_inside_big_tensors():
    from aipaint.plugin.kit.exports import probe_indices

    assert probe_indices(29_491_200, 4) == [0, 9_830_399, 19_660_799, 29_491_199]  # an SD1.5 UNet weight
    assert probe_indices(3, 4) == [0, 1, 2] and probe_indices(1, 4) == [0]


def test_the_weight_probe_alone_catches_another_model(tiny_pipe, tmp_path):
    from aipaint.plugin.kit.exports import weights_probe

    other = aipaint.load(save_tiny_sd(tmp_path / "other", seed=1))
    assert probe_mismatch(weights_probe(tiny_pipe.model.modules()), weights_probe(other.model.modules()))


def test_unavailable_providers_are_an_error_not_a_silent_cpu_run(untouched_model, onnx_dir):
    with pytest.raises(ModelLoadError, match="onnxruntime-gpu"):
        prepare_with(untouched_model, onnx_dir, providers="cuda")
    with pytest.raises(InvalidParameter, match="providers"):
        prepare_with(untouched_model, onnx_dir, providers="tpu")


# --- export behaviour ------------------------------------------------------------------------------


def test_export_never_leaves_a_half_written_folder(tiny_pipe, tmp_path, monkeypatch):
    import aipaint_plugins.onnx_runtime.export as export_module

    calls = []
    real = export_module._export_component

    def fail_second(plan, folder, opset):
        calls.append(plan.name)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(plan, folder, opset)

    monkeypatch.setattr(export_module, "_export_component", fail_second)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(tiny_pipe.model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_weights_scattered_over_files_are_gathered_into_one(tmp_path):
    """Models over 2 GB come out of torch's exporter as one file per tensor; the export keeps one."""
    import onnx
    import onnxruntime as ort
    from aipaint_plugins.onnx_runtime.export import gather_external_data
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.random((64, 64), dtype=np.float32), rng.random(64, dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    scattered, out = tmp_path / "raw", tmp_path / "out"
    scattered.mkdir()
    out.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(scattered / "model.onnx"),
                    save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(scattered.iterdir())) == 3
    gather_external_data(scattered / "model.onnx", out / "model.onnx", threshold=0)
    shutil.rmtree(scattered)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.data"]
    x = rng.random((1, 64), dtype=np.float32)
    y = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.allclose(y, x @ w + b, atol=1e-5)


def test_export_refuses_to_overwrite_without_asking(tiny_pipe, onnx_dir, tmp_path):
    with pytest.raises(AipaintError, match="--overwrite"):
        export_onnx(tiny_pipe.model, onnx_dir)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(AipaintError, match="not an aipaint export"):
        export_onnx(tiny_pipe.model, tmp_path / "mine", overwrite=True)
    with pytest.raises(InvalidParameter, match="components"):
        export_onnx(tiny_pipe.model, tmp_path / "x", components=("vae_decoder",))


def test_controlnet_export_refuses_what_it_cannot_identify_or_run(tiny_pipe, cn_folder, tmp_path):
    from aipaint_plugins.controlnet.models import ControlNetNotFound
    from diffusers import ControlNetModel

    from aipaint.errors import UnsafeFileError

    out = tmp_path / "out"
    with pytest.raises(InvalidParameter, match="controlnet_inputs"):
        export_onnx(tiny_pipe.model, out, controlnet_inputs=False, controlnets=["tiny-cn"])
    with pytest.raises(InvalidParameter, match="each ControlNet once"):
        export_onnx(tiny_pipe.model, out, controlnets=["tiny-cn", cn_folder / "tiny-cn"])
    with pytest.raises(InvalidParameter, match="save_pretrained"):
        export_onnx(tiny_pipe.model, out, controlnets=[ControlNetModel.from_pretrained(cn_folder / "tiny-cn")])
    with pytest.raises(ControlNetNotFound, match="Other-CN"):  # the error lists what exists
        export_onnx(tiny_pipe.model, out, controlnets=["no-such-cn"])
    wrong = tmp_path / "cns"
    _tiny_controlnet(tiny_pipe.model.unet, 3, cond_channels=(8, 16, 32)).save_pretrained(wrong / "for-a-4x-vae")
    with pytest.raises(ModelLoadError, match="another base model"):
        export_onnx(tiny_pipe.model, out, controlnets=[wrong / "for-a-4x-vae"])
    deeper = ControlNetModel(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, norm_num_groups=8,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), conditioning_embedding_out_channels=(8, 16))
    deeper.save_pretrained(wrong / "two-layers-per-block")
    with pytest.raises(ModelLoadError, match="makes residuals"):
        export_onnx(tiny_pipe.model, out, controlnets=[wrong / "two-layers-per-block"])
    (wrong / "pickled.pth").write_bytes(b"not really a pickle")
    with pytest.raises(UnsafeFileError, match="allow_pickle"):
        export_onnx(tiny_pipe.model, out, controlnets=[wrong / "pickled.pth"])
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cns"]


def test_controlnet_keys_are_plain_and_unique():
    from aipaint_plugins.onnx_runtime.export import _controlnet_key

    assert _controlnet_key("My CN (v2)", set()) == "My-CN-v2"
    assert _controlnet_key("tiny-cn", {"Tiny-CN"}) == "tiny-cn-2"
    assert _controlnet_key("..", set()) == "controlnet"


@pytest.fixture(scope="module")
def fused_export(tiny_pipe, tiny_sd_path, plugin_host, tmp_path_factory):
    """A partial export (UNet and VAE decoder) with a strong LoRA fused in: the folder of LoRAs, the export's
    manifest and a pipeline on it. The partial-export and the LoRA tests share it, an export being the slow part."""
    from safetensors.torch import save_file

    pytest.importorskip("aipaint_plugins.lora")
    root = tmp_path_factory.mktemp("fused-export")
    folder = root / "loras"
    folder.mkdir()
    g = torch.Generator().manual_seed(61)
    up, down = torch.randn(64, 4, generator=g) * 1.5, torch.randn(4, 32, generator=g) * 1.5
    base = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    save_file({f"{base}.lora_up.weight": up, f"{base}.lora_down.weight": down, f"{base}.alpha": torch.tensor(4.0)},
              str(folder / "strong.safetensors"))
    target = tiny_pipe.model.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")
    before = target.weight.detach().clone()
    manifest = export_onnx(tiny_pipe.model, root / "fused", loras=[LoraSpec.parse("strong:0.5")], lora_dir=folder,
                           components=("unet", "vae_decoder"))
    assert torch.equal(target.weight, before)  # the torch model is the base model again
    return folder, manifest, load_with(tiny_sd_path, plugin_host, manifest.root), before


def test_partial_export_keeps_the_rest_in_torch(tiny_pipe, fused_export):
    folder, manifest, pipe, _ = fused_export
    assert manifest.components.keys() == {"unet", "vae_decoder"}
    assert type(pipe.model.text_encoder).__name__ == "CLIPTextModel"
    assert list(pipe.model.unet.parameters()) == []  # the UNet runs from the export
    image = Image.new("RGB", (32, 32), (200, 30, 30))  # img2img: the VAE encoder runs in torch, the decoder exported
    a = pixels(tiny_pipe.img2img(image, "a red circle <lora:strong:0.5>", options={"lora": {"folder": str(folder)}},
                                 denoising_strength=0.5, **GEN))
    b = pixels(pipe.img2img(image, "a red circle", denoising_strength=0.5, **GEN))
    assert np.abs(a - b).max() <= 1


def test_lora_is_fused_at_export_and_recorded(tiny_pipe, fused_export):
    folder, manifest, fused, before = fused_export
    assert manifest.loras == [{"name": "strong", "weight": 0.5}]
    expected = pixels(tiny_pipe.txt2img("a cat <lora:strong:0.5>", options={"lora": {"folder": str(folder)}}, **GEN))
    assert np.abs(pixels(fused.txt2img("a cat", **GEN)) - expected).max() <= 1
    assert np.abs(pixels(tiny_pipe.txt2img("a cat", **GEN)) - expected).mean() > 1  # the LoRA mattered
    target = tiny_pipe.model.unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v")
    assert torch.equal(target.weight, before)  # the torch model is the base model again
    with pytest.raises(InvalidParameter):
        LoraSpec.parse(":0.5")


def test_cli_export_then_generate(tiny_sd_path, cn_folder, tmp_path, capsys):
    out = tmp_path / "cli-onnx"
    assert cli_main(["export", "onnx", str(tiny_sd_path), "-o", str(out), "--components", "unet,vae_decoder",
                     "--controlnet", "tiny-cn", "--controlnet", str(cn_folder / "file-cn.safetensors")]) == 0
    manifest = read_manifest(out)
    assert manifest.components.keys() == {"unet", "vae_decoder"}
    assert manifest.controlnets.keys() == {"tiny-cn", "file-cn"}
    control, png = tmp_path / "control.png", tmp_path / "out.png"
    _control_image().save(control)
    code = cli_main(["generate", "a red circle", "-m", str(tiny_sd_path), "--runtime", "onnxruntime",
                     "--runtime-option", f"onnx_dir={out}", "--runtime-option", "torch_controlnets=false",
                     "--controlnet", f"tiny-cn:{control}", "--steps", "2", "-W", "32", "-H", "32", "--seed", "1",
                     "-o", str(png), "--no-progress"])
    assert code == 0 and png.is_file()  # strict: it ran through the exported ControlNet
    assert cli_main(["export", "onnx", str(tiny_sd_path), "-o", str(out), "--components", "vae"]) == 2
    assert "components" in capsys.readouterr().err
    assert cli_main(["export", "onnx", str(tiny_sd_path), "-o", str(tmp_path / "x"), "--controlnet", "tiny-cn",
                     "--no-controlnet-inputs"]) == 2
    assert "--no-controlnet-inputs" in capsys.readouterr().err


def _edit_manifest(folder: Path, change) -> None:
    data = json.loads((folder / MANIFEST_NAME).read_text())
    change(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_int8_unet_export_runs_close_to_fp32_and_is_recorded(tiny_pipe, tiny_sd_path, plugin_host, tmp_path):
    import onnx

    folder = export_onnx(tiny_pipe.model, tmp_path / "int8", components=("unet",), int8=True).root
    manifest = read_manifest(folder)
    assert manifest.components["unet"]["weights"] == "int8"
    graph = onnx.load(str(folder / "unet" / "model.onnx"), load_external_data=False)
    assert any(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in graph.graph.node)
    pipe = load_with(tiny_sd_path, plugin_host, folder)
    result = pipe.txt2img("a red circle", **GEN)
    assert "Precision: fp32 int8-weights" in result.infotexts[0]
    difference = np.abs(pixels(result) - pixels(tiny_pipe.txt2img("a red circle", **GEN)))
    assert 0 < difference.mean() < 6, difference.mean()
    with pytest.raises(InvalidParameter, match="int8"):
        export_onnx(tiny_pipe.model, tmp_path / "x", fp16=True, int8=True)
