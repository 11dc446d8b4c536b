"""The guidance methods on tensors, and the loop contributor that applies them (imported when a
job uses them: ``aipaint --help`` must not import torch)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from aipaint.engine.loop import LoopContributor

if TYPE_CHECKING:
    from aipaint_plugins.guidance import APGOptions, CFGZeroStarOptions, DynamicThresholdingOptions


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


