"""OpenVINO IR conversion and the openvino runtime on the tiny random model: parity with torch,
static shapes compiled once per shape, int8 weights, precision choice and record, refusing bad folders.

What is not tested here: bf16 compute (these CPUs have no bf16 units; OpenVINO runs fp32 on them),
OpenVINO GPU devices, and speed (benchmarks/cpu_runtimes.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny_sd
from PIL import Image

import aipaint
from aipaint.cli.main import main as cli_main
from aipaint.errors import AipaintError, InvalidParameter, ModelLoadError
from aipaint.infotext import Infotext
from aipaint.plugin.kit.exports import MANIFEST_NAME

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from aipaint_plugins.onnx_runtime.export import export_onnx  # noqa: E402  (the ONNX export is the input)
from aipaint_plugins.openvino_runtime.convert import convert_to_openvino, read_ir_manifest  # noqa: E402
from aipaint_plugins.openvino_runtime.runtime import OvOptions, planned_precision  # noqa: E402

GEN = dict(seed=7, steps=3, width=32, height=32, cfg_scale=5.0)


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


@pytest.fixture(scope="module")
def onnx_dir(tiny_pipe, tmp_path_factory) -> Path:
    return export_onnx(tiny_pipe.model, tmp_path_factory.mktemp("ov-export") / "tiny-onnx").root


@pytest.fixture(scope="module")
def ov_dir(onnx_dir, tmp_path_factory) -> Path:
    return convert_to_openvino(onnx_dir, tmp_path_factory.mktemp("ov") / "tiny-ov").root


def load_with(source, plugin_host, folder, **options):
    return aipaint.load(source, host=plugin_host, runtime="openvino", runtime_options={"openvino_dir": str(folder), **options})


@pytest.fixture(scope="module")
def ov_pipe(tiny_sd_path, plugin_host, ov_dir):
    return load_with(tiny_sd_path, plugin_host, ov_dir)


def test_txt2img_matches_torch_at_several_sizes_and_batches(tiny_pipe, ov_pipe):
    assert ov_pipe.model.runtime == "openvino"
    assert ov_pipe.model.unet.providers == ["OpenVINO CPU"]
    for params in (GEN, dict(GEN, width=40, height=48, batch_size=2), dict(GEN, cfg_scale=1.0)):
        a = pixels(tiny_pipe.txt2img("a red circle", "blurry", **params))
        b = pixels(ov_pipe.txt2img("a red circle", "blurry", **params))
        assert np.abs(a - b).max() <= 1, params


def test_prompt_features_run_through_the_converted_text_encoder(tiny_pipe, ov_pipe):
    long_prompt = "(a red circle:1.3), " + ", ".join(["a blue square"] * 30)
    for prompt, extra in (("a red circle", {"clip_skip": 2}), (long_prompt, {})):
        assert np.abs(pixels(tiny_pipe.txt2img(prompt, **GEN, **extra)) - pixels(ov_pipe.txt2img(prompt, **GEN, **extra))).max() <= 1


def test_img2img_and_inpaint_match_torch(tiny_pipe, ov_pipe):
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    for run in (
        lambda p: p.img2img(image, "a red circle", denoising_strength=0.6, **GEN),
        lambda p: p.inpaint(image, mask, "a red circle", denoising_strength=0.8, **GEN),
    ):
        assert np.abs(pixels(run(tiny_pipe)) - pixels(run(ov_pipe))).max() <= 1
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(tiny_pipe.model.encode(x), ov_pipe.model.encode(x), atol=1e-4)


def test_static_shapes_compile_once_per_shape_and_keep_a_few(tiny_sd_path, plugin_host, ov_dir):
    pipe = load_with(tiny_sd_path, plugin_host, ov_dir, max_shapes=2)
    session = pipe.model.unet.session
    pipe.txt2img("a red circle", **dict(GEN, steps=4))
    assert session.compilations == 1  # four steps, one shape, one compile
    pipe.txt2img("a red circle", **dict(GEN, steps=2))
    assert session.compilations == 1
    pipe.txt2img("a red circle", **dict(GEN, width=40))
    pipe.txt2img("a red circle", **dict(GEN, width=48))
    assert session.compilations == 3 and len(session._compiled) == 2  # the oldest shape was dropped
    dynamic = load_with(tiny_sd_path, plugin_host, ov_dir, static_shapes=False)
    a = pixels(dynamic.txt2img("a red circle", **GEN))
    dynamic.txt2img("a red circle", **dict(GEN, width=40))
    assert dynamic.model.unet.session.compilations == 1
    assert np.abs(a - pixels(pipe.txt2img("a red circle", **GEN))).max() <= 1


@pytest.fixture(scope="module")
def int8_dir(onnx_dir, tmp_path_factory) -> Path:
    """The UNet alone, int8 weights, converted once through the command line (the text encoder and VAE stay in
    torch); the int8 test and the command-line test share it, a UNet conversion being the slow part of both."""
    pytest.importorskip("nncf")
    out = tmp_path_factory.mktemp("ov-int8") / "cli-int8"
    assert cli_main(["export", "openvino", str(onnx_dir), "-o", str(out), "--components", "unet", "--weights", "int8"]) == 0
    return out


@pytest.fixture(scope="module")
def int8_pipe(tiny_sd_path, plugin_host, int8_dir):
    return load_with(tiny_sd_path, plugin_host, int8_dir)


def test_int8_weights_stay_close_and_are_recorded(tiny_pipe, ov_dir, int8_dir, int8_pipe):
    manifest = read_ir_manifest(int8_dir)
    assert manifest.data["openvino"]["weights"] == "int8"
    fp32_bin = (ov_dir / "unet" / "openvino_model.bin").stat().st_size
    assert (int8_dir / "unet" / "openvino_model.bin").stat().st_size < 0.6 * fp32_bin
    result = int8_pipe.txt2img("a red circle", **GEN)
    assert Infotext.from_text(result.infotexts[0]).params["Precision"] == "fp32 int8-weights"
    difference = np.abs(pixels(result) - pixels(tiny_pipe.txt2img("a red circle", **GEN)))
    assert difference.mean() < 6, difference.mean()


def test_precision_follows_the_hint_and_what_the_cpu_can_do():
    class Core:
        def __init__(self, default: str, capabilities: list[str]) -> None:
            self.values = {"INFERENCE_PRECISION_HINT": default, "OPTIMIZATION_CAPABILITIES": capabilities}

        def get_property(self, device, name):
            return self.values[name]

    options = lambda precision: OvOptions.parse({"openvino_dir": "x", "precision": precision})  # noqa: E731
    amx = Core("bf16", ["FP32", "BF16", "INT8"])
    avx2 = Core("f32", ["FP32", "INT8"])
    assert planned_precision(amx, options("auto")) == "bf16"  # OpenVINO's own default on bf16 CPUs
    assert planned_precision(amx, options("fp32")) == "fp32"
    assert planned_precision(avx2, options("auto")) == "fp32"
    assert planned_precision(avx2, options("bf16")) == "fp32"  # OpenVINO falls back; so does the record
    assert OvOptions.parse({"openvino_dir": "x", "precision": "bf16"}).compile_config()["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "INFERENCE_PRECISION_HINT" not in OvOptions.parse({"openvino_dir": "x"}).compile_config()


def test_fp32_runs_record_no_precision(ov_pipe):
    assert ov_pipe.model.precision == "fp32"
    assert "Precision" not in Infotext.from_text(ov_pipe.txt2img("a red circle", **GEN).infotexts[0]).params


@pytest.mark.parametrize("options, field", [
    ({}, "openvino_dir"),
    ({"openvino_dir": "x", "precision": "fp8"}, "precision"),
    ({"openvino_dir": "x", "threads": -1}, "threads"),
    ({"openvino_dir": "x", "static_shapes": "yes"}, "static_shapes"),
    ({"openvino_dir": "x", "max_shapes": 0}, "max_shapes"),
    ({"openvino_dir": "x", "verify": "md5"}, "verify"),
    ({"openvino_dir": "x", "onnx_dir": "y"}, "runtime_options"),
])
def test_bad_options_are_refused(options, field):
    with pytest.raises(InvalidParameter, match=field):
        OvOptions.parse(options)


def damaged_copy(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    return copy


def _edit_manifest(folder: Path, change) -> None:
    data = json.loads((folder / MANIFEST_NAME).read_text())
    change(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def untouched_model(tiny_sd_path, plugin_host):
    """A torch model of its own for the refusals: a failed prepare checks everything before it changes anything."""
    model = aipaint.load(tiny_sd_path, host=plugin_host).model
    yield model
    assert model.runtime == "torch" and type(model.unet).__name__ == "UNet2DConditionModel"


def prepare_with(model, folder, **options) -> None:
    from aipaint_plugins.openvino_runtime.runtime import prepare_openvino

    prepare_openvino(model, {"openvino_dir": str(folder), **options})


def test_damaged_or_foreign_folders_are_refused(tiny_sd_path, plugin_host, untouched_model, ov_dir, onnx_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="no exported model folder"):  # through aipaint.load, as users call it
        load_with(tiny_sd_path, plugin_host, tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="aipaint-openvino"):
        prepare_with(untouched_model, onnx_dir)  # an ONNX export is not IR
    folder = damaged_copy(ov_dir, tmp_path)
    weights = folder / "unet" / "openvino_model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="sha256 differs.*aipaint export openvino"):
        prepare_with(untouched_model, folder)
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ModelLoadError, match="corrupt"):
        prepare_with(untouched_model, folder, verify="size")
    shutil.rmtree(folder)
    folder = damaged_copy(ov_dir, tmp_path)
    _edit_manifest(folder, lambda m: m["components"]["unet"]["files"].update({"../../escape": {"size": 1, "sha256": "0"}}))
    with pytest.raises(ModelLoadError, match="outside the folder"):
        prepare_with(untouched_model, folder)
    _edit_manifest(folder, lambda m: m.pop("openvino"))
    with pytest.raises(ModelLoadError, match="'openvino' section"):
        prepare_with(untouched_model, folder)
    other = save_tiny_sd(tmp_path / "other", seed=1)  # same architecture, other weights
    with pytest.raises(ModelLoadError, match="has hash"):
        load_with(other, plugin_host, ov_dir)


def test_conversion_is_atomic_and_never_overwrites_unasked(onnx_dir, ov_dir, tmp_path, monkeypatch):
    with pytest.raises(AipaintError, match="--overwrite"):
        convert_to_openvino(onnx_dir, ov_dir)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(AipaintError, match="not an OpenVINO export"):
        convert_to_openvino(onnx_dir, tmp_path / "other")
    import openvino as ov

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    # the UNet's graph comes from the IR already converted (reading it takes a moment, converting it many);
    # saving it fails as on a full disk, after the partial folder and the component's folder were made
    unet_ir = str(ov_dir / "unet" / "openvino_model.xml")
    monkeypatch.setattr(ov, "convert_model", lambda path, *args, **kwargs: ov.Core().read_model(unet_ir))
    monkeypatch.setattr(ov, "save_model", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_to_openvino(onnx_dir, tmp_path / "half")
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half*"))
    with pytest.raises(InvalidParameter, match="components"):
        convert_to_openvino(onnx_dir, tmp_path / "x", components=["vae_decoder"])


def test_cli_convert_subset_then_generate(tiny_sd_path, int8_dir, int8_pipe, tmp_path):
    png = tmp_path / "out.png"
    assert read_ir_manifest(int8_dir).components.keys() == {"unet"}  # the text encoder and the VAE stay in torch
    code = cli_main(["generate", "a red circle", "-m", str(tiny_sd_path), "--runtime", "openvino",
                     "--runtime-option", f"openvino_dir={int8_dir}", "--steps", "2", "-W", "32", "-H", "32", "--seed", "1",
                     "-o", str(png), "--no-progress"])
    assert code == 0 and png.is_file()
    reference = int8_pipe.txt2img("a red circle", seed=1, steps=2, width=32, height=32)
    assert np.abs(np.asarray(Image.open(png).convert("RGB"), dtype=np.int16) - pixels(reference)[0]).max() <= 1


@pytest.fixture(scope="module")
def int8a_dir(tiny_sd_path, onnx_dir, tmp_path_factory) -> Path:
    """int8 convolutions (weights and activations; everything else fp32), through the command line, calibrated on
    two prompts × 3 steps with the model loaded from its folder."""
    pytest.importorskip("nncf")
    folder = tmp_path_factory.mktemp("ov-int8a")
    (folder / "prompts.txt").write_text("a red circle\na blue square on a black background\n")
    out = folder / "tiny-int8a"
    assert cli_main(["export", "openvino", str(onnx_dir), "-o", str(out), "--activations", "int8",
                     "-m", str(tiny_sd_path), "--calibration-prompts", str(folder / "prompts.txt"),
                     "--calibration-steps", "3", "--calibration-size", "32x32"]) == 0
    return out


def quantised_convolutions(xml: Path) -> list[bool]:
    """Per convolution, in the graph's order: is its activation input a FakeQuantize (through reshapes)?"""
    import openvino as ov

    flags = []
    for op in ov.Core().read_model(str(xml)).get_ordered_ops():
        if op.get_type_name() == "Convolution":
            node = op.input_value(0).get_node()
            while node.get_type_name() in ("Reshape", "Transpose"):
                node = node.input_value(0).get_node()
            flags.append(node.get_type_name() == "FakeQuantize")
    return flags


