"""The manifest of an exported model folder, and the checks a runtime runs before trusting it.

An export folder holds one sub-folder per component (``unet/model.onnx`` plus its
external weights file, …) and ``manifest.json``, which says what was exported, from
which model, at which precision and with which LoRA set, and lists every file with
its size and sha256. Runtimes (the ONNX Runtime and TensorRT plugins) read it
through :func:`read_manifest` and refuse a folder that does not match the model they
were asked to run, because an engine built from other weights produces plausible but
wrong images, which is worse than an error.

Shapes are recorded symbolically: ``"batch"``, ``"height"``, ``"width"`` (latent pixels)
and ``"sequence"`` (text tokens), optionally scaled as ``"height/2"`` (rounded up, as a
stride-2 convolution does) or ``"height*8"`` (image pixels). :func:`resolve_shape`
turns them into numbers; the TensorRT plugin builds its optimization profiles from them.

ControlNets exported beside the model (``aipaint export onnx --controlnet NAME``) are
listed under ``controlnets``, not ``components``: they are optional extras matched to a
generation's ControlNet units by content (:func:`controlnet_source`), and engine
builders that only know the model's own components are not affected by them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

    from aipaint.models.latent import LatentDiffusionModel

MANIFEST_NAME = "manifest.json"
FORMAT = "aipaint-onnx"
FORMAT_VERSION = 1
SYMBOLS = ("batch", "height", "width", "sequence")
COMPONENTS = ("unet", "text_encoder", "vae_decoder", "vae_encoder")
_COMPONENT_NAME = re.compile(r"^(unet|vae_decoder|vae_encoder|text_encoder(_[2-9])?)$")  # SDXL has text_encoder_2
CONTROLNET_PREFIX = "controlnet/"
_CONTROLNET_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# What identifies an exported ControlNet: its weights file (sha256 and size) and the config file
# it was built from (None: a single file whose config is derived from the base UNet). The name
# and A1111's short hash are for people; matching never relies on them.
CONTROLNET_SOURCE_KEYS = ("name", "short_hash", "sha256", "size", "config_sha256")
PRECISIONS = ("fp32", "fp16")
# Weights are compared with a tolerance, not a hash: the same checkpoint loaded in
# float16 or bfloat16 must still match its float32 export.
PROBE_RTOL = 2e-2
PROBE_ATOL = 1e-3
_SYMBOLIC = re.compile(r"^(batch|height|width|sequence)(?:([*/])(\d+))?$")


HINTS = {
    FORMAT: "re-export it with `aipaint export onnx MODEL -o {root}` from the model you load",
    "aipaint-tensorrt": "rebuild it with `aipaint export tensorrt ONNX_DIR -o {root}` on this machine",
    "aipaint-openvino": "convert it again with `aipaint export openvino ONNX_DIR -o {root}` from the model you load",
}


def reexport_hint(root: Path | str, fmt: str = FORMAT) -> str:
    return HINTS.get(fmt, HINTS[FORMAT]).format(root=root)


# --- symbolic shapes ---------------------------------------------------------------------


Dim = int | str


def parse_dim(dim: Dim) -> tuple[str, str, int] | None:
    """``"height/2"`` → ``("height", "/", 2)``; a number → ``None``."""
    if isinstance(dim, int):
        return None
    match = _SYMBOLIC.match(dim)
    if not match:
        raise ValueError(f"not a symbolic dimension: {dim!r} (expected e.g. 'batch', 'height/2', 'width*8')")
    symbol, op, factor = match.groups()
    return symbol, op or "*", int(factor or 1)


def resolve_dim(dim: Dim, values: Mapping[str, int]) -> int:
    parsed = parse_dim(dim)
    if parsed is None:
        return int(dim)
    symbol, op, factor = parsed
    if symbol not in values:
        raise KeyError(f"no value for {symbol!r} to resolve {dim!r}")
    value = values[symbol]
    return value * factor if op == "*" else math.ceil(value / factor)


def resolve_shape(shape: Iterable[Dim], values: Mapping[str, int]) -> tuple[int, ...]:
    """A symbolic shape with concrete ``values`` for batch/height/width/sequence."""
    return tuple(resolve_dim(d, values) for d in shape)


def bind_symbols(shape: Iterable[Dim], actual: Iterable[int], into: dict[str, int]) -> None:
    """Learn symbol values from a concrete tensor shape (``"height*8"`` with 256 → height 32).

    Raises ``ValueError`` when the shape contradicts a fixed dimension or an earlier binding.
    """
    shape, actual = list(shape), list(actual)
    if len(shape) != len(actual):
        raise ValueError(f"expected {len(shape)} dimensions {shape}, got {len(actual)}: {actual}")
    for dim, value in zip(shape, actual):
        parsed = parse_dim(dim)
        if parsed is None:
            if int(dim) != value:
                raise ValueError(f"dimension {dim} is fixed, got {value} (shape {actual} for {shape})")
            continue
        symbol, op, factor = parsed
        if op == "/":
            continue  # ceil-division loses information; another input binds the symbol
        if value % factor:
            raise ValueError(f"{dim} must be a multiple of {factor}, got {value}")
        bound = value // factor
        if into.setdefault(symbol, bound) != bound:
            raise ValueError(f"{symbol} is {into[symbol]} from another input, but {dim}={value} here")


# --- model identity ------------------------------------------------------------------------


def structure_hash(modules: Mapping[str, torch.nn.Module]) -> str:
    """sha256 over every parameter and buffer name and shape: the architecture, not the weights."""
    h = hashlib.sha256()
    for component in sorted(modules):
        for name, tensor in sorted(_named_tensors(modules[component])):
            h.update(f"{component}.{name}:{tuple(tensor.shape)};".encode())
    return h.hexdigest()


def weights_probe(modules: Mapping[str, torch.nn.Module], tensors: int = 24, values: int = 4) -> dict[str, list[float]]:
    """A few weight values from evenly spaced tensors of each component.

    Different checkpoints of one architecture differ in essentially every weight, so a
    hundred values tell them apart, while dtype changes (fp16, bf16) stay within
    :data:`PROBE_RTOL`. Reading them costs milliseconds even for SDXL.
    """
    import torch

    probe: dict[str, list[float]] = {}
    for component in sorted(modules):
        named = sorted((n, t) for n, t in _named_tensors(modules[component]) if t.is_floating_point() and t.dim() >= 2)
        if not named:
            continue
        step = max(1, len(named) // tensors)
        picked: list[float] = []
        for _, tensor in named[::step][:tensors]:
            flat = tensor.detach().reshape(-1)
            index = torch.tensor(probe_indices(flat.numel(), values), device=flat.device)
            picked.extend(float(v) for v in flat[index].float().cpu())
        probe[component] = [float(f"{v:.6g}") for v in picked]
    return probe


def probe_indices(size: int, count: int) -> list[int]:
    """``count`` evenly spaced positions in ``range(size)``, first and last included (exact integers:
    float spacing rounds past the end of tensors with tens of millions of elements)."""
    count = min(count, size)
    if count <= 1:
        return [0] * count
    return [i * (size - 1) // (count - 1) for i in range(count)]


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.state_dict(keep_vars=True).items())


def probe_mismatch(expected: Mapping[str, list[float]], actual: Mapping[str, list[float]]) -> str | None:
    """Describe how two weight probes differ, or ``None`` when they match."""
    for component, values in expected.items():
        if component not in actual:
            return f"the model has no {component}"
        other = actual[component]
        if len(other) != len(values):
            return f"{component} has a different number of weights"
        bad = sum(abs(a - b) > PROBE_ATOL + PROBE_RTOL * abs(a) for a, b in zip(values, other))
        if bad:
            return f"{bad} of {len(values)} sampled {component} weights differ"
    return None


def model_identity(model: LatentDiffusionModel, modules: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    """What a manifest records about the model it came from."""
    return {
        "name": model.name,
        "family": model.family,
        "model_hash": model.model_hash,
        "structure_hash": structure_hash(modules),
        "weights_probe": weights_probe(modules),
        "latent_channels": model.latent_channels,
        "vae_scale_factor": model.vae_scale_factor,
        "scaling_factor": model.scaling_factor,
    }


def controlnet_config_file(ref: Any, config: Path | None) -> Path | None:
    """The config file a ControlNet is built from: a unit's ``config`` option, else a diffusers
    folder's ``config.json``, else ``None`` (a single file, configured from the base UNet)."""
    if config is not None:
        return config / "config.json" if config.is_dir() else config
    if ref.path is not None and ref.path.is_dir():
        return ref.path / "config.json"
    return None


