"""Reading weight files safely: safetensors first, pickles only on request and only through
``torch.load(weights_only=True)``, with one-line errors that name the file."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from aipaint.errors import InvalidParameter, ModelLoadError, UnsafeFileError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def load_state_dict(path: Path | str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Read a weights file. safetensors always; pickles only when ``allow_pickle`` and
    then only through ``torch.load(weights_only=True)``, which refuses arbitrary objects."""
    check_pickle_opt_in(allow_pickle)
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"no such weights file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from exc
    if not allow_pickle:
        raise pickle_refused(path)
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns in several lines about old pickle protocols; whether the load works is what counts
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            try:  # memory-map zip-format checkpoints so identifying a 4 GB file costs no RAM
                data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise pickle_load_error(path.name, exc) from exc
    if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not contain a state dict")
    return data


def check_pickle_opt_in(allow_pickle: Any) -> None:
    """``allow_pickle`` must be a bool: the string ``"no"`` is truthy and must never mean yes."""
    if not isinstance(allow_pickle, bool):
        raise InvalidParameter("allow_pickle", allow_pickle, "must be True or False")


def pickle_refused(path: Path | str) -> UnsafeFileError:
    """The error for a pickle-based weights file met without the user's opt-in (``--allow-pickle``)."""
    path = Path(path)
    return UnsafeFileError(
        f"refusing to load {path.name}: {path.suffix or 'pickle'} files are Python pickles, which can run code when "
        "loaded; convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it"
    )


def pickle_load_error(what: str, exc: BaseException) -> ModelLoadError:
    """One line for a pickle that ``torch.load(weights_only=True)`` could not load. torch's own
    message runs to several lines and advises ``weights_only=False``, which would run the file's code."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        uses = f" ({found[1]})" if found else ""
        return UnsafeFileError(
            f"refusing to load {what}: it holds Python objects other than tensors{uses}, which "
            "torch.load(weights_only=True) refuses; convert it to .safetensors with a tool you trust"
        )
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return ModelLoadError(f"could not load {what}: {first}")