def test_int8_activations_are_calibrated_on_the_model_and_stay_close(tiny_sd_path, plugin_host, tiny_pipe, ov_dir,
                                                                     int8a_dir):
    import openvino as ov

    manifest = read_ir_manifest(int8a_dir)
    section = manifest.data["openvino"]
    assert (section["weights"], section["activations"]) == ("fp32", "int8")
    assert section["calibration"]["samples"] == 2 * 3  # one recorded UNet call per step and prompt
    assert manifest.components["unet"]["activations"] == "int8"
    assert manifest.components["vae_decoder"]["activations"] == "float"
    flags = quantised_convolutions(int8a_dir / "unet" / "openvino_model.xml")
    inner = flags[1:-1]
    assert sum(inner) >= 0.8 * len(inner), f"{sum(inner)} of {len(inner)} inner convolutions quantised"
    assert not flags[0] and not flags[-1]  # conv_in and conv_out stay float
    for name in ("text_encoder", "vae_decoder"):  # untouched outside the UNet: the fp32 conversion's files
        assert not any(op.get_type_name() == "FakeQuantize"
                       for op in ov.Core().read_model(str(int8a_dir / name / "openvino_model.xml")).get_ops())
        weights = f"{name}/openvino_model.bin"  # the same weights as the fp32 conversion's
        assert manifest.components[name]["files"][weights] == read_ir_manifest(ov_dir).components[name]["files"][weights]
    pipe = load_with(tiny_sd_path, plugin_host, int8a_dir)
    result = pipe.txt2img("a red circle", **GEN)
    assert Infotext.from_text(result.infotexts[0]).params["Precision"] == "fp32 int8-activations"
    difference = np.abs(pixels(result) - pixels(tiny_pipe.txt2img("a red circle", **GEN)))
    assert difference.mean() < 8, difference.mean()


