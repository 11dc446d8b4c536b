"""Model upscalers and face restorers from weights files, loaded through spandrel.

spandrel recognises the architecture (Real-ESRGAN, ESRGAN, SwinIR, HAT, GFPGAN,
CodeFormer, RestoreFormer, …) from a state dict's keys and shapes. aipaint reads the
state dict itself, so the safety rule is the project's: safetensors always; ``.pth`` /
``.pt`` / ``.ckpt`` only with ``allow_pickle=True``, and then only through
``torch.load(weights_only=True)``. (spandrel's own file loader would run
``torch.jit.load`` on ``.pt`` files and its own unpickler on ``.pth``; neither is used.)

Where weights live: a folder (``$AIPAINT_UPSCALER_DIR``, else ``$AIPAINT_HOME/upscalers``,
else ``~/.aipaint/upscalers``) or a zoo card whose ``family`` is ``upscaler`` or
``face-restoration``. A name (a string: it may come from a user, over the network) only
ever resolves inside the folder, through the kit's :class:`~aipaint.plugin.kit.folders.ModelFolder`:
``sub/4x-model`` is fine, ``../x``, absolute paths and symbolic links that lead out of the
folder are :class:`NameOutsideFolder` errors. Python code that means a file elsewhere passes
a :class:`pathlib.Path`, which is used as it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from aipaint.errors import InvalidParameter, ModelLoadError, UnknownName
from aipaint.plugin.kit.folders import ModelFolder, NameOutsideFolder, default_folder

ZOO_FAMILIES = ("upscaler", "face-restoration")


class WeightsNameOutsideFolder(NameOutsideFolder):
    """:class:`NameOutsideFolder` for an upscaler or face-restorer name, with advice that fits them."""

    def __init__(self, refused: NameOutsideFolder) -> None:
        self.why = refused.why
        InvalidParameter.__init__(self, refused.name, refused.value, refused.allowed,
                                  "put the weights file in that folder (sub-folders are fine) and pass its name, e.g. 4x-UltraSharp")


def upscaler_dir() -> Path:
    """The folder model upscalers and face restorers are found in (it may not exist)."""
    return default_folder("AIPAINT_UPSCALER_DIR", "upscalers")


def weights_folder(folder: Path | None = None, kind: str = "upscaler") -> ModelFolder:
    """The upscaler folder as a :class:`ModelFolder`. Pickle files are listed and resolved
    (safetensors first); whether one may be *loaded* is decided by ``allow_pickle`` at load."""
    from aipaint.sources.folders import SourcedFolder  # a name may be the weights' source

    return SourcedFolder(folder or upscaler_dir(), kind, allow_pickle=True, source_kind="upscaler")


def weight_files(folder: Path) -> dict[str, Path]:
    """Weights below ``folder`` by name (relative path without suffix); safetensors wins over a
    pickle of the same name, and links that lead out of the folder are skipped."""
    return {item.name: item.path for item in weights_folder(folder).files()}


def resolve_weights(name: str | os.PathLike[str], folder: Path | None = None, *, kind: str = "upscaler") -> Path:
    """The weights file meant by ``name``: a file inside ``folder`` or a zoo card; a
    :class:`~pathlib.Path` is an explicit file, used as it is."""
    if not isinstance(name, str):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"missing weights file {str(path)!r}; put the {kind} weights (.safetensors preferred) there")
        return path
    library = weights_folder(folder, kind)
    try:
        return library.resolve(name).path
    except NameOutsideFolder as exc:
        raise WeightsNameOutsideFolder(exc) from None
    except UnknownName:
        pass
    except InvalidParameter:
        if library.files():  # an ambiguous or malformed name; only an empty folder may defer to the zoo
            raise
    from aipaint.models import zoo

    card = zoo.find(name)
    if card is not None and card.family in ZOO_FAMILIES:
        path = zoo.fetch(card)
        if path.is_dir():
            candidates = sorted(weights_folder(path, kind).files(), key=lambda item: item.is_pickle)  # safetensors first
            if not candidates:
                raise ModelLoadError(f"zoo model {card.id!r} has no weights file in {path}")
            return candidates[0].path
        return path
    raise UnknownName(kind, name, library.names() or [f"(no weights in {library.root}; add .safetensors files there)"])


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
    if not isinstance(allow_pickle, bool):  # never truthiness: the string "no" is truthy
        raise InvalidParameter("allow_pickle", allow_pickle, "must be True or False")
    return _load_cached(Path(path).resolve(), Path(path).stat().st_mtime_ns if Path(path).is_file() else 0,
                        allow_pickle, device)


@lru_cache(maxsize=4)
def _load_cached(path: Path, mtime: int, allow_pickle: bool, device: str) -> LoadedImageModel:
    from aipaint.models.weights import load_state_dict

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


def pil_to_tensor(image: Any) -> Any:
    """PIL RGB → NCHW float32 torch tensor in [0, 1]."""
    import numpy as np
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(tensor: Any) -> Any:
    """NCHW (first item) or CHW float torch tensor in [0, 1] → PIL RGB."""
    import numpy as np
    from PIL import Image

    if tensor.dim() == 4:
        tensor = tensor[0]
    array = (tensor.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)
