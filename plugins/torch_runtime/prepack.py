"""oneDNN weight prepacking for float32 convolutions and linear layers on the CPU, in eager mode.

torch's eager ``Conv2d`` and ``Linear`` hand their weights to oneDNN / MKL in torch's own layout,
and the library reorders them into its blocked layout at every call. Here each layer's weight is
reordered once (``torch.ops.mkldnn._reorder_convolution_weight`` / ``_reorder_linear_weight``) and
the layer runs ``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise`` on the packed
copy: kernels inductor's freezing pass emits, without compiling anything. On a full-size SD1.5
UNet at 256 px (2-core AVX2 EPYC, one thread) a call took 4.4 s instead of 6.1 s (1.38x) and a
whole 20-step image 99 s instead of 129 s, with a relative error around 1e-5
(benchmarks/results/cpu_runtimes_prepack_unet.txt, cpu_runtimes_prepack.txt). The first call
packs (about 4 s for that UNet).

What it costs: a second copy of every packed weight (about the UNet's size again in memory).

What keeps it correct:

* The packed copy is rebuilt when the weight changes: an in-place write (LoRA patches, restoring
  them) bumps the tensor's version counter, which each layer checks at every call.
* The original ``forward`` runs whenever the packed kernels would be wrong or unwelcome: autograd
  on (training), tracing or ONNX export, ``torch.compile`` tracing, other devices or dtypes,
  inputs that are not plain float32 CPU tensors, padding modes other than zeros, and weights
  created under ``torch.inference_mode`` (they have no version counter).
* ``copy.deepcopy`` and pickling drop the packed copy (it is rebuilt on the next call).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

_mkldnn = torch.ops.mkldnn


def available() -> bool:
    """True when this torch build has the oneDNN CPU kernels the packed path calls."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(_mkldnn, "_convolution_pointwise") \
        and hasattr(_mkldnn, "_reorder_linear_weight")


def _plain_path(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """True when the call must go through the layer's own forward."""
    weight = module.weight
    return (
        (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        or torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or x.device.type != "cpu" or weight.device.type != "cpu"
        or x.dtype != torch.float32 or weight.dtype != torch.float32
        or type(x) is not torch.Tensor or x.is_mkldnn
        or weight.is_inference()  # made under inference_mode: no version counter to see writes by
    )


class _Packed:
    """The forward installed on one layer: the packed kernel, or the layer's own forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.packed: torch.Tensor | None = None
        self.key: tuple[Any, ...] | None = None

    def original(self, x: torch.Tensor) -> torch.Tensor:
        return type(self.module).forward(self.module, x)

    def _weight_key(self, extra: tuple[Any, ...] = ()) -> tuple[Any, ...]:
        weight = self.module.weight
        return (id(weight), weight._version, weight.data_ptr(), *extra)

    def __deepcopy__(self, memo: dict[int, Any]) -> _Packed:
        return type(self)(copy.deepcopy(self.module, memo))

    def __getstate__(self) -> dict[str, Any]:
        return {"module": self.module, "packed": None, "key": None}


class PackedConv2d(_Packed):
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if _plain_path(m, x) or x.dim() != 4:
            return self.original(x)
        key = self._weight_key((tuple(x.shape[1:]),))
        if self.packed is None or self.key != key:
            self.packed = _mkldnn._reorder_convolution_weight(m.weight, list(m.padding), list(m.stride),
                                                              list(m.dilation), m.groups, list(x.shape))
            self.key = key
        return _mkldnn._convolution_pointwise(x, self.packed, m.bias, list(m.padding), list(m.stride),
                                              list(m.dilation), m.groups, "none", [], "")


class PackedLinear(_Packed):
    """oneDNN's packed linear kernel, for any row count. (MKL's packed sgemm, which inductor uses for
    static shapes, was 3% faster per SD1.5 UNet call here, but it packs for one row count, so a layer
    called with changing batch sizes would repack at every call.)"""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if _plain_path(m, x) or x.dim() < 2:
            return self.original(x)
        key = self._weight_key()
        if self.packed is None or self.key != key:
            self.packed = _mkldnn._reorder_linear_weight(m.weight, None)
            self.key = key
        flat = x.reshape(-1, x.shape[-1])
        out = _mkldnn._linear_pointwise(flat, self.packed, m.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])


def _packable(module: torch.nn.Module) -> type[_Packed] | None:
    if type(module) is torch.nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return PackedConv2d
    if type(module) is torch.nn.Linear:
        return PackedLinear
    return None


def packed_bytes(module: torch.nn.Module) -> int:
    """About how much memory :func:`install_prepacked` adds to ``module``: one float32 copy of each
    packable layer's weight."""
    return sum(layer.weight.numel() * 4 for layer in module.modules() if _packable(layer) is not None)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The memory the kernel says new allocations can take without swapping (``MemAvailable``), in
    bytes, or ``None`` where that is not known (no ``/proc/meminfo``)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def install_prepacked(module: torch.nn.Module) -> int:
    """Give every plain ``Conv2d`` (zero padding) and ``Linear`` inside ``module`` the packed forward;
    returns how many layers got it. Layers of subclasses (peft's LoRA layers, quantised layers) and
    layers that already have a forward of their own are left alone."""
    count = 0
    for layer in module.modules():
        packer = _packable(layer)
        if packer is None or "forward" in vars(layer):
            continue
        layer.forward = packer(layer)
        count += 1
    return count


def is_prepacked(layer: torch.nn.Module) -> bool:
    """True when ``layer`` runs through :func:`install_prepacked`'s forward."""
    return isinstance(vars(layer).get("forward"), _Packed)


def remove_prepacked(module: torch.nn.Module) -> None:
    """Undo :func:`install_prepacked` (the layers' own forward again, the packed copies freed)."""
    for layer in module.modules():
        if is_prepacked(layer):
            del layer.forward
