"""Export a loaded model's networks to ONNX, with a manifest, atomically.

Each network is traced once with torch's legacy (TorchScript-based) exporter at opset
17 with dynamic batch, height, width and text length, then saved as ``model.onnx`` plus
one external weights file (ONNX protobufs stop at 2 GB; SD1.5's UNet is 3.4 GB in fp32).

* The UNet wrapper takes ``(sample, timestep, encoder_hidden_states, [extras…],
  [down_residual_0…, mid_residual])``: the extras are family conditioning such as SDXL's
  ``text_embeds``/``time_ids``; the residuals are ControlNet's, so a ControlNet running
  anywhere can steer the exported UNet (the runtime feeds zeros when none is active).
  It is traced at a latent size that is *not* a multiple of the UNet's down-sampling
  factor, which makes diffusers pass explicit up-sampling sizes; the graph therefore
  works at every latent size, not just multiples of 8.
* The text encoder exports its last hidden state, its pooled output and every hidden
  state (stacked), so A1111's clip skip works unchanged.
* The VAE encoder exports the posterior's moments (mean and log-variance), from which
  the runtime rebuilds diffusers' ``DiagonalGaussianDistribution``.
* LoRA is fused at export: the named LoRAs are activated through the installed LoRA
  adapter (exactly as a generation would) while tracing, and recorded in the manifest.
* ControlNets named with ``controlnets`` (as a unit names them: zoo id, name in the
  ControlNet folder, or path) are loaded through the ControlNet adapter and exported to
  ``controlnet/<key>/`` with ``(sample, timestep, encoder_hidden_states, controlnet_cond)``
  in, the control image at image resolution, and the UNet's residual inputs out; the
  manifest records the file they came from (sha256), so the runtime uses an exported
  ControlNet only for exactly that file.

The folder is written under a temporary name beside ``out_dir`` and renamed into place
only once complete, so an interrupted export never leaves a folder that looks valid.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint import __version__
from aipaint.errors import AipaintError, InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.plugin.kit.exports import (
    CONTROLNET_PREFIX,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_NAME,
    Manifest,
    controlnet_source,
    file_record,
    model_identity,
    read_manifest,
)

if TYPE_CHECKING:
    import torch

    from aipaint.models.latent import LatentDiffusionModel
    from aipaint.plugin.host import PluginHost

OPSET = 17
TRACE_BATCH = 2
EXPORTABLE = ("unet", "text_encoder", "vae_decoder", "vae_encoder")
Log = Callable[[str], None]


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to fuse at export: ``name:weight`` on the command line."""

    name: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        name, _, weight = text.partition(":")
        if not name.strip():
            raise InvalidParameter("lora", text, "NAME or NAME:WEIGHT, e.g. detail:0.8")
        try:
            return cls(name.strip(), float(weight) if weight else 1.0)
        except ValueError as exc:
            raise InvalidParameter("lora", text, "NAME or NAME:WEIGHT with a numeric weight") from exc

    def prompt_tag(self) -> str:
        return f"<lora:{self.name}:{self.weight:g}>"


# --- wrappers: the signatures the exported graphs have -------------------------------------


