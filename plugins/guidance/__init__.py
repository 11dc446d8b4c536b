"""Modern guidance methods: APG, CFG-Zero* and dynamic thresholding (opt-in, per generation).

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

They compose: CFG-Zero* scales the unconditional prediction, APG (when on) combines, dynamic
thresholding then clamps the combined result. With ``AND``-ed sub-prompts the weighted positive
``negative + sum(w * (p - negative))`` is the conditional prediction. Recorded in the PNG as
``APG eta``, ``CFG-Zero star zero-init steps``, ``Dynamic thresholding mimic scale`` …, and read
back by ``--from-png``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.engine.loop import LoopContributor
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


GROUPS: tuple[type[OptionGroup], ...] = (APGOptions, CFGZeroStarOptions, DynamicThresholdingOptions)

# (namespace, field, PNG key, type): what is recorded, and read back by --from-png.
RECORDED: tuple[tuple[str, str, str, type], ...] = (
    ("apg", "eta", "APG eta", float),
    ("apg", "norm_threshold", "APG norm threshold", float),
    ("apg", "momentum", "APG momentum", float),
    ("cfg_zero_star", "zero_init_steps", "CFG-Zero star zero-init steps", int),
    ("dynamic_thresholding", "mimic_scale", "Dynamic thresholding mimic scale", float),
    ("dynamic_thresholding", "percentile", "Dynamic thresholding percentile", float),
)


# --- the maths, on tensors ------------------------------------------------------------------
def _dims(t: torch.Tensor) -> list[int]:
    return list(range(1, t.ndim))


def zero_star_scale(cond: torch.Tensor, uncond: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """CFG-Zero*'s per-image ``s* = <cond, uncond> / ||uncond||²``, shaped to broadcast."""
    dims = _dims(cond)
    dot = (cond.float() * uncond.float()).sum(dim=dims, keepdim=True)
    return dot / ((uncond.float() ** 2).sum(dim=dims, keepdim=True) + eps)


def apg_update(diff: torch.Tensor, cond: torch.Tensor, eta: float, norm_threshold: float) -> torch.Tensor:
    """APG's update: ``diff`` capped at ``norm_threshold`` (0: off), its part parallel to
    ``cond`` scaled by ``eta`` (diffusers' ``normalized_guidance``, in double precision)."""
    dims = _dims(diff)
    if norm_threshold > 0:
        norm = diff.norm(p=2, dim=dims, keepdim=True)
        diff = diff * torch.minimum(torch.ones_like(norm), norm_threshold / norm)
    v0, v1 = diff.double(), torch.nn.functional.normalize(cond.double().flatten(1), dim=1).view_as(cond)
    parallel = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    return ((v0 - parallel) + eta * parallel).to(diff.dtype)


def mimic_threshold(target: torch.Tensor, mimic: torch.Tensor, percentile: float) -> torch.Tensor:
    """sd-dynamic-thresholding's "mimic CFG": ``target`` centred per image and channel, clamped at
    its ``percentile`` of absolute values (at least ``mimic``'s largest), rescaled to ``mimic``'s spread."""
    flat, mim = target.flatten(2), mimic.flatten(2)
    means = flat.mean(dim=2, keepdim=True)
    centred = flat - means
    mim_max = (mim - mim.mean(dim=2, keepdim=True)).abs().max(dim=2, keepdim=True).values
    if percentile >= 1.0:
        high = centred.abs().max(dim=2, keepdim=True).values
    else:
        high = torch.quantile(centred.abs().float(), percentile, dim=2, keepdim=True).to(centred.dtype)
    limit = torch.maximum(high, mim_max).clamp_min(1e-12)
    result = centred.clamp(-limit, limit) / limit * mim_max + means
    return result.view_as(target)


