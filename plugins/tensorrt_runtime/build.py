"""Building (and refitting) TensorRT engines from an ONNX export.

Written against the documented TensorRT 10 Python API (``tensorrt.Builder``,
``OnnxParser``, ``IBuilderConfig``, ``Refitter``/``OnnxParserRefitter``); the
``tensorrt`` package cannot be installed on the machines aipaint is developed on, so
the code paths that call it are unverified there (see docs/runtimes.md). Everything
around them — profiles, the manifest, compatibility checks, atomic writing — is plain
Python and tested.

An engine folder mirrors an ONNX export: ``manifest.json`` (format ``aipaint-tensorrt``)
plus one ``<component>.plan`` per network. The manifest keeps the ONNX export's model
identity and LoRA set, and adds what an engine is tied to: the TensorRT version and
the GPU's compute capability (engines are not portable across either), the profiles,
and whether the engines can be refitted.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from aipaint_plugins.tensorrt_runtime.profiles import ProfileSettings, component_profiles

from aipaint import __version__
from aipaint.errors import AipaintError, ModelLoadError
from aipaint.plugin.kit.exports import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    file_record,
    read_manifest,
)

ENGINE_FORMAT = "aipaint-tensorrt"
TIMING_CACHE_NAME = "timing.cache"
Log = Callable[[str], None]


def engine_manifest(
    onnx: Manifest,
    profiles: Mapping[str, Any],
    components: Mapping[str, Mapping[str, Any]],
    *,
    tensorrt_version: str,
    device_name: str,
    compute_capability: str,
    fp16: bool,
    refittable: bool,
    settings: ProfileSettings,
) -> dict[str, Any]:
    """The manifest of an engine folder: the ONNX export's identity plus what the engines are tied to."""
    return {
        "format": ENGINE_FORMAT,
        "format_version": FORMAT_VERSION,
        "aipaint_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "opset": onnx.data["opset"],
        "precision": "fp16" if fp16 else onnx.data["precision"],
        "model": onnx.model,
        "loras": onnx.loras,
        "components": dict(components),
        "tensorrt": {
            "version": tensorrt_version,
            "device_name": device_name,
            "compute_capability": compute_capability,
            "refittable": refittable,
            "settings": settings.__dict__,
            "profiles": {c: {k: [list(s) for s in v] for k, v in p.items()} for c, p in profiles.items()},
        },
    }


def compatibility_problem(manifest: Manifest, tensorrt_version: str, compute_capability: str) -> str | None:
    """Why engines in ``manifest`` cannot run with this TensorRT on this GPU, or ``None``."""
    built = manifest.data.get("tensorrt", {})
    if built.get("version") != tensorrt_version:
        return f"the engines were built with TensorRT {built.get('version')}, this is TensorRT {tensorrt_version}"
    if built.get("compute_capability") != compute_capability:
        return (
            f"the engines were built for a GPU of compute capability {built.get('compute_capability')} "
            f"({built.get('device_name')}), this GPU has {compute_capability}"
        )
    return None


def read_engine_manifest(folder: Path | str) -> Manifest:
    manifest = read_manifest(folder, expected_format=ENGINE_FORMAT)
    if not isinstance(manifest.data.get("tensorrt"), dict):
        raise ModelLoadError(f"{manifest.root}/{MANIFEST_NAME} lacks its 'tensorrt' section; {manifest.hint}")
    return manifest