def test_int8_weights_and_activations_are_the_hybrid_recipe(tiny_sd_path, plugin_host, tiny_pipe, onnx_dir, ov_dir,
                                                            int8a_dir, tmp_path):
    """With int8 weights too, the matrix products' and the other networks' weights are compressed as well."""
    from aipaint_plugins.openvino_runtime.quantize import Calibration

    calibration = Calibration(tiny_pipe, ["a red circle"], steps=2, width=32, height=32)
    hybrid = convert_to_openvino(onnx_dir, tmp_path / "hybrid", weights="int8", activations="int8",
                                 calibration=calibration).root
    section = read_ir_manifest(hybrid).data["openvino"]
    assert (section["weights"], section["activations"], section["calibration"]["samples"]) == ("int8", "int8", 2)
    assert quantised_convolutions(hybrid / "unet" / "openvino_model.xml")[1:-1].count(True) >= 1
    size = lambda folder, name: (folder / name / "openvino_model.bin").stat().st_size  # noqa: E731
    assert size(hybrid, "unet") < size(int8a_dir, "unet") and size(hybrid, "text_encoder") < 0.6 * size(ov_dir, "text_encoder")
    result = load_with(tiny_sd_path, plugin_host, hybrid).txt2img("a red circle", **GEN)
    assert Infotext.from_text(result.infotexts[0]).params["Precision"] == "fp32 int8-weights int8-activations"
    assert np.abs(pixels(result) - pixels(tiny_pipe.txt2img("a red circle", **GEN))).mean() < 8


