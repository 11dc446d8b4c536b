"""Converting an ONNX export (``aipaint export onnx``) to OpenVINO IR, with a manifest.

An IR folder mirrors the ONNX export it was made from: ``manifest.json`` (format
``aipaint-openvino``) plus ``<component>/openvino_model.xml`` and ``.bin`` per network. The
manifest keeps the ONNX export's model identity, LoRA set and symbolic input/output shapes
(so the runtime checks the folder against the loaded model exactly as the ONNX runtime
does), lists every file with its size and sha256, and records the OpenVINO version and the
weight compression.

Weights are kept in fp32 (``compress_to_fp16=False``): the compute precision is chosen when
the runtime compiles the graphs (bf16 on CPUs with bf16 units), and fp16-rounded weights
would add error even to fp32 runs. ``weights="int8"`` compresses the weights of the large
matrix products and convolutions to int8 with NNCF (``nncf.compress_weights``, asymmetric
per output channel); activations stay in the compute precision. ``activations="int8"``
quantises the UNet's convolutions (weights and activations), calibrated on generations with
the model the export was made from (:mod:`.quantize`), the one setting here that makes the
CPU multiply in int8; with int8 weights as well it is the hybrid recipe optimum-intel uses for
Stable Diffusion.

ControlNets in the ONNX export (``aipaint export onnx --controlnet NAME``) are converted too
and listed under the manifest's ``controlnets`` with their source files' identity, so a
ControlNet unit that names that same file runs in OpenVINO; any other ControlNet runs in torch
beside the OpenVINO UNet and feeds its residual inputs. Their weights follow ``weights``; their
activations stay float.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aipaint_plugins.openvino_runtime.quantize import (
    Calibration,
    collect_unet_inputs,
    conv_quantize,
    hybrid_quantize,
)

from aipaint import __version__
from aipaint.errors import AipaintError, InvalidParameter, ModelLoadError
from aipaint.plugin.kit.exports import (
    CONTROLNET_PREFIX,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    file_record,
    read_manifest,
)

IR_FORMAT = "aipaint-openvino"
WEIGHTS = ("fp32", "int8")
ACTIVATIONS = ("float", "int8")
IR_FILE = "openvino_model.xml"
Log = Callable[[str], None]


def read_ir_manifest(folder: Path | str) -> Manifest:
    """Read and structurally check an IR folder's manifest (a :class:`ModelLoadError` for every problem)."""
    manifest = read_manifest(folder, expected_format=IR_FORMAT)
    section = manifest.data.get("openvino")
    if not isinstance(section, dict) or section.get("weights") not in WEIGHTS:
        raise ModelLoadError(f"{manifest.root}/{MANIFEST_NAME} lacks a valid 'openvino' section; {manifest.hint}")
    if section.get("activations", "float") not in ACTIVATIONS:
        raise ModelLoadError(f"{manifest.root}/{MANIFEST_NAME}: unknown activations {section.get('activations')!r}; "
                             f"{manifest.hint}")
    for name, entry in manifest.entries.items():
        if not entry["file"].endswith(".xml") or entry["file"].removesuffix(".xml") + ".bin" not in entry["files"]:
            raise ModelLoadError(f"{manifest.root}/{MANIFEST_NAME}: component {name!r} does not list an IR pair "
                                 f"(.xml and .bin); {manifest.hint}")
    return manifest


