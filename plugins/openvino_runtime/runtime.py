"""The ``openvino`` runtime: OpenVINO IR (``aipaint export openvino``) stands in for the torch networks.

``prepare`` reads the IR folder's manifest, refuses it when it is incomplete, corrupt or
made from other weights than the loaded model (the same checks as the ONNX runtime, from
the plugin kit), and swaps the model's networks for the kit's stand-ins around
:class:`OvSession` objects.

Shapes: with ``static_shapes`` (the default) each network is reshaped to the exact input
shapes of a call and compiled for them — OpenVINO's CPU plugin runs static shapes faster
than dynamic ones — and the compiled model is kept, so every step of a generation after
the first reuses it. A few shapes are kept per network (``max_shapes``, least recently used
dropped first); ``static_shapes=false`` compiles once with dynamic shapes instead.

Precision: ``precision`` sets OpenVINO's ``INFERENCE_PRECISION_HINT``. ``auto`` leaves
OpenVINO's default, which is bf16 on CPUs with AMX or AVX512_BF16 and fp32 elsewhere;
``fp32`` forces fp32; ``bf16`` asks for bf16 (OpenVINO falls back to fp32 on CPUs without
bf16 support). The precision the compiled UNet reports is what the PNG parameters record.

ControlNets converted with the model run as OpenVINO stand-ins (the kit's
:class:`~aipaint.plugin.kit.stand_ins.ExportedControlNets`, matched to a unit by its source
file as with ONNX Runtime); any other ControlNet runs in torch, or is refused with
``torch_controlnets=false``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.errors import InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.plugin.kit.exports import Manifest, bind_symbols
from aipaint.plugin.kit.stand_ins import TORCH_DTYPES, check_controlnets_fit, install_exported

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel

OPTIONS = ("openvino_dir", "precision", "threads", "verify", "static_shapes", "max_shapes", "device", "cache_dir",
           "torch_controlnets")
PRECISIONS = {"auto": None, "fp32": "f32", "bf16": "bf16"}
OV_NAMES = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def unavailable() -> str | None:
    from importlib.util import find_spec

    if find_spec("openvino") is None:
        return "the openvino package is not installed (pip install 'aipaint[openvino]')"
    return None


@dataclass(frozen=True)
class OvOptions:
    openvino_dir: Path
    precision: str
    threads: int
    verify: str
    static_shapes: bool
    max_shapes: int
    device: str
    cache_dir: Path | None
    torch_controlnets: bool = True

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> OvOptions:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidParameter("runtime_options", unknown, f"the openvino runtime accepts {', '.join(OPTIONS)}")
        if not options.get("openvino_dir"):
            raise InvalidParameter(
                "openvino_dir", options.get("openvino_dir"), "the folder written by `aipaint export openvino ONNX_DIR -o DIR`",
                "pass runtime_options={'openvino_dir': DIR} (CLI: --runtime-option openvino_dir=DIR)",
            )
        precision = str(options.get("precision", "auto")).lower()
        if precision not in PRECISIONS:
            raise InvalidParameter("precision", options.get("precision"), f"one of {', '.join(PRECISIONS)}")
        threads = options.get("threads", torch.get_num_threads())
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InvalidParameter("threads", threads, "a whole number of inference threads (0 lets OpenVINO choose)")
        verify = options.get("verify", "sha256")
        if verify not in ("sha256", "size"):
            raise InvalidParameter("verify", verify, "'sha256' (hash every file) or 'size' (sizes only)")
        static = options.get("static_shapes", True)
        if not isinstance(static, bool):
            raise InvalidParameter("static_shapes", static, "true (compile per input shape) or false (dynamic shapes)")
        max_shapes = options.get("max_shapes", 4)
        if isinstance(max_shapes, bool) or not isinstance(max_shapes, int) or max_shapes < 1:
            raise InvalidParameter("max_shapes", max_shapes, "a whole number ≥ 1 of compiled shapes kept per network")
        device = str(options.get("device", "CPU")).upper()
        cache = options.get("cache_dir")
        torch_controlnets = options.get("torch_controlnets", True)
        if not isinstance(torch_controlnets, bool):
            raise InvalidParameter("torch_controlnets", torch_controlnets,
                                   "true (a ControlNet not in the export runs in torch) or false (it is refused)")
        return cls(Path(options["openvino_dir"]).expanduser(), precision, threads, verify, static, max_shapes, device,
                   Path(cache).expanduser() if cache else None, torch_controlnets)

    def compile_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if PRECISIONS[self.precision]:
            config["INFERENCE_PRECISION_HINT"] = PRECISIONS[self.precision]
        if self.threads and self.device == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.threads
        return config


class OvSession:
    """One IR network, compiled per input shape (or once, dynamic), called with and returning torch tensors."""

    def __init__(self, core: Any, manifest: Manifest, component: str, options: OvOptions, device: torch.device) -> None:
        self.component = component
        self.entry = manifest.entries[component]
        self.inputs = {io["name"]: io for io in self.entry["inputs"]}
        self.outputs = {io["name"]: io for io in self.entry["outputs"]}
        self.device = device
        self.providers = [f"OpenVINO {options.device}"]
        self.core = core
        self.options = options
        self.config = options.compile_config()
        path = manifest.component_path(component)
        try:
            self.graph = core.read_model(str(path))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses for unreadable IR
            raise ModelLoadError(
                f"OpenVINO could not read {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); {manifest.hint}"
            ) from exc
        declared = {port.get_any_name() for port in self.graph.inputs}
        if declared != set(self.inputs):
            raise ModelLoadError(f"{path} has inputs {sorted(declared)}, but the manifest lists {sorted(self.inputs)}; "
                                 f"{manifest.hint}")
        self._compiled: OrderedDict[Any, tuple[Any, Any]] = OrderedDict()
        self.compilations = 0

    def _compile(self, shapes: dict[str, tuple[int, ...]] | None) -> tuple[Any, Any]:
        key = tuple(sorted(shapes.items())) if shapes is not None else "dynamic"
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        import openvino as ov

        if shapes is not None:
            self.graph.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes.items()})
        compiled = self.core.compile_model(self.graph, self.options.device, self.config)
        self.compilations += 1
        self._compiled[key] = (compiled, compiled.create_infer_request())
        while len(self._compiled) > self.options.max_shapes:
            self._compiled.popitem(last=False)
        return self._compiled[key]

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if set(inputs) != set(self.inputs):
            raise UnsupportedFeature(
                f"the OpenVINO {self.component} takes {sorted(self.inputs)}, it was called with {sorted(inputs)}"
            )
        symbols: dict[str, int] = {}
        for name, value in inputs.items():
            try:
                bind_symbols(self.inputs[name]["shape"], value.shape, symbols)
            except ValueError as exc:
                raise UnsupportedFeature(f"OpenVINO {self.component}, input {name}: {exc}") from exc
        feed = {name: value.detach().to("cpu", TORCH_DTYPES[self.inputs[name]["dtype"]]).contiguous().numpy()
                for name, value in inputs.items()}
        shapes = {name: tuple(array.shape) for name, array in feed.items()} if self.options.static_shapes else None
        compiled, request = self._compile(shapes)
        request.infer(feed)
        return {name: torch.from_numpy(request.get_tensor(compiled.output(name)).data.copy()).to(self.device)
                for name in self.outputs}


def planned_precision(core: Any, opts: OvOptions) -> str:
    """The precision OpenVINO will compute in: the hint asked for, else the device's default;
    bf16 where the device cannot do it falls back to fp32, as OpenVINO itself does."""
    hint = PRECISIONS[opts.precision] or _type_name(core.get_property(opts.device, "INFERENCE_PRECISION_HINT"))
    capabilities = {str(c).upper() for c in core.get_property(opts.device, "OPTIMIZATION_CAPABILITIES")}
    if hint == "bf16" and "BF16" not in capabilities:
        hint = "f32"
    return OV_NAMES.get(hint, hint)


def _type_name(value: Any) -> str:
    """OpenVINO's element type (``<Type: 'float32'>``) as its short name (``f32``)."""
    if hasattr(value, "to_string"):
        return str(value.to_string())
    text = str(value)
    return {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}.get(text, text)


