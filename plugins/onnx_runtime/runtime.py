"""The ``onnxruntime`` runtime: the exported networks stand in for the torch modules.

``prepare`` reads the export folder's manifest, refuses it when it is incomplete,
corrupt or made from other weights than the loaded model, opens one
``InferenceSession`` per component and then swaps the model's torch modules for small
stand-ins (:class:`ExportedUNet`, :class:`ExportedVae`, :class:`ExportedTextEncoder`)
and its ``unet_call``/``vae_decode_call``/``vae_encode_call`` for session calls. The
denoise loop, samplers and adapters that only add UNet inputs (ControlNet residuals,
inpainting channels) work unchanged.

ControlNets exported with the model run as sessions too (:class:`ExportedControlNet`):
the ControlNet adapter asks the runtime for a stand-in whenever a unit loads a ControlNet
(:class:`ExportedControlNets`), and gets one only when the unit names exactly the file
that was exported (same sha256, same config). Any other ControlNet runs in torch beside
the exported UNet, or, with ``torch_controlnets=False``, is refused.

The torch modules are dropped rather than kept beside the sessions: that frees their
memory, and it makes anything that tries to patch their weights (a LoRA loaded at
generation time, say) fail loudly instead of silently changing nothing. LoRA belongs
in the export (``aipaint export onnx --lora``).

On the CPU, tensors go through NumPy. With CUDA they are bound in place through
ONNX Runtime's I/O binding on torch's current stream, so no copy leaves the GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aipaint.errors import InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.plugin.kit.exports import (
    Manifest,
    bind_symbols,
    read_manifest,
    resolve_shape,
)
from aipaint.plugin.kit.stand_ins import (  # the ControlNet stand-ins live in the kit, shared with OpenVINO
    TORCH_DTYPES,
    ExportedControlNet,  # noqa: F401  (imported from here by users and tests)
    ExportedControlNets,  # noqa: F401
    check_controlnets_fit,
    install_exported,
)

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
OPTIONS = ("onnx_dir", "providers", "threads", "verify", "provider_options", "torch_controlnets")


# --- options ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrtOptions:
    onnx_dir: Path
    providers: tuple[str, ...]
    threads: int
    verify: str
    provider_options: dict[str, dict[str, Any]]
    torch_controlnets: bool

    @classmethod
    def parse(cls, options: Mapping[str, Any], device: torch.device) -> OrtOptions:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidParameter("runtime_options", unknown, f"the onnxruntime runtime accepts {', '.join(OPTIONS)}")
        if not options.get("onnx_dir"):
            raise InvalidParameter(
                "onnx_dir", options.get("onnx_dir"), "the folder written by `aipaint export onnx MODEL -o DIR`",
                "pass runtime_options={'onnx_dir': DIR} (CLI: --runtime-option onnx_dir=DIR)",
            )
        requested = options.get("providers") or ("cuda" if device.type == "cuda" else "cpu")
        if isinstance(requested, str):
            requested = [p.strip() for p in requested.split(",") if p.strip()]
        providers = tuple(_provider_name(p) for p in requested)
        threads = options.get("threads", torch.get_num_threads())
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise InvalidParameter("threads", threads, "a whole number of intra-op threads (0 lets ONNX Runtime choose)")
        verify = options.get("verify", "sha256")
        if verify not in ("sha256", "size"):
            raise InvalidParameter("verify", verify, "'sha256' (hash every file; cached) or 'size' (sizes only)")
        extra = options.get("provider_options") or {}
        if not isinstance(extra, dict):
            raise InvalidParameter("provider_options", extra, "a dict from provider name to its option dict")
        torch_controlnets = options.get("torch_controlnets", True)
        if not isinstance(torch_controlnets, bool):
            raise InvalidParameter("torch_controlnets", torch_controlnets,
                                   "true (ControlNets not in the export run in torch) or false (they are an error)")
        return cls(Path(options["onnx_dir"]).expanduser(), providers, threads, verify,
                   {_provider_name(k): dict(v) for k, v in extra.items()}, torch_controlnets)


def _provider_name(name: str) -> str:
    if name in PROVIDERS.values():
        return name
    key = str(name).lower().removesuffix("executionprovider")
    if key not in PROVIDERS:
        raise InvalidParameter("providers", name, f"one or more of {', '.join(PROVIDERS)}")
    return PROVIDERS[key]


def _check_providers(providers: Sequence[str]) -> list[str]:
    """The provider list for a session: what was asked, checked, plus ONNX Runtime's own fall-backs.

    Nodes a GPU provider cannot run are placed on the next one in the list (that is how
    ONNX Runtime partitions a graph). A provider that is not installed is an error, never
    a quiet switch to the CPU.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        hint = "install onnxruntime-gpu (with CUDA and cuDNN) for CUDA" if "CUDAExecutionProvider" in missing else ""
        if "TensorrtExecutionProvider" in missing:
            hint = "install onnxruntime-gpu and TensorRT for the TensorRT provider"
        raise ModelLoadError(
            f"ONNX Runtime provider(s) {', '.join(missing)} not available here (available: {', '.join(available)}); {hint}".rstrip("; ")
        )
    ordered = list(providers)
    if "TensorrtExecutionProvider" in ordered and "CUDAExecutionProvider" in available and "CUDAExecutionProvider" not in ordered:
        ordered.append("CUDAExecutionProvider")
    if "CPUExecutionProvider" not in ordered:
        ordered.append("CPUExecutionProvider")
    return ordered