def test_int8_activations_need_a_calibration_on_the_same_model(tiny_pipe, onnx_dir, ov_dir, tmp_path, capsys):
    from aipaint_plugins.openvino_runtime.quantize import Calibration, read_prompts

    calibration = Calibration(tiny_pipe, ["a red circle"], steps=1, width=32, height=32)
    with pytest.raises(InvalidParameter, match="calibrated by generating"):
        convert_to_openvino(onnx_dir, tmp_path / "b", weights="int8", activations="int8")
    with pytest.raises(InvalidParameter, match="activations"):
        convert_to_openvino(onnx_dir, tmp_path / "c", activations="int4")
    with pytest.raises(InvalidParameter, match="steps"):
        Calibration(tiny_pipe, ["a red circle"], steps=0)
    with pytest.raises(InvalidParameter, match="prompts"):
        Calibration(tiny_pipe, ["  "])
    from aipaint_plugins.openvino_runtime.quantize import collect_unet_inputs

    feeds = collect_unet_inputs(calibration, ov_dir)  # a loaded model is copied, not changed
    assert len(feeds) == 1 and set(feeds[0]) == {io["name"] for io in read_ir_manifest(ov_dir).components["unet"]["inputs"]}
    assert feeds[0]["sample"].shape[0] == 2  # the classifier-free-guidance batch
    assert tiny_pipe.model.runtime == "torch" and type(tiny_pipe.model.unet).__name__ == "UNet2DConditionModel"
    (tmp_path / "prompts.txt").write_text("# calibration\na red circle\n\n a blue square \n")
    assert read_prompts(tmp_path / "prompts.txt") == ["a red circle", "a blue square"]
    assert cli_main(["export", "openvino", str(onnx_dir), "-o", str(tmp_path / "d"), "--activations", "int8"]) != 0
    assert "needs --model" in capsys.readouterr().err and not (tmp_path / "d").exists()
    other = save_tiny_sd(tmp_path / "other-model", seed=123)  # same architecture, other weights
    with pytest.raises(ModelLoadError, match="exported from"):
        convert_to_openvino(onnx_dir, tmp_path / "e", activations="int8",
                            calibration=Calibration(str(other), ["a red circle"], steps=1, width=32, height=32))
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".e.partial*"))  # nothing half-written is left


