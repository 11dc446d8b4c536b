"""The default runtime: the networks run as torch modules, optionally through ``torch.compile``.

Runtime options (``aipaint.load(..., runtime_options={...})``):

* ``compile`` (bool, default False): compile the chosen components in place with
  ``nn.Module.compile``. In place matters: module names, weights and the ``model.unet``
  object stay the same, so adapters that patch weights reversibly (LoRA) keep working.
* ``compile_components``: any of ``"unet"`` (default) and ``"vae"`` (its decoder).
* ``compile_mode``: ``"default"``, ``"reduce-overhead"`` (CUDA graphs; the default on
  CUDA), ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``; inductor only.
* ``compile_backend`` (default ``"inductor"``), ``compile_fullgraph`` (default False),
  ``compile_dynamic`` (None lets torch decide; False specialises on every shape).

* ``precision``: ``auto`` (default; else ``$AIPAINT_CPU_PRECISION``), ``fp32`` or ``bf16``.
  ``auto`` runs a float32 model's UNet and VAE in bf16 on CPUs with bf16 matrix units
  (AMX, AVX512_BF16, Arm BF16) when the UNet is SD-sized, and in fp32 elsewhere; see
  :mod:`aipaint_plugins.torch_runtime.precision`. The PNG parameters say ``Precision: bf16``
  when it is used.
* ``channels_last`` (bool, default True): the bf16 UNet and VAE in channels-last memory
  format, oneDNN's preferred layout for convolutions (a bf16 UNet call 15 % faster on an
  AMX Xeon: benchmarks/results/cpu_bf16_unet.txt). fp32 models are left as they are.
* ``prepack``: ``auto`` (default), ``true`` or ``false``: run a float32 model's UNet and VAE
  convolutions and linear layers on the CPU with their weights laid out once for oneDNN instead of
  at every call (:mod:`aipaint_plugins.torch_runtime.prepack`; eager, nothing compiled; 1.2-1.4x
  per full-size SD1.5 UNet call on a 2-core AVX2 EPYC, at the cost of a second copy of those
  weights). Each call then takes the kernel that was fastest for its shape there: NNPACK's
  Winograd convolution for large 3x3 convolutions, MKL's sgemm for linear layers with many rows,
  and diffusers' ResNet blocks run their element-wise steps in place.
  ``auto`` uses it for float32 models on the CPU whose UNet is SD-sized when the free
  memory holds twice the copies, and not with ``compile``; ``model.prepack_reason`` says why.
* ``threads``: ``auto`` (default) or a number: the torch intra-op threads the model's jobs run
  with (put back afterwards). ``auto`` runs tiny models (UNet under 10 M parameters, such as the
  embedded one) on one thread, whose operations are too small to share between cores: with two
  threads available on an idle 2-core EPYC the embedded model's warm image took 0.386 s this way
  and 0.476 s on both threads (benchmarks/results/embedded_model.txt), and far longer on two when
  another process held a core. Larger models keep torch's count
  (``torch.set_num_threads`` / ``OMP_NUM_THREADS``). ``model.threads_reason`` says what was decided.
* ``offload``: ``none`` (default), ``model`` or ``sequential``: keep the weights in CPU memory
  and move each network (``model``) or each layer (``sequential``) to the GPU when it runs,
  for models larger than the GPU's memory; see :mod:`aipaint_plugins.torch_runtime.offload`.

Compilation happens lazily at the first generation and takes a minute or more for SD-sized
UNets (45-80 s at one thread on a 2-core CPU, again in every new process), and on that CPU the
compiled full-size SD1.5 UNet was slower than eager (0.74-0.85x per call,
benchmarks/results/cpu_runtimes_prepack_unet.txt): it is meant for GPUs, where it removes Python
and kernel-launch overhead. On the CPU, ``prepack`` (on by default for SD-sized models) is
the faster route.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.errors import InvalidParameter
from aipaint.plugin.runtimes import RuntimeSpec

if TYPE_CHECKING:
    import torch

    from aipaint.models.latent import LatentDiffusionModel

OPTIONS = ("compile", "compile_components", "compile_mode", "compile_backend", "compile_fullgraph", "compile_dynamic",
           "precision", "channels_last", "offload", "prepack", "threads")
PRECISION_OPTIONS = ("precision", "channels_last", "offload", "prepack", "threads")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_COMPONENTS = ("unet", "vae")


@dataclass(frozen=True)
class CompileOptions:
    components: tuple[str, ...]
    mode: str | None
    backend: str
    fullgraph: bool
    dynamic: bool | None

    @classmethod
    def parse(cls, options: Mapping[str, Any], device_type: str) -> CompileOptions | None:
        """Validated compile settings, or ``None`` when compilation is off."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise InvalidParameter("runtime_options", unknown, f"the torch runtime accepts {', '.join(OPTIONS)}")
        options = {k: v for k, v in options.items() if k not in PRECISION_OPTIONS}
        enabled = options.get("compile", False)
        if not isinstance(enabled, bool):
            raise InvalidParameter("compile", enabled, "true or false")
        if not enabled:
            extra = sorted(k for k in options if k.startswith("compile_"))
            if extra:
                raise InvalidParameter(extra[0], options[extra[0]], "only meaningful with compile=True")
            return None
        components = options.get("compile_components", ("unet",))
        if isinstance(components, str):
            components = [c.strip() for c in components.split(",") if c.strip()]
        if not components or any(c not in COMPILE_COMPONENTS for c in components):
            raise InvalidParameter("compile_components", components, f"one or more of {', '.join(COMPILE_COMPONENTS)}")
        backend = options.get("compile_backend", "inductor")
        if not isinstance(backend, str) or not backend:
            raise InvalidParameter("compile_backend", backend, "a torch.compile backend name, e.g. 'inductor'")
        default_mode = "reduce-overhead" if device_type == "cuda" else "default"
        mode = options.get("compile_mode", default_mode if backend == "inductor" else None)
        if mode is not None and mode not in COMPILE_MODES:
            raise InvalidParameter("compile_mode", mode, f"one of {', '.join(COMPILE_MODES)}")
        if mode is not None and backend != "inductor":
            raise InvalidParameter("compile_mode", mode, "modes are inductor settings; leave it out for other backends")
        fullgraph = options.get("compile_fullgraph", False)
        if not isinstance(fullgraph, bool):
            raise InvalidParameter("compile_fullgraph", fullgraph, "true or false")
        dynamic = options.get("compile_dynamic")
        if dynamic is not None and not isinstance(dynamic, bool):
            raise InvalidParameter("compile_dynamic", dynamic, "true, false or null (let torch decide)")
        return cls(tuple(dict.fromkeys(components)), mode, backend, fullgraph, dynamic)

    def apply(self, module: torch.nn.Module) -> None:
        kwargs: dict[str, Any] = {"backend": self.backend, "fullgraph": self.fullgraph, "dynamic": self.dynamic}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        module.compile(**kwargs)