# --- one session per component ------------------------------------------------------------------


class OrtSession:
    """An ``InferenceSession`` for one exported graph (a component, or ``controlnet/<key>``),
    called with and returning torch tensors."""

    def __init__(self, manifest: Manifest, component: str, options: OrtOptions, device: torch.device) -> None:
        import onnxruntime as ort

        self.component = component
        self.entry = manifest.entries[component]
        self.inputs = {io["name"]: io for io in self.entry["inputs"]}
        self.outputs = {io["name"]: io for io in self.entry["outputs"]}
        self.device = device
        providers = _check_providers(options.providers)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        session_options.log_severity_level = 3
        path = manifest.component_path(component)
        try:
            self.session = ort.InferenceSession(
                str(path), sess_options=session_options, providers=providers,
                provider_options=[self._provider_options(p, options, manifest) for p in providers],
            )
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt graphs
            raise ModelLoadError(
                f"ONNX Runtime could not open {path} ({type(exc).__name__}: {str(exc).splitlines()[0][:300]}); "
                f"the export is damaged or from an incompatible exporter: re-export it with `aipaint export onnx`"
            ) from exc
        declared = {i.name for i in self.session.get_inputs()}
        if declared != set(self.inputs):
            raise ModelLoadError(
                f"{path} has inputs {sorted(declared)}, but the manifest lists {sorted(self.inputs)}; {manifest.hint}"
            )
        self.providers = self.session.get_providers()
        self.bound = device.type == "cuda" and "CPUExecutionProvider" != self.providers[0]

    def _provider_options(self, provider: str, options: OrtOptions, manifest: Manifest) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if provider == "CUDAExecutionProvider" and self.device.type == "cuda":
            # Run on torch's stream so bound tensors need no extra synchronisation.
            opts["device_id"] = self.device.index or 0
            opts["user_compute_stream"] = str(torch.cuda.current_stream(self.device).cuda_stream)
        if provider == "TensorrtExecutionProvider":
            from aipaint.plugin.kit.hashing import cache_dir

            cache = cache_dir() / "ort-tensorrt" / manifest.model["structure_hash"][:16]
            cache.mkdir(parents=True, exist_ok=True)
            opts.update(
                trt_engine_cache_enable=True,
                trt_engine_cache_path=str(cache),
                trt_timing_cache_enable=True,
                trt_fp16_enable=self.entry["precision"] == "fp16",
            )
        opts.update(options.provider_options.get(provider, {}))
        return opts

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if set(inputs) != set(self.inputs):
            raise UnsupportedFeature(
                f"the exported {self.component} takes {sorted(self.inputs)}, it was called with {sorted(inputs)}"
            )
        symbols: dict[str, int] = {}
        for name, value in inputs.items():
            try:
                bind_symbols(self.inputs[name]["shape"], value.shape, symbols)
            except ValueError as exc:
                raise UnsupportedFeature(f"exported {self.component}, input {name}: {exc}") from exc
        cast = {name: value.to(TORCH_DTYPES[self.inputs[name]["dtype"]]).contiguous() for name, value in inputs.items()}
        if self.bound:
            return self._run_bound(cast, symbols)
        feed = {name: value.detach().cpu().numpy() for name, value in cast.items()}
        results = self.session.run(list(self.outputs), feed)
        return {name: torch.from_numpy(array).to(self.device) for name, array in zip(self.outputs, results)}

    def _run_bound(self, inputs: dict[str, torch.Tensor], symbols: dict[str, int]) -> dict[str, torch.Tensor]:
        import numpy as np

        binding = self.session.io_binding()
        index = self.device.index or 0
        for name, value in inputs.items():
            value = value.to(self.device)
            inputs[name] = value  # keep it alive until the run ends
            binding.bind_input(name, "cuda", index, np.dtype(self.inputs[name]["dtype"]), tuple(value.shape), value.data_ptr())
        outputs = {}
        for name, io in self.outputs.items():
            shape = resolve_shape(io["shape"], symbols)
            out = torch.empty(shape, dtype=TORCH_DTYPES[io["dtype"]], device=self.device)
            binding.bind_output(name, "cuda", index, np.dtype(io["dtype"]), shape, out.data_ptr())
            outputs[name] = out
        self.session.run_with_iobinding(binding)
        return outputs


# --- prepare ---------------------------------------------------------------------------------------


def prepare_onnxruntime(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    """Check the export against ``model`` and swap its networks for ONNX Runtime sessions."""
    opts = OrtOptions.parse(options, model.device)
    manifest = read_manifest(opts.onnx_dir)
    manifest.check_files(verify=opts.verify)
    manifest.check_model(model, model.modules())
    check_controlnets_fit(manifest)
    sessions = {name: OrtSession(manifest, name, opts, model.device) for name in manifest.entries}
    install_exported(model, manifest, sessions, torch_controlnets=opts.torch_controlnets, runtime="ONNX Runtime",
                     reexport="aipaint export onnx MODEL -o {root} --overwrite --controlnet NAME")
    if manifest.components["unet"].get("weights") == "int8":
        model.runtime_infotext = {"Precision": "fp32 int8-weights"}  # type: ignore[attr-defined]