def _wrappers() -> dict[str, type]:
    import torch

    class UNetForExport(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module, extras: Sequence[str], residuals: int) -> None:
            super().__init__()
            self.unet = unet
            self.extras = tuple(extras)
            self.residuals = residuals

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *rest: torch.Tensor):
            extras = dict(zip(self.extras, rest[: len(self.extras)]))
            kwargs: dict[str, Any] = {"added_cond_kwargs": extras} if extras else {}
            if self.residuals:
                residuals = rest[len(self.extras) :]
                kwargs["down_block_additional_residuals"] = tuple(residuals[:-1])
                kwargs["mid_block_additional_residual"] = residuals[-1]
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False, **kwargs)[0]

    class TextEncoderForExport(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor):
            out = self.encoder(input_ids, output_hidden_states=True)
            pooled = out.text_embeds if getattr(out, "text_embeds", None) is not None else out.pooler_output
            return out.last_hidden_state, pooled, torch.stack(out.hidden_states)

    class VaeDecoderForExport(torch.nn.Module):
        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent: torch.Tensor):
            return self.vae.decode(latent, return_dict=False)[0]

    class VaeEncoderForExport(torch.nn.Module):
        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, image: torch.Tensor):
            return self.vae.encode(image, return_dict=False)[0].parameters

    class ControlNetForExport(torch.nn.Module):
        def __init__(self, controlnet: torch.nn.Module) -> None:
            super().__init__()
            self.controlnet = controlnet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                    controlnet_cond: torch.Tensor):
            down, mid = self.controlnet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                        controlnet_cond=controlnet_cond, return_dict=False)
            return (*down, mid)

    return {
        "unet": UNetForExport,
        "text_encoder": TextEncoderForExport,
        "vae_decoder": VaeDecoderForExport,
        "vae_encoder": VaeEncoderForExport,
        "controlnet": ControlNetForExport,
    }


# --- the input/output description of each component -----------------------------------------


def residual_layout(unet: torch.nn.Module) -> list[tuple[int, int]]:
    """(channels, down-sampling level) of each ControlNet residual, the mid-block's last.

    Mirrors the order in which diffusers' UNet collects skip connections: conv_in, then
    each down block's layers, then its down-sampler.
    """
    channels = list(unet.config.block_out_channels)
    layout = [(channels[0], 0)]
    level = 0
    for index, block in enumerate(unet.down_blocks):
        layout.extend((channels[index], level) for _ in block.resnets)
        if getattr(block, "downsamplers", None):
            level += 1
            layout.append((channels[index], level))
    layout.append((channels[-1], level))
    return layout


def _scaled(symbol: str, level: int) -> str:
    return symbol if level == 0 else f"{symbol}/{2 ** level}"


def _io(name: str, dtype: str, shape: Sequence[int | str]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": list(shape)}


def _residual_ios(layout: Sequence[tuple[int, int]], dtype: str) -> list[dict[str, Any]]:
    """The ControlNet residuals: the UNet's extra inputs, and a ControlNet's outputs."""
    return [
        _io("mid_residual" if index == len(layout) - 1 else f"down_residual_{index}", dtype,
            ["batch", channels, _scaled("height", level), _scaled("width", level)])
        for index, (channels, level) in enumerate(layout)
    ]


@dataclass
class ComponentPlan:
    """How one component is traced: the module, example inputs and the recorded I/O."""

    name: str
    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    precision: str

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            io["name"]: {axis: str(dim) for axis, dim in enumerate(io["shape"]) if isinstance(dim, str)}
            for io in self.inputs + self.outputs
        }


def _trace_latent_size(unet: torch.nn.Module) -> int:
    # Not a multiple of the total down-sampling factor: diffusers then forwards explicit
    # up-sampling sizes, and the traced graph handles any latent size (see module doc).
    return 2 ** len([b for b in unet.down_blocks if getattr(b, "downsamplers", None)]) * 2 + 1


def _example_conditioning(model: LatentDiffusionModel) -> Any:
    """A conditioning as the loop hands it to the UNet, extras included (SDXL adds time ids per request)."""
    from aipaint.api.request import GenerationRequest

    size = model.vae_scale_factor * 8
    request = GenerationRequest(prompt="a", width=size, height=size)
    return model.request_conditioning(model.encode_texts(["a"])[0], text="a", negative=False, request=request)


