"""Modern guidance methods: APG, CFG-Zero*, dynamic thresholding and PAG (opt-in, per generation).

Each method is an option group; giving the group turns it on::

    pipe.txt2img("…", cfg_scale=12, options={"apg": {"eta": 0.0, "norm_threshold": 15}})
    pipe.txt2img("…", options={"cfg_zero_star": {"zero_init_steps": 1}})
    pipe.txt2img("…", cfg_scale=15, options={"dynamic_thresholding": {"mimic_scale": 7}})

and on the CLI ``--option apg.eta=0`` (``--option apg.enabled=true`` for the defaults).

* **APG** (Sadat et al. 2024, "Eliminating Oversaturation and Artifacts of High Guidance
  Scales in Diffusion Models"): the guidance difference ``cond - uncond`` is split into its
  parts parallel and orthogonal to the conditional prediction, the parallel part is scaled by
  ``eta``; optionally its norm is capped at ``norm_threshold`` and a running average with
  ``momentum`` replaces it. As diffusers' ``AdaptiveProjectedGuidance``, it works on the model
  output (epsilon or v), per image over channels and pixels. ``eta=1`` with no threshold and no
  momentum is plain CFG.
* **CFG-Zero*** (Fan et al. 2025): the unconditional prediction is scaled by the per-image
  ``s* = <cond, uncond> / ||uncond||²`` before guidance; the first ``zero_init_steps`` steps'
  prediction is zeroed (designed for flow-matching models; 0 by default here), as diffusers'
  ``ClassifierFreeZeroStarGuidance``.
* **Dynamic thresholding** as the sd-dynamic-thresholding extension's "mimic CFG" (constant
  schedules, mean centring): on the clean-latent estimate, the guided result is centred per image
  and channel, clamped at its ``percentile`` of absolute values and rescaled to the spread that
  ``mimic_scale`` would give, so a high CFG scale keeps a lower one's range.

* **PAG** (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
  Guidance"): the step's denoiser call carries one more copy of the positive rows, whose
  self-attention in the chosen ``layers`` is the identity (in SD 3's joint attention: among the
  image tokens); the output moves by ``scale * (positive - perturbed)``, as diffusers' PAG
  pipelines. The default layers are the model's: ``mid`` for a UNet, ``blocks.1`` for SD 3 (a
  family declares them as its model's ``pag_default_layers``); other denoisers (FLUX) are
  refused. Works with CFG on or off (CFG scale 1), through the loop's ``perturbed_pass`` seam;
  torch runtime only. Recorded as Forge's ``PerturbedAttentionGuidance_scale``.

They compose: CFG-Zero* scales the unconditional prediction, APG (when on) combines, dynamic
thresholding then clamps the combined result. With ``AND``-ed sub-prompts the weighted positive
``negative + sum(w * (p - negative))`` is the conditional prediction. Recorded in the PNG as
``APG eta``, ``CFG-Zero star zero-init steps``, ``Dynamic thresholding mimic scale`` …, and read
back by ``--from-png``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import InvalidParameter, UnsupportedFeature
from aipaint.plugin.adapters import AdapterActivation, AdapterSpec

if TYPE_CHECKING:
    import argparse

    from aipaint.plugin.adapters import AdapterContext


def _check(name: str, value: float, ok: bool, expected: str) -> None:
    if not ok:
        raise InvalidParameter(name, value, expected)


@dataclass(frozen=True)
class APGOptions(OptionGroup):
    """Adaptive projected guidance; the defaults are the paper's eta with no threshold or momentum."""

    namespace: ClassVar[str] = "apg"
    description: ClassVar[str] = "adaptive projected guidance (Sadat et al. 2024)"
    enabled: bool = True
    eta: float = 0.0
    norm_threshold: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _check("apg.eta", self.eta, 0.0 <= self.eta <= 1.0, "must be from 0 (no parallel part) to 1 (plain CFG)")
        _check("apg.norm_threshold", self.norm_threshold, 0.0 <= self.norm_threshold <= 1e6,
               "must be 0 (off) or a positive norm cap")
        _check("apg.momentum", self.momentum, -1.0 < self.momentum < 1.0, "must be between -1 and 1 (0: off)")


