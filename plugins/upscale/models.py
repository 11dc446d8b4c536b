"""Model upscalers and face restorers from weights files, loaded through spandrel.

spandrel recognises the architecture (Real-ESRGAN, ESRGAN, SwinIR, HAT, GFPGAN,
CodeFormer, RestoreFormer, …) from a state dict's keys and shapes. aipaint reads the
state dict itself, so the safety rule is the project's: safetensors always; ``.pth`` /
``.pt`` / ``.ckpt`` only with ``allow_pickle=True``, and then only through
``torch.load(weights_only=True)``. (spandrel's own file loader would run
``torch.jit.load`` on ``.pt`` files and its own unpickler on ``.pth``; neither is used.)

Where weights live: a folder (``$AIPAINT_UPSCALER_DIR``, else ``$AIPAINT_HOME/upscalers``,
else ``~/.aipaint/upscalers``), a zoo card whose ``family`` is ``upscaler`` or
``face-restoration``, or an explicit file path. A bare name only ever resolves inside the
folder: ``../x`` is not a name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from aipaint.errors import ModelLoadError, UnknownName

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
ZOO_FAMILIES = ("upscaler", "face-restoration")


def aipaint_home() -> Path:
    return Path(os.environ.get("AIPAINT_HOME") or Path.home() / ".aipaint").expanduser()


def upscaler_dir() -> Path:
    """The folder model upscalers are found in (it may not exist)."""
    explicit = os.environ.get("AIPAINT_UPSCALER_DIR")
    return Path(explicit).expanduser() if explicit else aipaint_home() / "upscalers"


def weight_files(folder: Path) -> dict[str, Path]:
    """Weights in ``folder`` by name (the file stem); safetensors wins over a pickle of the same name."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir(), key=lambda p: (WEIGHT_SUFFIXES.index(p.suffix) if p.suffix in WEIGHT_SUFFIXES else 99, p.name)):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            found.setdefault(path.stem, path)
    return found


def _looks_like_path(name: str) -> bool:
    return any(sep in name for sep in ("/", "\\")) or name.endswith(WEIGHT_SUFFIXES)


def resolve_weights(name: str | os.PathLike[str], folder: Path | None = None, *, kind: str = "upscaler") -> Path:
    """The weights file a user means by ``name``: a file in ``folder``, a zoo card, or a path."""
    folder = folder or upscaler_dir()
    text = os.fspath(name)
    files = weight_files(folder)
    for stem, path in files.items():
        if text in (stem, path.name):
            return path
    from aipaint import zoo

    card = zoo.find(text) if text and not _looks_like_path(text) else None
    if card is not None and card.family in ZOO_FAMILIES:
        path = zoo.fetch(card)
        if path.is_dir():
            candidates = list(weight_files(path).values())
            if not candidates:
                raise ModelLoadError(f"zoo model {card.id!r} has no weights file in {path}")
            return candidates[0]
        return path
    if _looks_like_path(text):
        path = Path(text).expanduser()
        if path.is_file():
            return path
        raise ModelLoadError(
            f"missing weights file {text!r}; put the {kind} weights (.safetensors preferred) there, "
            f"or in {folder} and pass the file's name"
        )
    raise UnknownName(kind, text, sorted(files) or [f"(no weights in {folder}; add .safetensors files there)"])


@dataclass(frozen=True)
class LoadedImageModel:
    """A spandrel model and the facts aipaint needs about it."""

    name: str
    path: Path
    descriptor: Any  # spandrel.ImageModelDescriptor
    architecture: str
    purpose: str  # "SR", "FaceSR" or "Restoration"
    scale: int

    def __call__(self, image: Any) -> Any:
        return self.descriptor(image)


def _spandrel() -> Any:
    try:
        import spandrel
    except ImportError as exc:
        raise ModelLoadError(
            "model upscalers and face restorers need the spandrel package: pip install 'aipaint[upscale]'"
        ) from exc
    return spandrel


def load_image_model(path: Path, *, allow_pickle: bool = False, device: str = "cpu") -> LoadedImageModel:
    """Load a weights file and let spandrel detect its architecture."""
    return _load_cached(Path(path).resolve(), Path(path).stat().st_mtime_ns if Path(path).is_file() else 0,
                        allow_pickle, device)


@lru_cache(maxsize=4)
def _load_cached(path: Path, mtime: int, allow_pickle: bool, device: str) -> LoadedImageModel:
    from aipaint.loading import load_state_dict

    spandrel = _spandrel()
    state_dict = load_state_dict(path, allow_pickle=allow_pickle)
    if "params_ema" in state_dict or "params" in state_dict:  # BasicSR's wrapping, as spandrel unwraps it
        state_dict = state_dict.get("params_ema") or state_dict["params"]
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_state_dict(spandrel.canonicalize_state_dict(state_dict))
    except spandrel.UnsupportedModelError as exc:
        raise ModelLoadError(
            f"{path.name}: spandrel does not recognise this model's architecture; supported ones include "
            "Real-ESRGAN, ESRGAN, SwinIR, HAT, GFPGAN, CodeFormer and RestoreFormer"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(f"{path.name}: could not build the model from its weights: {exc}") from exc
    if not isinstance(descriptor, spandrel.ImageModelDescriptor):
        raise ModelLoadError(f"{path.name} is a {descriptor.purpose} model ({descriptor.architecture.name}), not an image-to-image model")
    descriptor.eval()
    return LoadedImageModel(
        name=path.stem,
        path=path,
        descriptor=descriptor,
        architecture=descriptor.architecture.name,
        purpose=descriptor.purpose,
        scale=int(descriptor.scale),
    )