def is_compiled(module: Any) -> bool:
    """True when ``module`` was compiled in place (``nn.Module.compile``)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def prepare_torch(model: LatentDiffusionModel, options: dict[str, Any]) -> None:
    import torch
    from aipaint_plugins.torch_runtime.offload import install_offload, parse_offload
    from aipaint_plugins.torch_runtime.precision import apply_bf16, choose_precision, parse_precision

    settings = CompileOptions.parse(options, torch.device(model.device).type)
    requested = parse_precision(options)
    channels_last = options.get("channels_last", True)
    if not isinstance(channels_last, bool):
        raise InvalidParameter("channels_last", channels_last, "true or false")
    offload = parse_offload(options)
    for module in model.modules().values():
        module.eval()
    if offload != "none" and torch.device(model.device).type in ("cpu", "meta"):
        raise InvalidParameter("offload", offload, "offloading moves the weights to a GPU when they run; "
                               f"the model computes on {model.device}")
    if offload != "none" and settings is not None:
        raise InvalidParameter("compile", True, f"compiling and offload={offload} do not go together: the offload "
                               "hooks move weights inside the compiled call; choose one")
    precision, reason = choose_precision(requested, model)
    model.precision = precision  # type: ignore[attr-defined]
    model.precision_reason = reason  # type: ignore[attr-defined]
    if precision == "bf16" and model.dtype == torch.float32:
        apply_bf16(model, channels_last=channels_last)
    if precision == "bf16":
        model.runtime_infotext = {"Precision": "bf16"}  # type: ignore[attr-defined]
    if offload != "none":
        install_offload(model.modules(), offload, torch.device(model.device))
        model.offload = offload  # type: ignore[attr-defined]
    model.prepacked = apply_prepack(model, options.get("prepack", "auto"), precision,  # type: ignore[attr-defined]
                                    compiling=settings is not None)
    apply_threads(model, options.get("threads", "auto"))
    if settings is None:
        return
    if not hasattr(model, "unet"):
        raise InvalidParameter("compile", True, f"compiles a latent model's UNet and VAE; {model.family} model "
                               f"{model.name!r} has neither")
    targets = {"unet": model.unet, "vae": model.vae.decoder}
    for name in settings.components:
        settings.apply(targets[name])


PREPACK_COMPONENTS = ("unet", "transformer", "vae")
TINY_UNET_PARAMETERS = 10_000_000


def apply_threads(model: Any, value: Any) -> None:
    """Set ``model.intra_op_threads`` (the count its jobs run with, ``None``: torch's own) and
    ``model.threads_reason`` from the ``threads`` option."""
    import torch
    from aipaint_plugins.torch_runtime.precision import unet_parameters

    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value == "auto":
        device = torch.device(getattr(model, "device", "cpu")).type
        size = unet_parameters(model)
        if device == "cpu" and 0 < size < TINY_UNET_PARAMETERS:
            count, reason = 1, f"auto: the UNet ({size / 1e6:.1f}M parameters) is too small to share between cores"
        else:
            count, reason = None, "auto: torch's thread count" + ("" if device == "cpu" else f" (the model computes on {device})")
    elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        count, reason = value, "requested"
    else:
        raise InvalidParameter("threads", value, "auto or a whole number of threads, 1 or more")
    model.intra_op_threads = count
    model.threads_reason = reason


def apply_prepack(model: Any, value: Any, precision: str, *, compiling: bool) -> int:
    """Install :mod:`~aipaint_plugins.torch_runtime.prepack` on the model's denoiser and VAE as the
    ``prepack`` option asks; returns how many layers got it (0: not used) and says why in
    ``model.prepack_reason``."""
    import torch
    from aipaint_plugins.torch_runtime import prepack
    from aipaint_plugins.torch_runtime.precision import AUTO_MIN_UNET_PARAMETERS, unet_parameters

    if value not in ("auto", True, False):
        raise InvalidParameter("prepack", value, "auto, true or false")
    device = torch.device(getattr(model, "device", "cpu")).type
    dtype = getattr(model, "dtype", torch.float32)
    reason = None
    if value is False:
        reason = "turned off (prepack=false)"
    elif device != "cpu":
        reason = f"the model computes on {device}; prepacking lays weights out for the CPU's oneDNN kernels"
    elif precision != "fp32" or dtype != torch.float32:
        reason = f"the model runs in {precision}; prepacking is for float32 weights"
    elif compiling:
        reason = "compile is on: the compiled graph has its own kernels"
    elif getattr(model, "offload", "none") != "none":
        reason = "the weights are offloaded"
    elif not prepack.available():
        reason = "this torch build has no oneDNN CPU kernels"
    if reason is not None and value is True:
        raise InvalidParameter("prepack", True, reason)
    if reason is None and value == "auto" and (size := unet_parameters(model)) < AUTO_MIN_UNET_PARAMETERS:
        reason = f"auto: the UNet ({size / 1e6:.1f}M parameters) is not SD-sized"  # measured there only
    modules = [] if reason else [m for name, m in model.modules().items() if name in PREPACK_COMPONENTS]
    if reason is None and value == "auto":
        needed, free = sum(prepack.packed_bytes(m) for m in modules), prepack.available_memory()
        if free is None or free < 2 * needed:  # the copies, with room left for the activations
            reason = (f"auto: the packed weights would take {needed / 1e9:.1f} GB more and "
                      + ("the free memory is not known" if free is None else f"only {free / 1e9:.1f} GB is free"))
    model.prepack_reason = reason or ("requested" if value is True else "auto: float32 on the CPU")  # type: ignore[attr-defined]
    return 0 if reason else sum(prepack.install_prepacked(module) for module in modules)


@hookimpl
def register_runtimes(register: Callable[[RuntimeSpec], None]) -> None:
    from aipaint_plugins.torch_runtime.offload import weights_device

    register(RuntimeSpec(name="torch", prepare=prepare_torch, weights_device=weights_device,
                         description="PyTorch eager (default); compile=True for torch.compile; offload=model|sequential"))