class _Alphas:
    """Model output ↔ clean-latent estimate at a timestep (eps, v, sample), from the scheduler config."""

    def __init__(self, scheduler_config: Mapping[str, Any]) -> None:
        from aipaint.engine.preview import X0Estimator

        self.estimator = X0Estimator(dict(scheduler_config))

    def coefficients(self, t: torch.Tensor) -> tuple[float, float]:
        one = torch.zeros(1, 1)
        # X0Estimator is affine in the output: x0 = c0 * x + c1 * out; probe it for a and s.
        a_x = float(self.estimator(one + 1, t, one))  # x=1, out=0
        a_out = float(self.estimator(one, t, one + 1)) - float(self.estimator(one, t, one))  # d x0 / d out
        return a_x, a_out

    def to_x0(self, x: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        a_x, a_out = self.coefficients(t)
        return a_x * x[:, : out.shape[1]].float() + a_out * out

    def from_x0(self, x: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        a_x, a_out = self.coefficients(t)
        if abs(a_out) < 1e-8:
            return fallback
        return (x0 - a_x * x[:, : x0.shape[1]].float()) / a_out


@dataclass
class GuidanceContributor(LoopContributor):
    """Joins the loop through :meth:`LoopContributor.guide` with the methods that are on."""

    apg: APGOptions | None
    zero_star: CFGZeroStarOptions | None
    dynamic: DynamicThresholdingOptions | None
    alphas: _Alphas | None = None

    def __post_init__(self) -> None:
        self._momentum: torch.Tensor | None = None

    def guide(
        self, step: int, total: int, *, x: torch.Tensor, t: torch.Tensor, negative: torch.Tensor,
        positives: Sequence[torch.Tensor], weights: Sequence[float], cfg_scale: float,
    ) -> torch.Tensor | None:
        zs, apg = self.zero_star, self.apg
        if zs is not None and step < zs.zero_init_steps:
            return torch.zeros_like(negative)
        # The conditional prediction: the AND-ed positives' weighted combination.
        cond = negative + sum(w * (p - negative) for w, p in zip(weights, positives, strict=True))
        uncond = negative * zero_star_scale(cond, negative).to(negative.dtype) if zs is not None else negative
        diff = cond - uncond
        if apg is not None:
            if apg.momentum != 0.0:
                if self._momentum is not None and self._momentum.shape == diff.shape:
                    diff = diff + apg.momentum * self._momentum
                self._momentum = diff
            diff = apg_update(diff, cond, apg.eta, apg.norm_threshold)
        guided = uncond + cfg_scale * diff
        if self.dynamic is not None and self.alphas is not None:
            x0_neg, x0_cond = self.alphas.to_x0(x, t, uncond), self.alphas.to_x0(x, t, cond)
            mimic = x0_neg + self.dynamic.mimic_scale * (x0_cond - x0_neg)
            x0 = mimic_threshold(self.alphas.to_x0(x, t, guided), mimic, self.dynamic.percentile)
            guided = self.alphas.from_x0(x, t, x0, guided)
        return guided


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
    return {key: str(getattr(groups[ns], name)) for ns, name, key, _ in RECORDED if ns in groups}


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    groups = active_groups(context.request.options or {})
    zero_star = groups.get("cfg_zero_star")
    if zero_star is not None and zero_star.zero_init_steps and (context.request.guidance_rescale or 0) > 0:  # type: ignore[attr-defined]
        raise UnsupportedFeature("CFG-Zero*'s zero-init steps cannot be combined with guidance rescale "
                                 "(a zeroed prediction has no spread to rescale)")
    dynamic = groups.get("dynamic_thresholding")
    contributor = GuidanceContributor(
        apg=groups.get("apg"), zero_star=groups.get("cfg_zero_star"), dynamic=dynamic,  # type: ignore[arg-type]
        alphas=_Alphas(context.model.scheduler_config) if dynamic is not None else None,
    )
    yield AdapterActivation(contributors=[contributor], infotext=infotext(groups))


def options_from_png(args: argparse.Namespace, png_params: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The guidance options a ``--from-png`` image recorded (``--option`` given by the user wins)."""
    found: dict[str, dict[str, Any]] = {}
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
            description="APG, CFG-Zero* and dynamic thresholding, through the apg / cfg_zero_star / "
                        "dynamic_thresholding options",
        )
    )


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint.cli.api import add_request_options_builder, generation_parsers

    for parser in generation_parsers(subparsers):
        add_request_options_builder(parser, options_from_png)
