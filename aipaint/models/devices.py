"""Where a network computes, which is not always where its weights are.

A runtime may keep weights in CPU memory and move them to the GPU only while a network runs
(the torch runtime's ``offload`` option, through accelerate's hooks); with layer-by-layer
offloading the modules hold no weights at all between calls (their parameters are on the
``meta`` device). Code that builds a network's inputs asks :func:`execution_device`, not
the parameters."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: the one an offload hook names, else its weights'."""
    import torch

    for part in module.modules():
        device = getattr(getattr(part, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    device = getattr(module, "device", None)
    if device is None:
        device = next(module.parameters()).device
    return torch.device(device)