def _cuda_device() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise AipaintError("building TensorRT engines needs an NVIDIA GPU, and torch sees none here")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def build_engines(
    onnx_dir: Path | str,
    out_dir: Path | str,
    *,
    settings: ProfileSettings | None = None,
    fp16: bool = True,
    refittable: bool = True,
    timing_cache: Path | str | None = None,
    workspace_gb: float = 8.0,
    overwrite: bool = False,
    log: Log | None = None,
) -> Manifest:
    """Build one engine per exported component, with one optimization profile each."""
    import tensorrt as trt

    log = log or (lambda message: None)
    settings = settings or ProfileSettings()
    onnx = read_manifest(onnx_dir)
    onnx.check_files(verify="size")
    profiles = component_profiles(onnx.components, settings, int(onnx.model["vae_scale_factor"]))
    device_name, capability = _cuda_device()
    out_dir = Path(out_dir).expanduser()
    _check_destination(out_dir, overwrite)
    cache_path = Path(timing_cache).expanduser() if timing_cache else out_dir.parent / f"{out_dir.name}.{TIMING_CACHE_NAME}"

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b""
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    components: dict[str, Any] = {}
    try:
        for name, entry in onnx.components.items():
            log(f"building {name} engine…")
            started = time.perf_counter()
            network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(onnx.component_path(name))):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise AipaintError(f"TensorRT could not parse the {name} ONNX graph: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
            if fp16:
                config.set_flag(trt.BuilderFlag.FP16)
            if refittable:
                config.set_flag(trt.BuilderFlag.REFIT)
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, ignore_mismatch=False)
            profile = builder.create_optimization_profile()
            for input_name, (low, opt, high) in profiles[name].items():
                profile.set_shape(input_name, low, opt, high)
            config.add_optimization_profile(profile)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise AipaintError(f"TensorRT failed to build the {name} engine (see the messages above)")
            (partial / f"{name}.plan").write_bytes(bytes(plan))
            cache_bytes = bytes(config.get_timing_cache().serialize())
            components[name] = {
                "file": f"{name}.plan",
                "precision": "fp16" if fp16 else entry["precision"],
                "inputs": entry["inputs"],
                "outputs": entry["outputs"],
                "files": {f"{name}.plan": file_record(partial / f"{name}.plan")},
            }
            log(f"  {name}: {time.perf_counter() - started:.0f} s")
        data = engine_manifest(
            onnx, profiles, components, tensorrt_version=trt.__version__, device_name=device_name,
            compute_capability=capability, fp16=fp16, refittable=refittable, settings=settings,
        )
        (partial / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
        read_engine_manifest(partial)
        _publish(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if cache_bytes:
            tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
            tmp.write_bytes(cache_bytes)
            os.replace(tmp, cache_path)
    return read_engine_manifest(out_dir)


def refit_engines(engine_dir: Path | str, onnx_dir: Path | str, *, log: Log | None = None) -> Manifest:
    """Swap in the weights of another ONNX export of the same architecture (e.g. with other LoRAs fused).

    Far quicker than a rebuild: the engines keep their tactics and profiles. Each refitted
    plan is written beside the old one and renamed over it only when all succeeded.
    """
    import tensorrt as trt

    log = log or (lambda message: None)
    engines = read_engine_manifest(engine_dir)
    onnx = read_manifest(onnx_dir)
    onnx.check_files(verify="size")
    if not engines.data["tensorrt"].get("refittable"):
        raise AipaintError(f"the engines in {engines.root} were built without refitting; rebuild them instead")
    if onnx.model["structure_hash"] != engines.model["structure_hash"]:
        raise AipaintError(f"{onnx.root} is an export of another architecture than {engines.root}; rebuild instead")
    problem = compatibility_problem(engines, trt.__version__, _cuda_device()[1])
    if problem:
        raise AipaintError(f"cannot refit {engines.root}: {problem}")
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    staged: dict[str, Path] = {}
    try:
        for name in engines.components:
            log(f"refitting {name}…")
            engine = runtime.deserialize_cuda_engine(engines.component_path(name).read_bytes())
            refitter = trt.Refitter(engine, logger)
            parser_refitter = trt.OnnxParserRefitter(refitter, logger)
            if not parser_refitter.refit_from_file(str(onnx.component_path(name))) or not refitter.refit_cuda_engine():
                raise AipaintError(f"TensorRT could not refit the {name} engine from {onnx.root}")
            target = engines.root / f".{name}.plan.refit-{os.getpid()}"
            target.write_bytes(bytes(engine.serialize()))
            staged[name] = target
        data = dict(engines.data)
        data["model"], data["loras"] = onnx.model, onnx.loras
        components = {k: dict(v) for k, v in engines.components.items()}
        for name, path in staged.items():
            components[name]["files"] = {f"{name}.plan": file_record(path)}
        data["components"] = components
        for name, path in staged.items():
            os.replace(path, engines.root / f"{name}.plan")
        staged.clear()
        tmp = engines.root / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, engines.root / MANIFEST_NAME)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return read_engine_manifest(engines.root)


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not (out_dir / MANIFEST_NAME).is_file():
            raise AipaintError(f"{out_dir} exists and is not an engine folder; choose another -o")
        if not overwrite:
            raise AipaintError(f"{out_dir} already holds engines; pass --overwrite to replace them, or --refit")


def _publish(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out_dir)