def controlnet_source(ref: Any, config: Path | None = None) -> dict[str, Any]:
    """What a manifest records about a ControlNet's origin (see :data:`CONTROLNET_SOURCE_KEYS`)."""
    from aipaint.plugin.kit.hashing import sha256_file

    weights = ref.weights_file
    if weights is None:
        raise ModelLoadError(f"ControlNet {ref.name!r} has no weights file to identify it by")
    config_file = controlnet_config_file(ref, config)
    return {
        "name": ref.name,
        "short_hash": ref.short_hash,
        "sha256": sha256_file(weights),
        "size": weights.stat().st_size,
        "config_sha256": sha256_file(config_file) if config_file is not None else None,
    }


def controlnet_source_matches(source: Mapping[str, Any], ref: Any, config: Path | None) -> bool:
    """Whether the ControlNet a unit names (``ref`` and its ``config`` option) is the one ``source``
    records: the same weights file and config, compared by size first, then sha256 (cached for big files).
    A ``ControlNetModel`` passed as an object has no file and never matches."""
    from aipaint.plugin.kit.hashing import sha256_file

    weights = ref.weights_file
    if weights is None or weights.stat().st_size != source["size"]:
        return False
    config_file = controlnet_config_file(ref, config)
    if config_file is None:
        config_matches = source["config_sha256"] is None
    else:  # a config option naming no file never matches: loading it in torch reports the problem
        config_matches = config_file.is_file() and sha256_file(config_file) == source["config_sha256"]
    return config_matches and sha256_file(weights) == source["sha256"]


