"""The Python API: read LoRA files, apply several at once with their weights, unload.

>>> from aipaint_plugins.lora import LoraUse, apply_loras
>>> with apply_loras(pipe.model, [LoraUse("ink", 0.8), LoraUse("paper", 0.5, te_weight=0.2)]):
...     pipe.txt2img("a red circle")          # the LoRAs are in force here
>>> # … and the base weights are bit-identical again here.

``apply_loras(...)`` without ``with`` keeps the LoRAs until ``.unload()``. Files are read
once per model (cached by path, size and modification time), so switching LoRAs between
calls costs one patch and one restore, never a model reload.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aipaint_plugins.lora.formats import LoraPatches, ModuleTable, match_patches
from aipaint_plugins.lora.library import lora_folder
from aipaint_plugins.lora.patcher import apply_patches

from aipaint.errors import AipaintWarning, InvalidParameter, ModelLoadError, UnsupportedFeature
from aipaint.plugin.kit.codecs import MappingCodec
from aipaint.plugin.kit.folders import NamedFile
from aipaint.plugin.kit.hashing import short_hash
from aipaint.plugin.kit.patches import AppliedPatches

CACHE_SIZE = 8
HASHES = MappingCodec("Lora hashes")
UNMATCHED_KEYS = MappingCodec("Lora unmatched keys")
PATCHED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3")  # _3: SD 3's T5


class UnmatchedLoraKeys(AipaintWarning):
    """Some keys of a LoRA file match nothing in the model (they are listed, never applied)."""


@dataclass(frozen=True)
class LoraUse:
    """One LoRA to apply: its name in the LoRA folder, the UNet weight and the text-encoder weight.

    ``te_weight`` None means "the same as ``unet_weight``" (A1111's rule for ``<lora:name:w>``).
    """

    name: str
    unet_weight: float = 1.0
    te_weight: float | None = None

    def __post_init__(self) -> None:
        for label, value in (("weight", self.unet_weight), ("te_weight", self.te_weight)):
            if value is None and label == "te_weight":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidParameter(f"lora {label}", value, "must be a finite number", "e.g. 0.8; negative values invert a LoRA")

    @property
    def text_encoder_weight(self) -> float:
        return self.unet_weight if self.te_weight is None else float(self.te_weight)


@dataclass
class LoadedLora:
    """A LoRA file found in the folder and matched against the model."""

    name: str
    file: NamedFile
    patches: LoraPatches

    @property
    def hash(self) -> str:
        return short_hash(self.file.path)


def read_lora_file(path: Path | str, *, allow_pickle: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """A LoRA file's tensors and (safetensors) metadata. Pickles only with ``allow_pickle``,
    through ``torch.load(weights_only=True)``."""
    from aipaint.models.weights import load_state_dict

    path = Path(path)
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    return load_state_dict(path, allow_pickle=allow_pickle), metadata


_tables: weakref.WeakKeyDictionary[Any, ModuleTable] = weakref.WeakKeyDictionary()
_patch_cache: weakref.WeakKeyDictionary[Any, OrderedDict[tuple[Any, ...], LoraPatches]] = weakref.WeakKeyDictionary()


def patch_components(model: Any) -> dict[str, Any]:
    """The networks a LoRA may patch that this model has: the UNet and its text encoders
    (SDXL's base has two; its refiner only ``text_encoder_2``; SD 3 has three)."""
    return {name: module for name in PATCHED_COMPONENTS if (module := getattr(model, name, None)) is not None}


def module_table(model: Any) -> ModuleTable:
    if model not in _tables:
        _tables[model] = ModuleTable.for_components(patch_components(model))
    return _tables[model]


def lora_patches(model: Any, path: Path | str, *, allow_pickle: bool = False, label: str | None = None) -> LoraPatches:
    """A file's patches for ``model`` (cached); warns with :class:`UnmatchedLoraKeys` when keys match nothing."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    cache = _patch_cache.setdefault(model, OrderedDict())
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    state_dict, metadata = read_lora_file(path, allow_pickle=allow_pickle)
    patches = match_patches(state_dict, module_table(model), metadata)
    if not patches.patches:
        raise ModelLoadError(
            f"LoRA {label or path.name!r} changes nothing in {getattr(model, 'name', 'this model')}: none of its "
            f"{len(state_dict)} keys matches a module (e.g. {next(iter(patches.unmatched), 'no keys')}); "
            "is it made for another model family?"
        )
    if patches.unmatched:
        shown = "; ".join(f"{k} ({why})" for k, why in list(patches.unmatched.items())[:5])
        more = len(patches.unmatched) - 5
        warnings.warn(
            f"LoRA {label or path.name!r}: {len(patches.unmatched)} key(s) match nothing in the model and are not "
            f"applied: {shown}" + (f"; and {more} more" if more > 0 else ""),
            UnmatchedLoraKeys,
            stacklevel=3,
        )
    cache[key] = patches
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return patches


@dataclass
class AppliedLoras:
    """LoRAs in force on a model. ``unload()`` (or leaving the ``with`` block) restores the weights bit for bit."""

    loras: list[tuple[LoadedLora, LoraUse]]
    patched: AppliedPatches = field(default_factory=AppliedPatches)

    def unload(self) -> None:
        self.patched.restore()

    def __enter__(self) -> AppliedLoras:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()

    def infotext(self) -> dict[str, str]:
        """A1111's ``Lora hashes`` entry (``"name: 0123456789ab, …"``), plus unmatched-key counts."""
        hashes: dict[str, str] = {}
        unmatched: dict[str, str] = {}
        for lora, _ in self.loras:
            alias = HASHES.alias(lora.name)
            hashes.setdefault(alias, lora.hash)
            if lora.patches.unmatched:
                unmatched[alias] = str(len(lora.patches.unmatched))
        return {**HASHES.write(hashes), **UNMATCHED_KEYS.write(unmatched)}


def load_loras(
    model: Any, uses: Sequence[LoraUse], *, folder: Path | str | None = None, allow_pickle: bool = False
) -> list[tuple[LoadedLora, LoraUse]]:
    """Resolve every name inside the LoRA folder and read its patches (nothing is applied yet)."""
    library = lora_folder(folder, allow_pickle=allow_pickle)
    loaded = []
    for use in uses:
        found = library.resolve(use.name)
        _warn_base_model(found.path, model, use.name)
        patches = lora_patches(model, found.path, allow_pickle=allow_pickle, label=use.name)
        loaded.append((LoadedLora(use.name, found, patches), use))
    return loaded


def _warn_base_model(path: Any, model: Any, name: str) -> None:
    """A LoRA whose card (written by ``aipaint get``) names another base model than the loaded
    model's family: a warning, as the result will likely be noise."""
    from aipaint.sources import lora_base_model_warning

    message = lora_base_model_warning(path, getattr(model, "family", ""), name)
    if message:
        warnings.warn(message, AipaintWarning, stacklevel=3)


def apply_loaded(model: Any, loras: Iterable[tuple[LoadedLora, LoraUse]]) -> AppliedLoras:
    """Patch the model's weights with already-loaded LoRAs."""
    loras = list(loras)
    weighted = [
        (patch, use.unet_weight if patch.component == "unet" else use.text_encoder_weight)
        for lora, use in loras
        for patch in lora.patches.patches
    ]
    runtime = getattr(model, "runtime", "torch")
    if runtime != "torch" and any(p.component == "unet" and w for p, w in weighted):
        raise UnsupportedFeature(
            f"LoRA patches the torch UNet's weights, but this model runs its UNet on the {runtime!r} runtime; "
            "load the model with runtime='torch' to use LoRAs"
        )
    return AppliedLoras(loras, apply_patches(patch_components(model), weighted))


def apply_loras(
    model: Any,
    uses: Iterable[LoraUse | tuple[str, float] | str],
    *,
    folder: Path | str | None = None,
    allow_pickle: bool = False,
) -> AppliedLoras:
    """Apply LoRAs from the folder to ``model`` (a model or a Pipeline). Use as a context manager,
    or call ``.unload()``. ``uses`` items: :class:`LoraUse`, ``(name, weight)`` or a bare name."""
    model = getattr(model, "model", model)
    normalised = [u if isinstance(u, LoraUse) else LoraUse(u) if isinstance(u, str) else LoraUse(*u) for u in uses]
    return apply_loaded(model, load_loras(model, normalised, folder=folder, allow_pickle=allow_pickle))
