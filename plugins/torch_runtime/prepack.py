"""oneDNN weight prepacking and a per-layer kernel choice for float32 convolutions and linear
layers on the CPU, in eager mode.

torch's eager ``Conv2d`` and ``Linear`` hand their weights to oneDNN / MKL in torch's own layout,
and the library reorders them into its blocked layout at every call. Here each layer's weight is
reordered once (``torch.ops.mkldnn._reorder_convolution_weight`` / ``_reorder_linear_weight``) and
the layer runs ``torch.ops.mkldnn._convolution_pointwise`` / ``_linear_pointwise`` on the packed
copy: kernels inductor's freezing pass emits, without compiling anything. On a full-size SD1.5
UNet at 256 px (2-core AVX2 EPYC, one thread) a call took 4.4 s instead of 6.1 s (1.38x) and a
whole 20-step image 99 s instead of 129 s, with a relative error around 1e-5
(benchmarks/results/cpu_runtimes_prepack_unet.txt, cpu_runtimes_prepack.txt). The first call
packs (about 4 s for that UNet).

Each call then takes the kernel that was fastest for its shape on that CPU
(``benchmarks/cpu_kernels.py`` times every layer shape of the SD1.5 UNet and VAE;
benchmarks/results/cpu_kernels_*.txt):

* **3x3 convolutions over at least 64x64 positions**, or 32x32 with 512+ input channels (the VAE
  decoder; the UNet's 320-channel blocks from 512 px up and its 640-channel ones at 32x32) run on
  NNPACK's Winograd kernels, one image at a time (``torch._nnpack_spatial_convolution``, the
  batch-1 inference path): 2.2-3.3x faster than oneDNN at 64x64 and above, 1.2x at those 32x32
  ones, relative error about 1e-5. Below that, and for other kernels, strides or groups, oneDNN is
  as fast or faster and keeps them.
* **Linear layers with at least 512 rows** (batch x tokens), and every linear layer when torch
  runs on one thread, run through the layer's own forward (MKL's sgemm on torch's x86 builds),
  which beat oneDNN's packed kernel by 4-40% there; fewer rows on several threads keep oneDNN's.

What it costs: a second copy of every packed weight (about the UNet's size again in memory).

What keeps it correct:

* The packed copy is rebuilt when the weight changes: an in-place write (LoRA patches, restoring
  them) bumps the tensor's version counter, which each layer checks at every call. The NNPACK
  and MKL paths read the weight itself at every call.
* The original ``forward`` runs whenever the packed kernels would be wrong or unwelcome: autograd
  on (training), tracing or ONNX export, ``torch.compile`` tracing, other devices or dtypes,
  inputs that are not plain float32 CPU tensors, padding modes other than zeros, and weights
  created under ``torch.inference_mode`` (they have no version counter).
* ``copy.deepcopy`` and pickling drop the packed copy (it is rebuilt on the next call).
* An NNPACK call that fails (a CPU or shape it does not support) falls back to oneDNN for that
  layer from then on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

_mkldnn = torch.ops.mkldnn

#: Linear layers called with at least this many rows run MKL's sgemm (the layer's own forward).
LINEAR_MKL_MIN_ROWS = 512
#: 3x3 stride-1 convolutions whose output has at least this many positions (and both channel
#: counts at least NNPACK_MIN_CHANNELS) run on NNPACK, one image at a time; so do those with at
#: least NNPACK_WIDE_POSITIONS positions and NNPACK_WIDE_CHANNELS input channels.
NNPACK_MIN_POSITIONS = 64 * 64
NNPACK_MIN_CHANNELS = 64
NNPACK_WIDE_POSITIONS = 32 * 32
NNPACK_WIDE_CHANNELS = 512
#: False keeps every layer on oneDNN's packed kernels (the kernel choice off; for measuring it).
CHOOSE_KERNELS = True

_nnpack_ready: bool | None = None


def nnpack_available() -> bool:
    """True when torch's NNPACK works on this CPU (the check also initialises it, which its
    kernels need before their first call)."""
    global _nnpack_ready
    if _nnpack_ready is None:
        try:
            _nnpack_ready = bool(torch.backends.nnpack.is_available())
        except Exception:  # noqa: BLE001 - a build without it, or a CPU it refuses
            _nnpack_ready = False
    return _nnpack_ready


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
    nnpack_failed = False

    def wants_nnpack(self, x: torch.Tensor) -> bool:
        m = self.module
        return (CHOOSE_KERNELS and not self.nnpack_failed and m.kernel_size == (3, 3) and m.stride == (1, 1)
                and m.dilation == (1, 1) and m.groups == 1
                and min(m.in_channels, m.out_channels) >= NNPACK_MIN_CHANNELS
                and (x.shape[-1] * x.shape[-2] >= NNPACK_MIN_POSITIONS
                     or (x.shape[-1] * x.shape[-2] >= NNPACK_WIDE_POSITIONS and m.in_channels >= NNPACK_WIDE_CHANNELS))
                and nnpack_available())

    def nnpack(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.module
        try:
            outs = [torch._nnpack_spatial_convolution(x[i:i + 1].contiguous(), m.weight, m.bias, list(m.padding))
                    for i in range(x.shape[0])]
        except RuntimeError:  # not supported here: oneDNN for this layer from now on
            self.nnpack_failed = True
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if _plain_path(m, x) or x.dim() != 4:
            return self.original(x)
        if self.wants_nnpack(x) and (out := self.nnpack(x)) is not None:
            return out
        key = self._weight_key((tuple(x.shape[1:]),))
        if self.packed is None or self.key != key:
            self.packed = _mkldnn._reorder_convolution_weight(m.weight, list(m.padding), list(m.stride),
                                                              list(m.dilation), m.groups, list(x.shape))
            self.key = key
        return _mkldnn._convolution_pointwise(x, self.packed, m.bias, list(m.padding), list(m.stride),
                                              list(m.dilation), m.groups, "none", [], "")


class PackedLinear(_Packed):
    """oneDNN's packed linear kernel for calls with few rows on several threads; MKL's sgemm (the
    layer's own forward, on torch's unpacked weight) for the rest, where it was faster. (MKL's packed
    sgemm, which inductor uses for static shapes, packs for one row count, so a layer called with
    changing batch sizes would repack at every call; unpacked it was within 3% of it.)"""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if _plain_path(m, x) or x.dim() < 2:
            return self.original(x)
        if CHOOSE_KERNELS and (x.numel() // x.shape[-1] >= LINEAR_MKL_MIN_ROWS or torch.get_num_threads() == 1):
            return self.original(x)
        key = self._weight_key()
        if self.packed is None or self.key != key:
            self.packed = _mkldnn._reorder_linear_weight(m.weight, None)
            self.key = key
        flat = x.reshape(-1, x.shape[-1])
        out = _mkldnn._linear_pointwise(flat, self.packed, m.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])


class InPlaceResnet(_Packed):
    """diffusers' ``ResnetBlock2D.forward`` for inference with its element-wise steps in place: SiLU
    on the normalised activations, the time embedding and the skip connection added into the
    convolutions' fresh outputs, no division by an ``output_scale_factor`` of 1. The same values
    (``x + h`` and ``h + x`` are equal in floating point) without allocating a new image-sized tensor
    at each step, which at the VAE decoder's sizes cost more than the arithmetic (0.3 s of a 2.5 s
    256 px decode on the 2-core EPYC). Blocks it does not cover (up/down-sampling, other time
    embedding norms or activations) are not given it; hooks, autograd and training use the block's
    own forward."""

    def original(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return type(self.module).forward(self.module, *args, **kwargs)

    def __call__(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        m = self.module
        if (args or kwargs or m.training or torch.is_grad_enabled() or _hooked(m)
                or torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()):
            return self.original(input_tensor, temb, *args, **kwargs)
        silu = torch.nn.functional.silu
        h = silu(m.norm1(input_tensor), inplace=True)
        h = m.conv1(h)
        if m.time_emb_proj is not None and temb is not None:
            temb = m.time_emb_proj(temb if m.skip_time_act else silu(temb))[:, :, None, None]
        if temb is not None:  # as diffusers does: added as given when the block has no projection
            h = h.add_(temb) if torch.broadcast_shapes(h.shape, temb.shape) == h.shape else h + temb
        h = silu(m.norm2(h), inplace=True)
        h = m.conv2(m.dropout(h))
        skip = m.conv_shortcut(input_tensor) if m.conv_shortcut is not None else input_tensor
        h = h.add_(skip) if h.shape == skip.shape else skip + h
        return h if m.output_scale_factor == 1 else h.div_(m.output_scale_factor)


def _hooked(block: torch.nn.Module) -> bool:
    """True when a hook could see (and keep) an activation the in-place forward would overwrite."""
    module_py = torch.nn.modules.module
    return any(m._forward_hooks or m._forward_pre_hooks for m in block.modules()) or bool(
        getattr(module_py, "_global_forward_hooks", None) or getattr(module_py, "_global_forward_pre_hooks", None))


def _in_place_resnet(module: torch.nn.Module) -> bool:
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return (type(module) is ResnetBlock2D and module.upsample is None and module.downsample is None
            and module.time_embedding_norm == "default" and isinstance(module.nonlinearity, torch.nn.SiLU)
            # GroupNorm always returns a new tensor, which the in-place SiLU then overwrites
            and type(module.norm1) is torch.nn.GroupNorm and type(module.norm2) is torch.nn.GroupNorm
            and "forward" not in vars(module.norm1) and "forward" not in vars(module.norm2))


def _packable(module: torch.nn.Module) -> type[_Packed] | None:
    if CHOOSE_KERNELS and _in_place_resnet(module):
        return InPlaceResnet
    if type(module) is torch.nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return PackedConv2d
    if type(module) is torch.nn.Linear:
        return PackedLinear
    return None


def packed_bytes(module: torch.nn.Module) -> int:
    """About how much memory :func:`install_prepacked` adds to ``module``: one float32 copy of each
    packable layer's weight."""
    return sum(layer.weight.numel() * 4 for layer in module.modules()
               if _packable(layer) in (PackedConv2d, PackedLinear))


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
    """Give every plain ``Conv2d`` (zero padding) and ``Linear`` inside ``module`` the packed forward,
    and diffusers' ``ResnetBlock2D`` blocks the in-place one (:class:`InPlaceResnet`); returns how
    many layers and blocks got one. Layers of subclasses (peft's LoRA layers, quantised layers) and
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