def plan_components(
    model: LatentDiffusionModel,
    modules: dict[str, torch.nn.Module],
    *,
    components: Sequence[str],
    precisions: dict[str, str],
    controlnet_inputs: bool,
) -> list[ComponentPlan]:
    """Example inputs and symbolic I/O for each requested component (``modules`` may be fp16 copies)."""
    import torch

    wrappers = _wrappers()
    device = model.device
    latent = _trace_latent_size(modules["unet"])
    factor = model.vae_scale_factor
    plans: list[ComponentPlan] = []
    cond = _example_conditioning(model)
    dtype_name = {"fp32": "float32", "fp16": "float16"}

    def tensor_dtype(component: str) -> torch.dtype:
        return torch.float16 if precisions[component] == "fp16" else torch.float32

    if "unet" in components:
        unet = modules["unet"]
        dt = tensor_dtype("unet")
        hidden = cond.embeds.shape[-1]
        example: list[torch.Tensor] = [
            torch.randn(TRACE_BATCH, unet.config.in_channels, latent, latent, device=device, dtype=dt),
            torch.full((TRACE_BATCH,), 500.0, device=device),
            torch.randn(TRACE_BATCH, 77, hidden, device=device, dtype=dt),
        ]
        inputs = [
            _io("sample", dtype_name[precisions["unet"]], ["batch", unet.config.in_channels, "height", "width"]),
            _io("timestep", "float32", ["batch"]),
            _io("encoder_hidden_states", dtype_name[precisions["unet"]], ["batch", "sequence", hidden]),
        ]
        extras = sorted(cond.extras)
        for key in extras:
            value = cond.extras[key]
            example.append(value.repeat(TRACE_BATCH, *([1] * (value.dim() - 1))).to(device, dt))
            inputs.append(_io(key, dtype_name[precisions["unet"]], ["batch", *value.shape[1:]]))
        layout = residual_layout(unet) if controlnet_inputs else []
        for channels, level in layout:
            size = latent
            for _ in range(level):
                size = (size + 1) // 2
            example.append(torch.zeros(TRACE_BATCH, channels, size, size, device=device, dtype=dt))
        inputs.extend(_residual_ios(layout, dtype_name[precisions["unet"]]))
        outputs = [_io("out_sample", dtype_name[precisions["unet"]], ["batch", unet.config.out_channels, "height", "width"])]
        plans.append(ComponentPlan("unet", wrappers["unet"](unet, extras, len(layout)), tuple(example), inputs, outputs, precisions["unet"]))

    for name in components:
        if not name.startswith("text_encoder"):
            continue
        encoder = modules[name]
        config = encoder.config
        pooled_dim = getattr(config, "projection_dim", None) if hasattr(encoder, "text_projection") else None
        pooled_dim = pooled_dim or config.hidden_size
        ids = torch.full((TRACE_BATCH, 77), 49407, dtype=torch.long, device=device)
        ids[:, 0] = 49406
        d = dtype_name[precisions[name]]
        plans.append(
            ComponentPlan(
                name,
                wrappers["text_encoder"](encoder),
                (ids,),
                [_io("input_ids", "int64", ["batch", 77])],
                [
                    _io("last_hidden_state", d, ["batch", 77, config.hidden_size]),
                    _io("pooled", d, ["batch", pooled_dim]),
                    _io("hidden_states", d, [config.num_hidden_layers + 1, "batch", 77, config.hidden_size]),
                ],
                precisions[name],
            )
        )

    vae = modules.get("vae")
    channels = model.latent_channels
    if "vae_decoder" in components:
        d = dtype_name[precisions["vae_decoder"]]
        plans.append(
            ComponentPlan(
                "vae_decoder",
                wrappers["vae_decoder"](vae),
                (torch.randn(1, channels, 8, 8, device=device, dtype=tensor_dtype("vae_decoder")),),
                [_io("latent", d, ["batch", channels, "height", "width"])],
                [_io("image", d, ["batch", vae.config.out_channels, f"height*{factor}", f"width*{factor}"])],
                precisions["vae_decoder"],
            )
        )
    if "vae_encoder" in components:
        d = dtype_name[precisions["vae_encoder"]]
        plans.append(
            ComponentPlan(
                "vae_encoder",
                wrappers["vae_encoder"](vae),
                (torch.randn(1, vae.config.in_channels, 8 * factor, 8 * factor, device=device, dtype=tensor_dtype("vae_encoder")),),
                [_io("image", d, ["batch", vae.config.in_channels, f"height*{factor}", f"width*{factor}"])],
                [_io("moments", d, ["batch", 2 * channels, "height", "width"])],
                precisions["vae_encoder"],
            )
        )
    return plans