@dataclass(frozen=True)
class CFGZeroStarOptions(OptionGroup):
    """CFG-Zero*: the optimised scale on the unconditional prediction, and zero-init steps."""

    namespace: ClassVar[str] = "cfg_zero_star"
    description: ClassVar[str] = "CFG-Zero* optimised scale and zero-init (Fan et al. 2025)"
    enabled: bool = True
    zero_init_steps: int = 0

    def __post_init__(self) -> None:
        _check("cfg_zero_star.zero_init_steps", self.zero_init_steps, 0 <= self.zero_init_steps <= 1000,
               "must be a whole number of steps from 0 to 1000")


@dataclass(frozen=True)
class DynamicThresholdingOptions(OptionGroup):
    """Dynamic thresholding, "mimic CFG" (the sd-dynamic-thresholding extension's defaults)."""

    namespace: ClassVar[str] = "dynamic_thresholding"
    description: ClassVar[str] = "dynamic thresholding of the clean-latent estimate (mimic CFG scale)"
    enabled: bool = True
    mimic_scale: float = 7.0
    percentile: float = 1.0

    def __post_init__(self) -> None:
        _check("dynamic_thresholding.mimic_scale", self.mimic_scale, 1.0 <= self.mimic_scale <= 100.0,
               "must be a CFG scale from 1 to 100")
        _check("dynamic_thresholding.percentile", self.percentile, 0.0 < self.percentile <= 1.0,
               "must be a fraction above 0 and at most 1 (e.g. 0.995)")


@dataclass(frozen=True)
class PAGOptions(OptionGroup):
    """Perturbed-attention guidance; the defaults are the paper's scale 3 on the model's default
    layers (``layers=""``: the middle block of a UNet, ``blocks.1`` of SD 3's MMDiT)."""

    namespace: ClassVar[str] = "pag"
    description: ClassVar[str] = "perturbed-attention guidance (Ahn et al. 2024): identity self-attention in chosen layers"
    enabled: bool = True
    scale: float = 3.0
    layers: str = ""
    adaptive_scale: float = 0.0

    def __post_init__(self) -> None:
        _check("pag.scale", self.scale, 0.0 <= self.scale <= 100.0, "must be from 0 to 100")
        _check("pag.adaptive_scale", self.adaptive_scale, 0.0 <= self.adaptive_scale <= 1.0,
               "must be from 0 (off) to 1 (the scale drops by this much per timestep from 1000)")
        if (self.layers.strip() and not self.layer_list()) or len(self.layers) > 400:
            raise InvalidParameter("pag.layers", self.layers, "must name one or more layers of the denoiser, comma-"
                                   "separated (e.g. mid or down_blocks.2,up_blocks.0 in a UNet, blocks.1 in SD 3's "
                                   "MMDiT), at most 400 characters, or be empty for the model's default")

    def layer_list(self) -> list[str]:
        return [part.strip() for part in self.layers.split(",") if part.strip()]


GROUPS: tuple[type[OptionGroup], ...] = (APGOptions, CFGZeroStarOptions, DynamicThresholdingOptions, PAGOptions)

# (namespace, field, PNG key, type): what is recorded, and read back by --from-png.
RECORDED: tuple[tuple[str, str, str, type], ...] = (
    ("apg", "eta", "APG eta", float),
    ("apg", "norm_threshold", "APG norm threshold", float),
    ("apg", "momentum", "APG momentum", float),
    ("cfg_zero_star", "zero_init_steps", "CFG-Zero star zero-init steps", int),
    ("dynamic_thresholding", "mimic_scale", "Dynamic thresholding mimic scale", float),
    ("dynamic_thresholding", "percentile", "Dynamic thresholding percentile", float),
    # Forge's built-in PerturbedAttentionGuidance extension writes the scale under this key.
    ("pag", "scale", "PerturbedAttentionGuidance_scale", float),
    ("pag", "layers", "PAG layers", str),
    ("pag", "adaptive_scale", "PAG adaptive scale", float),
)


