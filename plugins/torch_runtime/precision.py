"""bf16 on the CPU for the torch runtime: which CPUs get it, and how a model is switched to it.

CPUs with bf16 matrix units — Intel's AMX (Sapphire Rapids and later) and AVX512_BF16
(Cooper Lake, AMD Zen 4 and later), Arm cores with FEAT_BF16 — multiply bf16 matrices
several times faster than fp32 ones. On CPUs without them (AVX2-only x86, older AVX-512)
torch emulates bf16 and is slower than fp32, so ``auto`` keeps fp32 there.

What changes in bf16: the UNet's and the VAE's weights are stored in bf16 and their
inputs are cast to bf16 at the call; their outputs are cast back to float32, so the
sampler, the latents and everything between the calls stay float32. The text encoder
runs once per prompt and its output feeds every step, so it stays float32. Weight patches
(LoRA) work unchanged: :class:`aipaint.plugin.kit.patches.PatchSet` adds its deltas in
float32 and writes them in the parameter's own dtype, and restores the originals exactly.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter

if TYPE_CHECKING:
    import torch

    from aipaint.models.latent import LatentDiffusionModel

PRECISIONS = ("auto", "fp32", "bf16")
ENVIRONMENT = "AIPAINT_CPU_PRECISION"
# ``auto`` switches a UNet to bf16 only from this size on: below it the work is too small for
# the matrix units to pay for the casts (the embedded model and test models stay fp32).
AUTO_MIN_UNET_PARAMETERS = 50_000_000
BF16_COMPONENTS = ("unet", "vae")
X86_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers for bf16, read once from ``/proc/cpuinfo`` (Linux) and torch."""

    flags: frozenset[str]
    machine: str
    torch_capability: str

    @classmethod
    def detect(cls, cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuFeatures:
        flags: set[str] = set()
        try:
            for line in cpuinfo.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):  # x86 says flags, Arm says Features
                    flags.update(value.split())
                    break
        except OSError:
            pass
        capability = ""
        try:
            import torch

            capability = str(torch.backends.cpu.get_cpu_capability())
        except (ImportError, AttributeError):
            pass
        return cls(frozenset(flags), platform.machine().lower(), capability)

    @property
    def bf16_units(self) -> tuple[str, ...]:
        """The bf16 matrix features present (empty: bf16 would be emulated, slower than fp32)."""
        if self.machine in ("aarch64", "arm64"):
            return ("bf16",) if "bf16" in self.flags else ()
        return tuple(flag for flag in X86_BF16_FLAGS if flag in self.flags)

    def describe(self) -> str:
        units = ", ".join(self.bf16_units) or "no bf16 units"
        return f"{self.machine} ({units}; torch capability {self.torch_capability or 'unknown'})"


_detected: CpuFeatures | None = None


def cpu_features() -> CpuFeatures:
    """The machine's :class:`CpuFeatures`, detected once per process."""
    global _detected
    if _detected is None:
        _detected = CpuFeatures.detect()
    return _detected


def parse_precision(options: Mapping[str, Any]) -> str:
    """The requested precision: the runtime option, else ``$AIPAINT_CPU_PRECISION``, else ``auto``."""
    value = options.get("precision")
    source = "precision"
    if value is None:
        value, source = os.environ.get(ENVIRONMENT) or "auto", ENVIRONMENT
    text = str(value).strip().lower()
    aliases = {"float32": "fp32", "bfloat16": "bf16"}
    text = aliases.get(text, text)
    if text not in PRECISIONS:
        raise InvalidParameter(source, value, f"one of {', '.join(PRECISIONS)}")
    return text


def unet_parameters(model: Any) -> int:
    unet = getattr(model, "unet", None)
    return sum(p.numel() for p in unet.parameters()) if unet is not None and hasattr(unet, "parameters") else 0