@dataclass(frozen=True)
class ControlNetToExport:
    """A ControlNet loaded for export: its manifest key, what identifies its file, and the torch module."""

    key: str
    source: dict[str, Any]
    module: torch.nn.Module


def load_controlnets(
    model: LatentDiffusionModel, names: Sequence[Any], *, allow_pickle: bool = False
) -> list[ControlNetToExport]:
    """Locate and load each named ControlNet through the ControlNet adapter, as a unit would.

    A ControlNet is identified at generation by its file, so names and paths are accepted
    and a ``ControlNetModel`` object is not; each file may be named once.
    """
    from aipaint.plugin.kit.controlnets import load_controlnet

    unet_layout = residual_layout(model.unet)
    loaded: list[ControlNetToExport] = []
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, (str, Path)):
            raise InvalidParameter(
                "controlnets", type(name).__name__,
                "zoo ids, names in the ControlNet folder or paths (the runtime recognises a ControlNet by its file)",
                "save the ControlNetModel with save_pretrained() and export that folder",
            )
        ref, module = load_controlnet(name, model, allow_pickle=allow_pickle)
        layout = residual_layout(module)
        if layout != unet_layout:
            raise ModelLoadError(
                f"ControlNet {ref.name!r} makes residuals {layout}, but the UNet of {model.name!r} takes {unet_layout}; "
                "it was made for another base model"
            )
        source = controlnet_source(ref)
        if source["sha256"] in seen:
            raise InvalidParameter("controlnets", str(name), f"each ControlNet once (it is the same file as {seen[source['sha256']]!r})")
        seen[source["sha256"]] = str(name)
        loaded.append(ControlNetToExport(_controlnet_key(ref.name, {c.key for c in loaded}), source, module))
    return loaded


def _controlnet_key(name: str, taken: set[str]) -> str:
    """A folder name for the ControlNet: its name made plain, unique within the export."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:90] or "controlnet"
    key, number = base, 1
    while key.lower() in {t.lower() for t in taken}:
        number += 1
        key = f"{base}-{number}"
    return key


def plan_controlnet(model: LatentDiffusionModel, controlnet: torch.nn.Module, key: str, precision: str) -> ComponentPlan:
    """Example inputs and symbolic I/O of one ControlNet (``controlnet`` already in ``precision``)."""
    import torch

    config = controlnet.config
    dtype = torch.float16 if precision == "fp16" else torch.float32
    dtype_name = "float16" if precision == "fp16" else "float32"
    latent = _trace_latent_size(controlnet)
    factor = model.vae_scale_factor
    device = model.device
    example = (
        torch.randn(TRACE_BATCH, config.in_channels, latent, latent, device=device, dtype=dtype),
        torch.full((TRACE_BATCH,), 500.0, device=device),
        torch.randn(TRACE_BATCH, 77, config.cross_attention_dim, device=device, dtype=dtype),
        torch.rand(TRACE_BATCH, config.conditioning_channels, latent * factor, latent * factor, device=device, dtype=dtype),
    )
    inputs = [
        _io("sample", dtype_name, ["batch", config.in_channels, "height", "width"]),
        _io("timestep", "float32", ["batch"]),
        _io("encoder_hidden_states", dtype_name, ["batch", "sequence", config.cross_attention_dim]),
        _io("controlnet_cond", dtype_name, ["batch", config.conditioning_channels, f"height*{factor}", f"width*{factor}"]),
    ]
    outputs = _residual_ios(residual_layout(controlnet), dtype_name)
    return ComponentPlan(CONTROLNET_PREFIX + key, _wrappers()["controlnet"](controlnet), example, inputs, outputs, precision)


def _plain_config(config: Any) -> dict[str, Any]:
    """A diffusers config as JSON data, without its private keys (``_name_or_path`` is a local path)."""
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}))


# --- writing --------------------------------------------------------------------------------


def _graph_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor stored in a graph: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for sub in attribute.graphs:
                yield from _graph_tensors(sub)


def gather_external_data(source: Path, target: Path, *, threshold: int = 1024, chunk: int = 64 << 20) -> None:
    """Re-save ``source`` as ``target`` plus one ``model.onnx.data`` beside it, streaming.

    torch's exporter embeds small models' weights in the protobuf and scatters models
    over 2 GB into one file per tensor. Both become one graph file and one weights file,
    copied tensor by tensor, so even SDXL's UNet never sits in memory twice.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(source), load_external_data=False)
    data_name = target.name + ".data"
    offset = 0
    with open(target.parent / data_name, "wb") as sink:
        for tensor in _graph_tensors(model.graph):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                path = source.parent / info.location
                start = info.offset or 0
                length = info.length or path.stat().st_size - start
                with open(path, "rb") as stream:
                    stream.seek(start)
                    left = length
                    while left:
                        block = stream.read(min(chunk, left))
                        if not block:
                            raise OSError(f"{path} ended early while gathering ONNX weights")
                        sink.write(block)
                        left -= len(block)
                del tensor.external_data[:]
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
                length = len(tensor.raw_data)
                sink.write(tensor.raw_data)
                tensor.ClearField("raw_data")
            else:
                continue
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += length
    onnx.save_model(model, str(target))