# --- ControlNets exported with the model ---------------------------------------------------------


@pytest.fixture(scope="module")
def cn_ov_dir(tiny_pipe, tmp_path_factory):
    """The UNet and one ControlNet (named ``tiny-cn`` in ``AIPAINT_CONTROLNET_DIR``), exported and converted;
    the text encoder and VAE stay in torch."""
    from test_controlnet import _tiny_controlnet

    folder = tmp_path_factory.mktemp("ov-controlnets")
    _tiny_controlnet(tiny_pipe.model.unet, 1).save_pretrained(folder / "tiny-cn")
    _tiny_controlnet(tiny_pipe.model.unet, 2).save_pretrained(folder / "Other-CN")
    onnx = export_onnx(tiny_pipe.model, folder / "onnx", components=("unet",), controlnets=[folder / "tiny-cn"]).root
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIPAINT_CONTROLNET_DIR", str(folder))
        yield convert_to_openvino(onnx, folder / "ov").root


def test_exported_controlnets_run_in_openvino_and_match_torch(tiny_sd_path, plugin_host, tiny_pipe, cn_ov_dir):
    from test_onnx_runtime import cn_unit, controlnets_used

    from aipaint.errors import UnsupportedFeature
    from aipaint.plugin.kit.stand_ins import ExportedControlNet

    manifest = read_ir_manifest(cn_ov_dir)
    assert list(manifest.controlnets) == ["tiny-cn"]
    assert manifest.controlnets["tiny-cn"]["file"] == "controlnet/tiny-cn/openvino_model.xml"
    pipe = load_with(tiny_sd_path, plugin_host, cn_ov_dir)
    [used] = controlnets_used(pipe, cn_unit())
    assert type(used) is ExportedControlNet and used.providers == ["OpenVINO CPU"]
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    for run in (lambda p, u: p.txt2img("a red square", adapters=u, **GEN),
                lambda p, u: p.img2img(image, "a red square", adapters=u, denoising_strength=0.6, **GEN)):
        for units in ((cn_unit(),), (cn_unit(weight=0.7), cn_unit("Other-CN", preprocessor="none"))):
            assert np.abs(pixels(run(tiny_pipe, units)) - pixels(run(pipe, units))).max() <= 1
    controlled = pixels(pipe.txt2img("a red square", adapters=(cn_unit(),), **GEN))
    assert np.abs(controlled - pixels(pipe.txt2img("a red square", **GEN))).mean() > 1  # it steered the image
    strict = load_with(tiny_sd_path, plugin_host, cn_ov_dir, torch_controlnets=False)
    with pytest.raises(UnsupportedFeature, match="'Other-CN' cannot run through OpenVINO.*not in the export") as caught:
        controlnets_used(strict, cn_unit("Other-CN"))
    assert "aipaint export openvino" in str(caught.value)
    with pytest.raises(InvalidParameter, match="torch_controlnets"):
        OvOptions.parse({"openvino_dir": "x", "torch_controlnets": "no"})
