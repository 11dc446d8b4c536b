"""Applying weight patches in place, reversibly (ComfyUI's model_patcher idea, without the god class).

:func:`apply_patches` adds ``Σ multiplier_i · ΔW_i`` to each targeted weight after
keeping a copy of the original tensor; :meth:`AppliedPatches.restore` copies the
originals back, so the base weights are bit-identical afterwards whatever the
arithmetic did. Applications nest (a LoRA applied for the whole session, another for
one generation): each keeps its own backups and they are restored in reverse order.

Patching in place (rather than wrapping modules) keeps the denoise loop's cost
unchanged, works for every runtime that calls the torch modules, and needs no model
reload when LoRAs change between calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from aipaint_plugins.lora.formats import WeightPatch, patchable_modules
from torch import nn


@dataclass
class AppliedPatches:
    """Backups of the weights one :func:`apply_patches` call changed; restore them exactly once."""

    backups: dict[tuple[str, str], tuple[nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    restored: bool = False

    @property
    def targets(self) -> list[tuple[str, str]]:
        return list(self.backups)

    def restore(self) -> None:
        if self.restored:
            return
        with torch.no_grad():
            for weight, original in self.backups.values():
                weight.copy_(original)
        self.backups.clear()
        self.restored = True

    def __enter__(self) -> AppliedPatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def apply_patches(
    components: Mapping[str, nn.Module], weighted: Iterable[tuple[WeightPatch, float]]
) -> AppliedPatches:
    """Add the weighted differences to the modules' weights in place; return the backups.

    ``components`` maps component names (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``) to modules.
    Several patches on one weight are summed in float32 before the single write, so the
    order of LoRAs does not matter. A zero multiplier contributes nothing (the weight is
    not even touched when all of its multipliers are zero).
    """
    totals: dict[tuple[str, str], torch.Tensor] = {}
    modules = {name: patchable_modules(root) for name, root in components.items()}
    for patch, multiplier in weighted:
        if multiplier == 0:
            continue
        module = modules.get(patch.component, {}).get(patch.module)
        if module is None:
            raise KeyError(f"the model has no module {patch.component}.{patch.module}")
        weight = module.weight
        delta = patch.delta(weight.shape, weight.device) * float(multiplier)
        key = patch.target
        totals[key] = totals[key] + delta if key in totals else delta
    applied = AppliedPatches()
    try:
        with torch.no_grad():
            for key, total in totals.items():
                weight = modules[key[0]][key[1]].weight
                applied.backups[key] = (weight, weight.detach().clone())
                weight.copy_((weight.float() + total).to(weight.dtype))
    except BaseException:
        applied.restore()
        raise
    return applied