# --- files ---------------------------------------------------------------------------------


def file_record(path: Path) -> dict[str, Any]:
    from aipaint.plugin.kit.hashing import sha256_file

    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def safe_member(root: Path, relative: str, hint: str = "") -> Path:
    """``root / relative``, refusing names that would leave ``root`` (a manifest is user input)."""
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root.resolve()) or os.path.isabs(relative):
        raise ModelLoadError(
            f"{root / MANIFEST_NAME} names the file {relative!r}, which lies outside the folder; refusing it"
            + (f"; {hint}" if hint else "")
        )
    return candidate


# --- reading and checking -------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A parsed, structurally checked ``manifest.json``."""

    root: Path
    data: dict[str, Any]

    @property
    def hint(self) -> str:
        return reexport_hint(self.root, self.data.get("format", FORMAT))

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.data["components"]

    @property
    def controlnets(self) -> dict[str, dict[str, Any]]:
        """Exported ControlNets by key (their folder is ``controlnet/<key>``); empty for most exports."""
        return self.data.get("controlnets", {})

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        """Every exported graph: the components, then the ControlNets as ``controlnet/<key>``."""
        return {**self.components, **{CONTROLNET_PREFIX + key: e for key, e in self.controlnets.items()}}

    @property
    def loras(self) -> list[dict[str, Any]]:
        return self.data.get("loras", [])

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    def component_path(self, component: str) -> Path:
        """The graph file of a component or of a ControlNet (``controlnet/<key>``)."""
        return safe_member(self.root, self.entries[component]["file"], self.hint)

    def io(self, component: str, kind: str) -> list[dict[str, Any]]:
        return self.entries[component][kind]

    def check_files(self, *, verify: str = "sha256") -> None:
        """Every listed file is present with its recorded size (and sha256 with ``verify="sha256"``)."""
        from aipaint.plugin.kit.hashing import sha256_bytes

        if verify not in ("sha256", "size"):
            raise ValueError(f"verify must be 'sha256' or 'size', got {verify!r}")
        for component, entry in self.entries.items():
            for relative, record in entry["files"].items():
                path = safe_member(self.root, relative, self.hint)
                if not path.is_file():
                    raise ModelLoadError(
                        f"{self.root} is incomplete: {relative} ({component}) is missing; {self.hint}"
                    )
                if path.stat().st_size != record["size"]:
                    raise ModelLoadError(
                        f"{self.root}/{relative} is corrupt: {path.stat().st_size} bytes, the manifest says "
                        f"{record['size']}; {self.hint}"
                    )
                if verify == "sha256" and sha256_bytes(path) != record["sha256"]:  # the bytes, never a cache
                    raise ModelLoadError(
                        f"{self.root}/{relative} is corrupt: its sha256 differs from the manifest's; {self.hint}"
                    )

    def check_model(self, model: LatentDiffusionModel, modules: Mapping[str, torch.nn.Module]) -> None:
        """Refuse an export made from another model than ``model`` (architecture or weights)."""
        recorded = self.model
        hint = self.hint
        exported_from = f"{recorded.get('name')!r} (hash {recorded.get('model_hash') or 'unknown'})"
        if recorded.get("model_hash") and model.model_hash and recorded["model_hash"] != model.model_hash:
            raise ModelLoadError(
                f"{self.root} was exported from {exported_from}, but the loaded model {model.name!r} has hash "
                f"{model.model_hash}; load the model it was exported from, or {hint}"
            )
        if structure_hash(modules) != recorded["structure_hash"]:
            raise ModelLoadError(
                f"{self.root} was exported from {exported_from}, whose architecture differs from the loaded "
                f"model {model.name!r}; {hint}"
            )
        difference = probe_mismatch(recorded["weights_probe"], weights_probe(modules))
        if difference:
            raise ModelLoadError(
                f"{self.root} was exported from {exported_from}, whose weights differ from the loaded model "
                f"{model.name!r} ({difference}); {hint}"
            )