def convert_to_openvino(
    onnx_dir: Path | str,
    out_dir: Path | str,
    *,
    weights: str = "fp32",
    activations: str = "float",
    calibration: Calibration | None = None,
    components: Sequence[str] | None = None,
    overwrite: bool = False,
    log: Log | None = None,
) -> Manifest:
    """Convert the components of the ONNX export in ``onnx_dir`` to OpenVINO IR in ``out_dir``.

    ``components`` chooses a subset (the UNet is required; what is left out runs in torch).
    ``activations="int8"`` needs a :class:`Calibration`: the UNet is converted in fp32 first,
    the model generates the calibration prompts with the converted networks, then the UNet's
    convolutions are quantised (:func:`.quantize.conv_quantize`, or with ``weights="int8"``
    :func:`.quantize.hybrid_quantize`). The folder is written under a temporary name and
    renamed into place when complete.
    """
    import openvino as ov

    log = log or (lambda message: None)
    if weights not in WEIGHTS:
        raise InvalidParameter("weights", weights, f"one of {', '.join(WEIGHTS)}")
    onnx = read_manifest(onnx_dir)
    onnx.check_files(verify="size")
    chosen = list(components) if components else list(onnx.components)
    unknown = [c for c in chosen if c not in onnx.components]
    if unknown or "unet" not in chosen:
        raise InvalidParameter("components", chosen, f"a subset of the export's {', '.join(onnx.components)} that includes unet")
    if activations not in ACTIVATIONS:
        raise InvalidParameter("activations", activations, f"one of {', '.join(ACTIVATIONS)}")
    quantise = activations == "int8"
    if quantise and calibration is None:
        raise InvalidParameter("calibration", None, "a Calibration (the model the export was made from, and prompts)",
                               "int8 activations are calibrated by generating with the model (CLI: --model)")
    if weights == "int8" or quantise:
        try:
            import nncf
        except ImportError as exc:
            raise AipaintError("int8 weights and activations need NNCF: pip install nncf (or 'aipaint[openvino]')") from exc
    out_dir = Path(out_dir).expanduser()
    _check_destination(out_dir, overwrite)
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    entries: dict[str, Any] = {}
    controlnets: dict[str, Any] = {}
    try:
        for name in chosen:
            log(f"converting {name}…")
            started = time.perf_counter()
            graph = ov.convert_model(str(onnx.component_path(name)))
            calibrated_later = quantise and name == "unet"  # saved in fp32 to calibrate with, quantised below
            if weights == "int8" and not calibrated_later:
                graph = nncf.compress_weights(graph)
            entries[name] = _save(ov, graph, partial, name, onnx.components[name],
                                  "fp32" if calibrated_later else weights, "float")
            del graph
            log(f"  {name}: {time.perf_counter() - started:.0f} s")
        for key, entry in onnx.controlnets.items():
            name = CONTROLNET_PREFIX + key
            log(f"converting the ControlNet {key}…")
            graph = ov.convert_model(str(onnx.component_path(name)))
            if weights == "int8":
                graph = nncf.compress_weights(graph)
            controlnets[key] = {**entry, **_save(ov, graph, partial, name, entry, weights, "float")}
            del graph
        if quantise:
            _write_manifest(partial, onnx, entries, controlnets, ov.__version__, "fp32", "float", None)
            log(f"calibrating: {len(calibration.prompts)} prompt(s) × {calibration.steps} steps with the fp32 UNet…")
            feeds = collect_unet_inputs(calibration, partial, log)
            started = time.perf_counter()
            log(f"quantising the unet's convolutions ({len(feeds)} calibration samples)…")
            graph = ov.Core().read_model(str(partial / "unet" / IR_FILE))
            graph = (hybrid_quantize if weights == "int8" else conv_quantize)(graph, feeds)
            fresh = partial / ".unet.int8"
            fresh.mkdir()
            ov.save_model(graph, str(fresh / IR_FILE), compress_to_fp16=False)
            del graph
            shutil.rmtree(partial / "unet")
            os.replace(fresh, partial / "unet")
            entries["unet"] = _entry(partial, "unet", onnx.components["unet"], weights, activations)
            log(f"  unet: {time.perf_counter() - started:.0f} s")
            record = _calibration_record(calibration, len(feeds))
            del feeds
        _write_manifest(partial, onnx, entries, controlnets, ov.__version__, weights, activations,
                        record if quantise else None)
        read_ir_manifest(partial)
        _publish(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return read_ir_manifest(out_dir)


def _save(ov: Any, graph: Any, partial: Path, name: str, source: dict[str, Any], weights: str,
          activations: str) -> dict[str, Any]:
    folder = partial / name
    folder.mkdir(parents=True)
    ov.save_model(graph, str(folder / IR_FILE), compress_to_fp16=False)
    return _entry(partial, name, source, weights, activations)


def _entry(partial: Path, name: str, source: dict[str, Any], weights: str, activations: str) -> dict[str, Any]:
    files = {f"{name}/{path.name}": file_record(path) for path in sorted((partial / name).iterdir())}
    return {
        "file": f"{name}/{IR_FILE}",
        "precision": source["precision"],
        "weights": weights,
        "activations": activations,
        "inputs": source["inputs"],
        "outputs": source["outputs"],
        "files": files,
    }


def _calibration_record(calibration: Calibration, samples: int) -> dict[str, Any]:
    return {"prompts": list(calibration.prompts), "steps": calibration.steps, "width": calibration.width,
            "height": calibration.height, "cfg_scale": calibration.cfg_scale, "seed": calibration.seed,
            "samples": samples}


def _write_manifest(partial: Path, onnx: Manifest, entries: dict[str, Any], controlnets: dict[str, Any], version: str,
                    weights: str, activations: str, calibration: dict[str, Any] | None) -> None:
    section: dict[str, Any] = {"version": version, "weights": weights, "activations": activations,
                               "source": {"onnx_dir": str(onnx.root), "created": onnx.data.get("created")}}
    if calibration is not None:
        section["calibration"] = calibration
    data = {
        "format": IR_FORMAT,
        "format_version": FORMAT_VERSION,
        "aipaint_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "opset": onnx.data["opset"],
        "precision": onnx.data["precision"],
        "model": onnx.model,
        "loras": onnx.loras,
        "components": entries,
        "openvino": section,
    }
    if controlnets:
        data["controlnets"] = controlnets
    (partial / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not (out_dir / MANIFEST_NAME).is_file():
            raise AipaintError(f"{out_dir} exists and is not an OpenVINO export; choose another -o")
        if not overwrite:
            raise AipaintError(f"{out_dir} already holds an OpenVINO export; pass --overwrite to replace it")


def _publish(partial: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out_dir)