def choose_precision(requested: str, model: Any, features: CpuFeatures | None = None) -> tuple[str, str]:
    """The precision a model runs in, and why (one line, for logs and docs).

    ``fp32`` and ``bf16`` are obeyed (``bf16`` needs a latent model's UNet). ``auto`` keeps
    a model that was loaded in half precision or onto a GPU as it is, and picks bf16 for a
    float32 model on the CPU when the CPU has bf16 matrix units and the UNet is large
    enough for them to pay off; otherwise fp32.
    """
    import torch

    # A family's own model (one that brings its own loop) need not say its dtype or device.
    dtype = getattr(model, "dtype", torch.float32)
    device = torch.device(getattr(model, "device", "cpu"))
    loaded = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    latent = hasattr(model, "unet") and hasattr(model, "unet_call") and hasattr(model, "vae")
    if requested == "bf16":
        if not latent:
            raise InvalidParameter("precision", "bf16", f"bf16 applies to a latent model's UNet and VAE; {model.family} "
                                   f"model {model.name!r} has no UNet; use auto or fp32")
        if dtype == torch.float16:
            raise InvalidParameter("precision", "bf16", "the model was loaded in float16: load it with dtype "
                                   "float32 (or bfloat16) to run it in bf16")
        return "bf16", "requested"
    if requested == "fp32":
        if dtype != torch.float32:
            raise InvalidParameter("precision", "fp32", f"the model was loaded as {loaded}: load it with dtype "
                                   "float32 to run it in fp32")
        return "fp32", "requested"
    if loaded != "fp32":
        return loaded, "the dtype the model was loaded with"
    if device.type != "cpu":
        return "fp32", f"auto keeps fp32 on {device.type} (pass dtype to change it there)"
    if not latent:
        return "fp32", "auto: bf16 applies to latent models only"
    features = features or cpu_features()
    if not features.bf16_units:
        return "fp32", f"auto: this CPU has no bf16 units ({features.describe()}), bf16 would be slower"
    size = unet_parameters(model)
    if size < AUTO_MIN_UNET_PARAMETERS:
        return "fp32", f"auto: the UNet ({size / 1e6:.1f}M parameters) is too small for bf16 to pay off"
    return "bf16", f"auto: {features.describe()}"


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating-point tensors in ``value`` (nested in tuples, lists and dicts) cast to ``dtype``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


# Kept in float32: the timestep (999 is 1000 in bf16; diffusers embeds it in float32 and casts the
# embedding itself) and SDXL's added conditioning (diffusers casts its embedding to the UNet's dtype).
UNET_KEEP_FLOAT32 = frozenset({"added_cond_kwargs", "timestep_cond", "class_labels"})


def bf16_unet_call(call: Callable[..., Any]) -> Callable[..., Any]:
    """A ``unet_call`` (latents, t, embeds, **kwargs) taking and returning float32, computing in bf16.

    Latents, text embeddings and ControlNet residuals are cast; the timestep and the
    added conditioning are not (see :data:`UNET_KEEP_FLOAT32`).
    """
    import torch

    def unet_call(latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        cast = {k: v if k in UNET_KEEP_FLOAT32 else _cast(v, torch.bfloat16) for k, v in kwargs.items()}
        out = call(latents.to(torch.bfloat16), t, embeds.to(torch.bfloat16), **cast)
        return out.float() if out.dtype == torch.bfloat16 else out

    unet_call.__wrapped__ = call  # type: ignore[attr-defined]
    return unet_call


def apply_bf16(model: LatentDiffusionModel, components: Iterable[str] = BF16_COMPONENTS,
               channels_last: bool = False) -> None:
    """Store the chosen components' weights in bf16 and wrap their calls (see the module's docstring).

    The model keeps ``dtype`` float32: latents, conditioning and the sampler's arithmetic
    stay float32, and only the wrapped calls compute in bf16.
    """
    import torch

    chosen = tuple(components)
    memory = {"memory_format": torch.channels_last} if channels_last else {}
    if "unet" in chosen:
        model.unet.to(torch.bfloat16, **memory)
        model.unet_call = bf16_unet_call(model.unet_call)
    if "vae" in chosen:
        vae = model.vae
        vae.to(torch.bfloat16, **memory)

        def vae_decode(latents: torch.Tensor) -> torch.Tensor:
            return vae.decode(latents.to(torch.bfloat16), return_dict=False)[0].float()

        def vae_encode(images: torch.Tensor) -> torch.Tensor:
            return vae.encode(images.to(torch.bfloat16), return_dict=False)[0].mode().float()

        model.vae_decode_call = vae_decode
        model.vae_encode_call = vae_encode