def read_manifest(folder: Path | str, *, expected_format: str = FORMAT) -> Manifest:
    """Read and structurally check ``folder/manifest.json``; every problem is a :class:`ModelLoadError`."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ModelLoadError(f"no exported model folder at {root}; {reexport_hint(root, expected_format)}")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ModelLoadError(
            f"{root} has no {MANIFEST_NAME}, so it is not an aipaint export (or the export did not finish); "
            f"{reexport_hint(root, expected_format)}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({exc}); {reexport_hint(root, expected_format)}") from exc
    problem = _schema_problem(data, expected_format)
    if problem:
        raise ModelLoadError(f"{path} is not a valid {expected_format} manifest: {problem}; {reexport_hint(root, expected_format)}")
    return Manifest(root, data)


def _schema_problem(data: Any, expected_format: str) -> str | None:
    if not isinstance(data, dict):
        return "the top level is not an object"
    if data.get("format") != expected_format:
        return f"format is {data.get('format')!r}, expected {expected_format!r}"
    if data.get("format_version") != FORMAT_VERSION:
        return f"format_version {data.get('format_version')!r} is not supported (this aipaint reads {FORMAT_VERSION})"
    for key in ("model", "components", "opset", "precision"):
        if key not in data:
            return f"{key!r} is missing"
    model = data["model"]
    if not isinstance(model, dict) or not {"structure_hash", "weights_probe"} <= set(model):
        return "'model' lacks structure_hash or weights_probe"
    components = data["components"]
    if not isinstance(components, dict) or "unet" not in components:
        return "no unet among the components"
    for name, entry in components.items():
        if not _COMPONENT_NAME.match(name):
            return f"unknown component {name!r}"
        problem = _entry_problem(f"component {name!r}", entry)
        if problem:
            return problem
    controlnets = data.get("controlnets", {})
    if not isinstance(controlnets, dict):
        return "'controlnets' is not an object"
    for key, entry in controlnets.items():
        if not _CONTROLNET_KEY.match(key):
            return f"ControlNet key {key!r} is not a plain name (letters, digits, '.', '_', '-')"
        problem = _entry_problem(f"ControlNet {key!r}", entry, ("source", "config"))
        if problem:
            return problem
        if not isinstance(entry["source"], dict) or not set(CONTROLNET_SOURCE_KEYS) <= set(entry["source"]):
            return f"ControlNet {key!r} lacks its source record ({', '.join(CONTROLNET_SOURCE_KEYS)})"
        if not isinstance(entry["config"], dict):
            return f"ControlNet {key!r} has no config object"
    return None


def _entry_problem(label: str, entry: Any, extra_keys: tuple[str, ...] = ()) -> str | None:
    """What is structurally wrong with one exported graph's record, or ``None``."""
    if not isinstance(entry, dict):
        return f"{label} is not an object"
    for key in ("file", "precision", "inputs", "outputs", "files", *extra_keys):
        if key not in entry:
            return f"{label} lacks {key!r}"
    if entry["precision"] not in PRECISIONS:
        return f"{label} has precision {entry['precision']!r}"
    if entry["file"] not in entry["files"]:
        return f"{label} does not list its own file {entry['file']!r}"
    for io in entry["inputs"] + entry["outputs"]:
        if not isinstance(io, dict) or not {"name", "dtype", "shape"} <= set(io):
            return f"{label} has a malformed input/output record {io!r}"
        try:
            for dim in io["shape"]:
                parse_dim(dim)
        except (ValueError, TypeError) as exc:
            return f"{label}: {exc}"
    for record in entry["files"].values():
        if not isinstance(record, dict) or not {"size", "sha256"} <= set(record):
            return f"{label} has a malformed file record"
    return None
