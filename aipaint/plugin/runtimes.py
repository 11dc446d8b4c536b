"""Runtimes: what executes the UNet, the VAE and the text encoder.

A runtime's ``prepare(model, options)`` swaps the callables a
:class:`aipaint.models.latent.LatentDiffusionModel` exposes (``unet_call``, ``vae_decode_call``,
``vae_encode_call``) for its own, so the denoise loop never knows what runs beneath it.
``unavailable()`` returns ``None`` when the runtime can run here, or a sentence saying
what is missing (e.g. "the tensorrt package is not installed").

``weights_device(device, options)``, when given, says where the family should load the
weights for a model that computes on ``device``: a runtime that offloads weights to the CPU
(the torch runtime's ``offload`` option) answers ``"cpu"``, so a model larger than the GPU's
memory never has to fit on it whole. The model's ``device`` is then set to ``device`` after
loading, and ``prepare`` moves each network there when it runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aipaint.models.latent import LatentDiffusionModel


def _always_available() -> str | None:
    return None


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    prepare: Callable[[LatentDiffusionModel, dict[str, Any]], None]
    unavailable: Callable[[], str | None] = _always_available
    aliases: tuple[str, ...] = ()
    description: str = ""
    weights_device: Callable[[str, dict[str, Any]], str] | None = None
