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


# --------------------------------------------------------------------------- transformer ControlNets
TRANSFORMER_CONTROLNETS = "transformer_controlnets"
"""The ``predict`` keyword through which ControlNets reach a transformer family (SD 3, FLUX):
a transformer ControlNet needs the very inputs the family builds inside ``predict`` (packed
tokens, position ids, pooled projections, guidance), so the family runs it there."""


class TransformerControlNetRuns:
    """ControlNets for a transformer family to run inside ``predict`` on the current inputs.

    A family that takes them offers two methods: ``controlnet_problems(controlnet)`` (a list
    of reasons the ControlNet does not fit it; empty when it does) and
    ``controlnet_condition(controlnet, images)`` (the control images, ``(N, 3, H, W)`` in
    [0, 1], as the ControlNet reads them: VAE latents, packed tokens, …), and its ``predict``
    takes ``transformer_controlnets=[runs]``, where each run is
    ``(controlnet, condition, scale, control_type)`` with one condition row per batch item.
    ``control_type`` is the index a *union* ControlNet (one network, several control types
    chosen by an input) takes, None for a ControlNet of one type. A family with union
    ControlNets offers a third method, ``controlnet_control_type(controlnet, value, label)``:
    the unit's ``union_control_type`` (None when not given) → ``(index, name)`` (the name
    recorded in the PNG parameters), or None for a ControlNet of one type; it raises
    ``InvalidParameter`` (naming ``label``) for a missing or unknown type, and for a type given
    to a ControlNet that takes none. Units of a family without it take no control type.
    The loop merges its contributors' keyword lists item by item with ``+``, so each
    contributor passes a one-item list and the runs add up.
    """

    def __init__(self, runs: tuple[tuple[Any, Any, float, int | None], ...]) -> None:
        self.runs = tuple(runs)

    def __add__(self, other: TransformerControlNetRuns) -> TransformerControlNetRuns:
        return TransformerControlNetRuns(self.runs + other.runs)


def transformer_controlnet_kwargs(controlnet: Any, condition: Any, scale: float,
                                  control_type: int | None = None) -> dict[str, Any]:
    """A loop contributor's ``unet_kwargs`` asking the family to run ``controlnet`` this step
    (with ``control_type``, a union ControlNet's control-type index)."""
    run = (controlnet, condition, float(scale), None if control_type is None else int(control_type))
    return {TRANSFORMER_CONTROLNETS: [TransformerControlNetRuns((run,))]}


def pop_transformer_controlnets(extra: dict[str, Any]) -> tuple[tuple[Any, Any, float, int | None], ...]:
    """The runs a family's ``predict`` was given (removed from ``extra``); empty if none."""
    value = extra.pop(TRANSFORMER_CONTROLNETS, None)
    if not value:
        return ()
    runs: tuple[tuple[Any, Any, float, int | None], ...] = ()
    for item in value:
        runs += item.runs
    return runs


def condition_rows(condition: Any, rows: int) -> Any:
    """A condition with one row per batch item, repeated for ``rows`` (the loop's
    ``[negative, positive, …] × batch`` layout)."""
    batch = condition.shape[0]
    return condition.repeat(rows // batch, *([1] * (condition.dim() - 1)))


def add_samples(total: list[Any] | None, samples: Any) -> list[Any] | None:
    """Sum two ControlNets' block outputs, block by block (None: no outputs)."""
    if samples is None:
        return total
    samples = list(samples)
    if total is None:
        return samples
    if len(total) != len(samples):
        raise UnsupportedFeature(
            f"two ControlNets with different block counts ({len(total)} and {len(samples)}) cannot be combined"
        )
    return [a + b for a, b in zip(total, samples, strict=True)]
