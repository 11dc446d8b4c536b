"""The default runtime: the networks run as torch modules (optionally through torch.compile)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.runtimes import RuntimeSpec

if TYPE_CHECKING:
    from aipaint.model import LatentDiffusionModel


def prepare_torch(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    for module in model.modules().values():
        module.eval()
    if options.get("compile"):
        import torch

        model.unet = torch.compile(model.unet, mode=options.get("compile_mode", "reduce-overhead"))


@hookimpl
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    register(RuntimeSpec(name="torch", prepare=prepare_torch, description="PyTorch eager (default); compile=True for torch.compile"))
