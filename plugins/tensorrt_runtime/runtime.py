"""The ``tensorrt`` runtime: engines built by ``aipaint export tensorrt`` run the networks.

It uses the kit's stand-ins (:mod:`aipaint.plugin.kit.stand_ins`), as the ONNX runtime does:
an engine is just another "session" taking and returning torch tensors, here on the
GPU, on torch's current stream. Where a shape repeats (every step of a generation
does), the engine call is captured once into a CUDA graph and replayed, which removes
the per-launch CPU overhead that dominates small batches.

Written against the documented TensorRT 10 API (``execute_async_v3``,
``set_input_shape``, ``set_tensor_address``); unverified where the ``tensorrt``
package cannot be installed (see docs/runtimes.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint_plugins.tensorrt_runtime.profiles import shape_in_profile

from aipaint.errors import InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.plugin.kit.exports import Manifest, bind_symbols, resolve_shape

if TYPE_CHECKING:
    import torch

    from aipaint.models.latent import LatentDiffusionModel

OPTIONS = ("engine_dir", "cuda_graphs", "verify")


def unavailable() -> str | None:
    from importlib.util import find_spec

    if find_spec("tensorrt") is None:
        return "the tensorrt package is not installed"
    return None


@dataclass(frozen=True)
class TrtOptions:
    engine_dir: Path
    cuda_graphs: bool
    verify: str

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> TrtOptions:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidParameter("runtime_options", unknown, f"the tensorrt runtime accepts {', '.join(OPTIONS)}")
        if not options.get("engine_dir"):
            raise InvalidParameter(
                "engine_dir", options.get("engine_dir"), "the folder written by `aipaint export tensorrt ONNX_DIR -o DIR`",
                "pass runtime_options={'engine_dir': DIR} (CLI: --runtime-option engine_dir=DIR)",
            )
        graphs = options.get("cuda_graphs", True)
        if not isinstance(graphs, bool):
            raise InvalidParameter("cuda_graphs", graphs, "true or false")
        verify = options.get("verify", "sha256")
        if verify not in ("sha256", "size"):
            raise InvalidParameter("verify", verify, "'sha256' or 'size'")
        return cls(Path(options["engine_dir"]).expanduser(), graphs, verify)


def check_device(model: LatentDiffusionModel) -> None:
    if model.device.type != "cuda":
        raise ModelLoadError(
            f"the tensorrt runtime runs on an NVIDIA GPU; load the model with device='cuda' (it is on {model.device})"
        )


class TrtSession:
    """One engine and its execution context, called with torch CUDA tensors (the stand-ins' session interface)."""

    def __init__(self, manifest: Manifest, component: str, runtime: Any, device: torch.device, cuda_graphs: bool) -> None:
        self.component = component
        entry = manifest.components[component]
        self.inputs = {io["name"]: io for io in entry["inputs"]}
        self.outputs = {io["name"]: io for io in entry["outputs"]}
        self.profiles = {k: tuple(tuple(s) for s in v) for k, v in manifest.data["tensorrt"]["profiles"][component].items()}
        self.device = device
        self.providers = ["TensorRT"]
        path = manifest.component_path(component)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ModelLoadError(f"TensorRT could not deserialize {path}; {manifest.hint}")
        self.context = self.engine.create_execution_context()
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[Any, ...], tuple[Any, dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        self._seen: set[tuple[Any, ...]] = set()

    def __call__(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        from aipaint.plugin.kit.stand_ins import TORCH_DTYPES

        symbols: dict[str, int] = {}
        for name, value in inputs.items():
            if name not in self.inputs:
                raise UnsupportedFeature(f"the {self.component} engine has no input {name!r}")
            bind_symbols(self.inputs[name]["shape"], value.shape, symbols)
            if not shape_in_profile(tuple(value.shape), self.profiles[name]):
                low, _, high = self.profiles[name]
                raise UnsupportedFeature(
                    f"{self.component} input {name} has shape {tuple(value.shape)}, outside the engine's profile "
                    f"{tuple(low)}…{tuple(high)}; rebuild with a wider profile (aipaint export tensorrt --max-size/--max-batch)"
                )
        cast = {n: v.to(self.device, TORCH_DTYPES[self.inputs[n]["dtype"]]).contiguous() for n, v in inputs.items()}
        key = tuple((n, tuple(v.shape)) for n, v in sorted(cast.items()))
        if self.cuda_graphs and key in self._graphs:
            graph, static_in, static_out = self._graphs[key]
            for name, value in cast.items():
                static_in[name].copy_(value)
            graph.replay()
            return {k: v.clone() for k, v in static_out.items()}
        outputs = {
            name: torch.empty(resolve_shape(io["shape"], symbols), dtype=TORCH_DTYPES[io["dtype"]], device=self.device)
            for name, io in self.outputs.items()
        }
        self._enqueue(cast, outputs)
        if self.cuda_graphs:
            if key in self._seen:  # the second call with these shapes: capture, so later ones replay
                self._capture(key, cast, outputs)
            self._seen.add(key)
        return outputs

    def _enqueue(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        import torch

        for name, value in inputs.items():
            self.context.set_input_shape(name, tuple(value.shape))
            self.context.set_tensor_address(name, value.data_ptr())
        for name, value in outputs.items():
            self.context.set_tensor_address(name, value.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TensorRT failed to run the {self.component} engine")

    def _capture(self, key: tuple[Any, ...], inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        import torch

        static_in = {k: v.clone() for k, v in inputs.items()}
        static_out = {k: torch.empty_like(v) for k, v in outputs.items()}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._enqueue(static_in, static_out)  # TensorRT must run once with these addresses before capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._enqueue(static_in, static_out)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graphs[key] = (graph, static_in, static_out)


def check_engine_folder(model: LatentDiffusionModel, opts: TrtOptions) -> Manifest:
    """Every check that needs no GPU: the folder, its files, and that it was built from ``model``."""
    from aipaint_plugins.tensorrt_runtime.build import read_engine_manifest

    manifest = read_engine_manifest(opts.engine_dir)
    manifest.check_files(verify=opts.verify)
    manifest.check_model(model, model.modules())
    return manifest


def prepare_tensorrt(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    """Check the engine folder against ``model`` and this GPU, then swap in the engines."""
    opts = TrtOptions.parse(options)
    check_device(model)
    manifest = check_engine_folder(model, opts)
    import tensorrt as trt
    import torch
    from aipaint_plugins.tensorrt_runtime.build import compatibility_problem

    from aipaint.plugin.kit.stand_ins import install_sessions

    major, minor = torch.cuda.get_device_capability(model.device)
    problem = compatibility_problem(manifest, trt.__version__, f"{major}.{minor}")
    if problem:
        raise ModelLoadError(f"cannot use the engines in {manifest.root}: {problem}; {manifest.hint}")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    install_sessions(model, {name: TrtSession(manifest, name, runtime, model.device, opts.cuda_graphs) for name in manifest.components})