def _export_component(plan: ComponentPlan, folder: Path, opset: int) -> dict[str, Any]:
    import torch

    folder.mkdir(parents=True)
    raw = folder / "raw"
    raw.mkdir()
    names = [io["name"] for io in plan.inputs]
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python control flow on shapes are expected
        torch.onnx.export(
            plan.module,
            plan.example,
            str(raw / "model.onnx"),
            input_names=names,
            output_names=[io["name"] for io in plan.outputs],
            dynamic_axes=plan.dynamic_axes(),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    gather_external_data(raw / "model.onnx", folder / "model.onnx")
    shutil.rmtree(raw)
    files = {}
    for path in sorted(folder.iterdir()):
        files[f"{plan.name}/{path.name}"] = file_record(path)
    return {
        "file": f"{plan.name}/model.onnx",
        "precision": plan.precision,
        "inputs": plan.inputs,
        "outputs": plan.outputs,
        "files": files,
    }


@contextlib.contextmanager
def _loras_active(
    model: LatentDiffusionModel, loras: Sequence[LoraSpec], host: PluginHost | None, lora_dir: Path | str | None
) -> Iterator[dict[str, str]]:
    """Activate LoRAs through the installed LoRA adapter, exactly as a generation would."""
    if not loras:
        yield {}
        return
    from aipaint.api.request import GenerationRequest
    from aipaint.engine.activation import activate_adapters
    from aipaint.engine.conditioning import parse_prompts
    from aipaint.engine.run import job_scope
    from aipaint.plugin.host import default_host

    host = host or default_host()
    prompt = " ".join(lora.prompt_tag() for lora in loras)
    size = model.vae_scale_factor * 8
    options = {"lora": {"folder": str(lora_dir)}} if lora_dir else {}
    request = GenerationRequest(prompt=prompt, steps=1, seed=0, width=size, height=size, options=options)
    request = request.with_typed_options(host.registry.options)
    stack = contextlib.ExitStack()
    try:
        scope = stack.enter_context(job_scope(model))
        active = activate_adapters(model, request, parse_prompts(request)[0], host, scope)
        contributors, infotext = active.contributors, active.infotext
    except UnsupportedFeature as exc:
        stack.close()
        raise UnsupportedFeature(f"cannot fuse LoRA into the export: {exc}") from exc
    with stack:
        if contributors:
            raise UnsupportedFeature(
                "cannot fuse LoRA into the export: the installed LoRA adapter adds steps to the denoise loop "
                "instead of patching weights"
            )
        yield infotext


def export_onnx(
    model: LatentDiffusionModel,
    out_dir: Path | str,
    *,
    fp16: bool = False,
    fp16_vae: bool = False,
    loras: Sequence[LoraSpec] = (),
    lora_dir: Path | str | None = None,
    components: Sequence[str] = EXPORTABLE,
    controlnet_inputs: bool = True,
    controlnets: Sequence[str | Path] = (),
    allow_pickle: bool = False,
    opset: int = OPSET,
    overwrite: bool = False,
    host: PluginHost | None = None,
    log: Log | None = None,
    int8: bool = False,
) -> Manifest:
    """Export ``model``'s networks into ``out_dir`` and return its checked manifest.

    ``fp16`` exports the UNet in half precision; the VAE stays in fp32 unless
    ``fp16_vae`` (SD-family VAEs can overflow in fp16), the text encoders always do. ``components``
    chooses among unet, text_encoder, vae_decoder and vae_encoder (the UNet is required);
    what is left out keeps running in torch. ``loras`` are fused through the installed
    LoRA adapter, looked up in ``lora_dir`` (default: the adapter's own folder).
    ``controlnets`` are exported too, at the UNet's precision (see :func:`load_controlnets`);
    ``allow_pickle`` lets them be ``.pth``/``.ckpt`` files. ``int8`` quantises the UNet's
    matrix-product weights to int8 with ONNX Runtime's dynamic quantisation (see
    :func:`quantize_unet_int8`).
    """
    import torch

    log = log or (lambda message: None)
    out_dir = Path(out_dir).expanduser()
    unknown = [c for c in components if c not in EXPORTABLE]
    if unknown or "unet" not in components:
        raise InvalidParameter("components", list(components), f"a subset of {', '.join(EXPORTABLE)} that includes unet")
    if opset < 17:
        raise InvalidParameter("opset", opset, "17 or higher (LayerNormalization and the attention patterns need it)")
    if controlnets and not controlnet_inputs:
        raise InvalidParameter("controlnet_inputs", False, "on when ControlNets are exported (they feed the UNet's residual inputs)",
                               "drop --no-controlnet-inputs, or --controlnet")
    if int8 and fp16:
        raise InvalidParameter("int8", True, "an fp32 export (int8 weights with fp32 activations); drop --fp16")
    if fp16 and model.device.type == "cpu":
        log("note: tracing in fp16 on the CPU is slow; --device cuda exports faster where a GPU exists")
    _check_destination(out_dir, overwrite)
    controlnets_to_export = load_controlnets(model, controlnets, allow_pickle=allow_pickle)

    torch_modules = model.modules()
    identity = model_identity(model, torch_modules)
    names = ["unet", *(c for c in components if c.startswith("vae"))]
    text_encoders = [k for k in torch_modules if k.startswith("text_encoder")] if "text_encoder" in components else []
    precisions = {
        "unet": "fp16" if fp16 else "fp32",
        "vae_decoder": "fp16" if fp16_vae else "fp32",
        "vae_encoder": "fp16" if fp16_vae else "fp32",
        # Text encoders stay fp32: they run once per prompt, and transformers' CLIP traced in
        # fp16 mixes float types inside LayerNormalization, which ONNX Runtime rejects.
        **{name: "fp32" for name in text_encoders},
    }
    partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    started = time.perf_counter()
    try:
        with _loras_active(model, loras, host, lora_dir) as lora_infotext:
            modules = {"unet": torch_modules["unet"], "vae": torch_modules["vae"], **{k: torch_modules[k] for k in text_encoders}}
            halves = {k: copy.deepcopy(m).half() for k, m in modules.items() if _wants_half(k, precisions)}
            plans = plan_components(
                model, {**modules, **halves}, components=names + text_encoders, precisions=precisions,
                controlnet_inputs=controlnet_inputs,
            )
            entries = {}
            for plan in plans:
                entries[plan.name] = _export_logged(plan, partial, opset, log)
            del halves, plans
        if int8:
            entries["unet"] = quantize_unet_int8(entries["unet"], partial, log)
        controlnet_entries = {}
        for item in controlnets_to_export:
            module = copy.deepcopy(item.module).half() if fp16 else item.module
            plan = plan_controlnet(model, module, item.key, precisions["unet"])
            entry = _export_logged(plan, partial, opset, log)
            controlnet_entries[item.key] = {**entry, "source": item.source, "config": _plain_config(module.config)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "aipaint_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "exporter": {"torch": torch.__version__, "onnx": _version("onnx"), "dynamo": False},
            "opset": opset,
            "precision": "fp16" if fp16 else "fp32",
            "model": identity,
            "loras": [{"name": lora.name, "weight": lora.weight} for lora in loras],
            "lora_infotext": lora_infotext,
            "controlnet_inputs": controlnet_inputs,
            "components": entries,
            "controlnets": controlnet_entries,
        }
        (partial / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        read_manifest(partial)  # never publish a folder the runtime would refuse
        _publish(partial, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"exported to {out_dir} in {time.perf_counter() - started:.1f} s")
    return read_manifest(out_dir)


def quantize_unet_int8(entry: dict[str, Any], partial: Path, log: Log) -> dict[str, Any]:
    """The exported UNet with its MatMul weights in int8 (``onnxruntime.quantization.quantize_dynamic``).

    Dynamic quantisation: weights are stored as int8 (per tensor, symmetric), activations are
    quantised on the fly per call. Only MatMul nodes (attention and feed-forward projections)
    are quantised; convolutions stay fp32, since ONNX Runtime's ConvInteger is slower than its
    fp32 convolution on the CPU. Inputs and outputs stay float32, so the runtime is unchanged.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    log("quantising the unet's MatMul weights to int8…")
    started = time.perf_counter()
    folder = partial / "unet"
    staged = partial / "unet-int8"
    staged.mkdir()
    quantize_dynamic(str(folder / "model.onnx"), str(staged / "model.onnx"), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"], use_external_data_format=True)
    shutil.rmtree(folder)
    folder.mkdir()
    gather_external_data(staged / "model.onnx", folder / "model.onnx")
    shutil.rmtree(staged)
    log(f"  int8: {time.perf_counter() - started:.1f} s")
    files = {f"unet/{path.name}": file_record(path) for path in sorted(folder.iterdir())}
    return {**entry, "weights": "int8", "files": files}


def _export_logged(plan: ComponentPlan, partial: Path, opset: int, log: Log) -> dict[str, Any]:
    log(f"exporting {plan.name} ({plan.precision})…")
    started = time.perf_counter()
    entry = _export_component(plan, partial / plan.name, opset)
    log(f"  {plan.name}: {time.perf_counter() - started:.1f} s")
    return entry


def _wants_half(module_key: str, precisions: dict[str, str]) -> bool:
    if module_key == "vae":
        return precisions["vae_decoder"] == "fp16" or precisions["vae_encoder"] == "fp16"
    return precisions.get(module_key) == "fp16"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise AipaintError(f"{out_dir} exists and is not a folder; choose another -o")
    if any(out_dir.iterdir()):
        if not (out_dir / MANIFEST_NAME).is_file():
            raise AipaintError(f"{out_dir} is a non-empty folder that is not an aipaint export; refusing to replace it")
        if not overwrite:
            raise AipaintError(f"{out_dir} already holds an export; pass --overwrite to replace it")


def _publish(partial: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished export into place; an existing export is replaced only after the new one is complete."""
    if out_dir.exists():
        _check_destination(out_dir, overwrite)
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
        os.replace(partial, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, out_dir)