def check_ir_folder(model: LatentDiffusionModel, opts: OvOptions) -> Manifest:
    """The folder, its files, and that it was converted from an export of ``model``."""
    from aipaint_plugins.openvino_runtime.convert import read_ir_manifest

    manifest = read_ir_manifest(opts.openvino_dir)
    manifest.check_files(verify=opts.verify)
    manifest.check_model(model, model.modules())
    return manifest


def prepare_openvino(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    """Check the IR folder against ``model`` and swap its networks for OpenVINO compiled models."""
    opts = OvOptions.parse(options)
    if model.device.type != "cpu":
        raise ModelLoadError(f"the openvino runtime takes a model loaded on the CPU (it is on {model.device}); "
                             "OpenVINO picks its own device with the runtime option device")
    manifest = check_ir_folder(model, opts)
    import openvino as ov

    core = ov.Core()
    if opts.device not in core.available_devices:
        raise ModelLoadError(f"OpenVINO device {opts.device!r} is not available here (available: "
                             f"{', '.join(core.available_devices)})")
    if opts.cache_dir is not None:
        opts.cache_dir.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(opts.cache_dir)})
    check_controlnets_fit(manifest)
    sessions = {name: OvSession(core, manifest, name, opts, model.device) for name in manifest.entries}
    install_exported(model, manifest, sessions, torch_controlnets=opts.torch_controlnets, runtime="OpenVINO",
                     reexport="aipaint export onnx MODEL -o ONNX_DIR --overwrite --controlnet NAME, then aipaint "
                              "export openvino ONNX_DIR -o {root} --overwrite")
    precision = planned_precision(core, opts)
    weights = manifest.data["openvino"]["weights"]
    activations = manifest.data["openvino"].get("activations", "float")
    model.precision = precision  # type: ignore[attr-defined]
    recorded = precision if weights == "fp32" else f"{precision} {weights}-weights"
    if activations != "float":
        recorded += f" {activations}-activations"
    if recorded != "fp32":
        model.runtime_infotext = {"Precision": recorded}  # type: ignore[attr-defined]
