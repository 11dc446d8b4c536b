"""LoRA weight patches as a kit :class:`~aipaint.plugin.kit.patches.PatchSet`.

:func:`apply_patches` adds ``Σ multiplier_i · ΔW_i`` to each targeted weight; the
returned :class:`~aipaint.plugin.kit.patches.AppliedPatches` restores the base weights
bit-exactly, whatever the arithmetic did.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aipaint_plugins.lora.formats import WeightPatch, patchable_modules
from torch import nn

from aipaint.plugin.kit.patches import AppliedPatches, PatchSet


def lora_patch_set(components: Mapping[str, nn.Module], weighted: Iterable[tuple[WeightPatch, float]]) -> PatchSet:
    """The weighted LoRA differences as one patch set keyed by ``(component, module)``.

    ``components`` maps component names (``"unet"``, ``"text_encoder"``, ``"text_encoder_2"``) to
    modules. A zero multiplier contributes nothing (a weight whose multipliers are all zero is
    not even touched).
    """
    patches = PatchSet()
    modules = {name: patchable_modules(root) for name, root in components.items()}
    for patch, multiplier in weighted:
        if multiplier == 0:
            continue
        module = modules.get(patch.component, {}).get(patch.module)
        if module is None:
            raise KeyError(f"the model has no module {patch.component}.{patch.module}")
        weight = module.weight
        patches.add(patch.target, weight, patch.delta(weight.shape, weight.device) * float(multiplier))
    return patches


def apply_patches(components: Mapping[str, nn.Module], weighted: Iterable[tuple[WeightPatch, float]]) -> AppliedPatches:
    """Apply :func:`lora_patch_set` in place; the result restores the original weights."""
    return lora_patch_set(components, weighted).apply()
