"""CPU offloading for the torch runtime: models larger than the GPU's memory.

``offload`` (runtime option):

* ``none`` (default): every network lives on the model's device.
* ``model``: the weights stay in CPU memory and each network (text encoders, UNet or
  transformer, VAE, …) is moved to the GPU whole when it is called, after the one that
  ran before it has been moved back. The GPU holds one network at a time; every step
  runs at full speed, and each job pays one transfer per network. diffusers calls this
  ``enable_model_cpu_offload``.
* ``sequential``: the weights stay in CPU memory and are streamed to the GPU layer by
  layer at every call (accelerate's ``cpu_offload``, diffusers'
  ``enable_sequential_cpu_offload``). The least GPU memory (about the largest layer plus
  activations) and much slower, since every step moves all the weights again. Weight
  patches (LoRA) are refused with this mode: the modules hold no weights between calls.

Both need an accelerator: on a CPU-only device there is nothing to offload to, and the
option is refused. The families load the weights on the CPU (``weights_device``), so a
model never has to fit on the GPU whole, not even while loading.

The hooks are accelerate's (``add_hook_to_module``); diffusers' VAEs route ``encode`` and
``decode`` through them (``apply_forward_hook``), so the VAE is moved for those calls too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

MODES = ("none", "model", "sequential")


def parse_offload(options: dict[str, Any]) -> str:
    mode = options.get("offload", "none")
    if mode is None or mode is False:
        return "none"
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise InvalidParameter("offload", mode, f"one of {', '.join(MODES)}")
    return mode.lower()


def weights_device(device: str, options: dict[str, Any]) -> str:
    """Where the family loads the weights: the CPU when offloading, else ``device``."""
    import torch

    mode = parse_offload(options)
    if mode == "none":
        return device
    if options.get("compile"):
        raise InvalidParameter("compile", options["compile"], f"compiling and offload={mode} do not go together: the "
                               "offload hooks move weights inside the compiled call; choose one")
    if torch.device(device).type in ("cpu", "meta"):
        raise InvalidParameter("offload", options.get("offload"),
                               f"offloading keeps the weights in CPU memory and moves them to a GPU when they run; "
                               f"the device is {device!r}, so there is nowhere to move them (leave offload out)")
    return "cpu"


class Resident:
    """Which network is on the execution device now (``model`` offloading keeps one there)."""

    def __init__(self) -> None:
        self.module: torch.nn.Module | None = None


def model_offload_hook(execution_device: torch.device, resident: Resident, storage: str = "cpu") -> Any:
    """An accelerate hook that brings its module to ``execution_device`` for a call, after
    sending the network that ran before it back to ``storage``."""
    from accelerate.hooks import ModelHook
    from accelerate.utils import send_to_device

    class ModelOffloadHook(ModelHook):
        execution_device = None  # set below: aipaint.models.devices.execution_device reads it

        def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if resident.module is not module:
                if resident.module is not None:
                    resident.module.to(storage)
                module.to(execution_device)
                resident.module = module
            return send_to_device(args, execution_device), send_to_device(kwargs, execution_device)

    hook = ModelOffloadHook()
    hook.execution_device = execution_device
    return hook


def install_offload(modules: dict[str, torch.nn.Module], mode: str, execution_device: torch.device) -> Resident | None:
    """Hook ``modules`` (a model's networks, on the CPU) for ``mode`` offloading to ``execution_device``.

    Returns the :class:`Resident` tracker for ``model`` offloading (``None`` otherwise)."""
    from accelerate import cpu_offload
    from accelerate.hooks import add_hook_to_module

    if mode == "none":
        return None
    if mode == "sequential":
        for module in modules.values():
            cpu_offload(module, execution_device=execution_device, offload_buffers=len(module._parameters) > 0)
        return None
    resident = Resident()
    for module in modules.values():
        add_hook_to_module(module, model_offload_hook(execution_device, resident))
    return resident
