"""Where the ControlNet adapter and the runtimes meet without importing each other.

A runtime that runs ControlNets itself (the ONNX runtime, from an export) registers a
stand-in provider for a loaded model with :func:`use_runtime_controlnets`; the ControlNet
adapter asks :func:`runtime_controlnets` before loading a ControlNet in torch. The other way
round, the ControlNet adapter offers its loader with :func:`provide_controlnet_loader` when it
registers, and an exporter loads ControlNets by name with :func:`load_controlnet`, exactly as
a unit would.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aipaint.errors import UnsupportedFeature

RuntimeControlNets = Callable[[Any, "Path | None"], Any]
"""``stand_in(ref, config)``: a module to run instead of the torch ControlNet, None to load it
in torch, or an error to refuse it."""
ControlNetLoader = Callable[[Any, Any, bool], "tuple[Any, Any]"]
"""``loader(name, model, allow_pickle)`` → ``(ref, module)``: the located ControlNet and the loaded module."""

_runtime: weakref.WeakKeyDictionary[Any, RuntimeControlNets] = weakref.WeakKeyDictionary()
_loaders: list[ControlNetLoader] = []


def use_runtime_controlnets(model: Any, stand_in: RuntimeControlNets) -> None:
    """Let ``model``'s runtime run ControlNets itself: the adapter asks ``stand_in`` first."""
    _runtime[model] = stand_in


def runtime_controlnets(model: Any) -> RuntimeControlNets | None:
    """The stand-in provider a runtime registered for ``model``, if any."""
    return _runtime.get(model)


def provide_controlnet_loader(loader: ControlNetLoader) -> None:
    """Offer the ControlNet adapter's loader (registering it again replaces it)."""
    _loaders[:] = [loader]


def load_controlnet(name: str | Path, model: Any, *, allow_pickle: bool = False) -> tuple[Any, Any]:
    """``(ref, module)`` for a ControlNet named as a unit names it, through the adapter's loader."""
    if not _loaders:
        raise UnsupportedFeature(f"loading ControlNet {str(name)!r} needs the controlnet plugin, which is not loaded")
    return _loaders[0](name, model, allow_pickle)