def active_groups(options: Mapping[str, Any]) -> dict[str, OptionGroup]:
    """The guidance groups a request's options turn on (given and ``enabled``)."""
    from aipaint.api.options import option_group

    found = {}
    for cls in GROUPS:
        if options.get(cls.namespace) is not None:
            group = option_group(options, cls)
            if getattr(group, "enabled", True):
                found[cls.namespace] = group
    return found


def wants(context: AdapterContext) -> bool:
    return bool(active_groups(context.request.options or {}))


def infotext(groups: Mapping[str, OptionGroup]) -> dict[str, str]:
    found = {key: str(getattr(groups[ns], name)) for ns, name, key, _ in RECORDED if ns in groups}
    if "pag" in groups:
        found["PerturbedAttentionGuidance_enabled"] = "True"
        if float(found["PAG adaptive scale"]) == 0.0:
            del found["PAG adaptive scale"]
    return found


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    groups = active_groups(context.request.options or {})
    zero_star = groups.get("cfg_zero_star")
    if zero_star is not None and zero_star.zero_init_steps and (context.request.guidance_rescale or 0) > 0:  # type: ignore[attr-defined]
        raise UnsupportedFeature("CFG-Zero*'s zero-init steps cannot be combined with guidance rescale "
                                 "(a zeroed prediction has no spread to rescale)")
    from aipaint_plugins.guidance.methods import GuidanceContributor, _Alphas  # torch: only when a job runs

    contributors: list[Any] = []
    dynamic = groups.get("dynamic_thresholding")
    if {"apg", "cfg_zero_star", "dynamic_thresholding"} & set(groups):
        contributors.append(GuidanceContributor(
            apg=groups.get("apg"), zero_star=groups.get("cfg_zero_star"), dynamic=dynamic,  # type: ignore[arg-type]
            alphas=_Alphas(context.model.scheduler_config) if dynamic is not None else None,
        ))
    pag = groups.get("pag")
    if pag is None:
        yield AdapterActivation(contributors=contributors, infotext=infotext(groups))
        return
    if getattr(context.model, "runtime", "torch") != "torch":
        raise UnsupportedFeature(f"perturbed-attention guidance needs the torch runtime (this model runs on "
                                 f"{context.model.runtime}): it swaps attention processors inside the denoiser")
    from dataclasses import replace

    from aipaint_plugins.guidance.pag import PAGContributor, default_layers, perturbed_layers

    fallback = default_layers(context.model)  # refuses a denoiser PAG cannot perturb, layers given or not
    if not pag.layer_list():  # type: ignore[attr-defined]
        pag = groups["pag"] = replace(pag, layers=fallback)  # type: ignore[type-var]  # recorded as run
    with perturbed_layers(context.model.unet, pag.layer_list()) as rows:  # type: ignore[attr-defined]
        contributors.append(PAGContributor(scale=pag.scale, rows=rows, adaptive_scale=pag.adaptive_scale))  # type: ignore[attr-defined]
        yield AdapterActivation(contributors=contributors, infotext=infotext(groups))


def options_from_png(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The guidance options a ``--from-png`` image recorded (``--option`` given by the user wins)."""
    found: dict[str, dict[str, Any]] = {}
    if png_params.get("PerturbedAttentionGuidance_enabled", "").strip().lower() == "false":
        png_params = {k: v for k, v in png_params.items() if not k.startswith(("PerturbedAttentionGuidance", "PAG "))}
    for namespace, name, key, _kind in RECORDED:
        if png_params.get(key):
            found.setdefault(namespace, {})[name] = png_params[key].strip()
    return found


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    for cls in GROUPS:
        register(cls)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="guidance",
            activate=activate,
            wants=wants,
            description="APG, CFG-Zero*, dynamic thresholding and PAG, through the apg / cfg_zero_star / "
                        "dynamic_thresholding / pag options",
        )
    )


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_request_options_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        add_request_options_builder(parser, options_from_png)
