"""Weight patches as data: a :class:`PatchSet` collects additive changes to a model's
parameters, :meth:`PatchSet.apply` writes them in place for one job, and the returned
:class:`AppliedPatches` puts the original tensors back bit-exactly.

An adapter enters the :class:`AppliedPatches` on the job's exit stack (it is a context
manager), so the weights are restored when the job ends, also on error; the job lock held
by :func:`aipaint.engine.run.job_scope` keeps another job from seeing them meanwhile.
Patching in place (rather than wrapping modules) keeps the denoise loop's cost unchanged,
works for every runtime that calls the torch modules, and needs no model reload when
patches change between jobs. Applications nest (one set for a session, another for a
job): each keeps its own backups and they are restored in reverse order.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aipaint.errors import UnsupportedFeature

if TYPE_CHECKING:
    import torch


@dataclass
class AppliedPatches:
    """The original values of the parameters one :meth:`PatchSet.apply` changed; restored once."""

    backups: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    restored: bool = False

    @property
    def targets(self) -> list[Hashable]:
        return list(self.backups)

    def restore(self) -> None:
        """Copy every original tensor back (bit-exact); a second call does nothing."""
        if self.restored:
            return
        import torch

        with torch.no_grad():
            for parameter, original in self.backups.values():
                parameter.copy_(original)
        self.backups.clear()
        self.restored = True

    def __enter__(self) -> AppliedPatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


@dataclass
class PatchSet:
    """Additive changes to parameters, keyed by a name of the caller's choosing
    (LoRA uses ``(component, module)``). Several deltas on one key are summed in float32
    before the single write, so the order in which they were added does not matter."""

    parameters: dict[Hashable, torch.Tensor] = field(default_factory=dict)
    deltas: dict[Hashable, torch.Tensor] = field(default_factory=dict)

    def add(self, key: Hashable, parameter: torch.Tensor, delta: torch.Tensor) -> None:
        """Add ``delta`` (broadcastable to ``parameter``) to the change planned for ``parameter``."""
        import torch

        if key in self.parameters and self.parameters[key] is not parameter:
            raise ValueError(f"patch key {key!r} already names another parameter")
        if parameter.device.type == "meta":
            raise UnsupportedFeature(
                f"patching the weight {key!r}: it holds no data between calls (the model's weights are offloaded "
                "layer by layer, offload=sequential); weight patches such as LoRA need offload=model or none")
        self.parameters[key] = parameter
        delta = delta.to(parameter.device, torch.float32)
        self.deltas[key] = self.deltas[key] + delta if key in self.deltas else delta

    def __len__(self) -> int:
        return len(self.deltas)

    def apply(self) -> AppliedPatches:
        """Write ``parameter + delta`` into every parameter in place, keeping each original;
        if a write fails, what was already written is restored before the error propagates."""
        import torch

        applied = AppliedPatches()
        try:
            with torch.no_grad():
                for key, delta in self.deltas.items():
                    parameter = self.parameters[key]
                    applied.backups[key] = (parameter, parameter.detach().clone())
                    parameter.copy_((parameter.float() + delta).to(parameter.dtype))
        except BaseException:
            applied.restore()
            raise
        return applied


@dataclass
class AttributePatches:
    """Attributes of objects replaced for one job (a module's ``forward``), restored in reverse
    order. An attribute the object did not hold itself is deleted again, so the class's method
    shows through as before, not a bound copy of it."""

    saved: list[tuple[Any, str, bool, Any]] = field(default_factory=list)

    def set(self, obj: Any, name: str, value: Any) -> None:
        """``setattr(obj, name, value)``, remembering what to put back."""
        own = vars(obj)
        self.saved.append((obj, name, name in own, own.get(name)))
        setattr(obj, name, value)

    def restore(self) -> None:
        """Put every attribute back; a second call does nothing."""
        while self.saved:
            obj, name, had, previous = self.saved.pop()
            if had:
                setattr(obj, name, previous)
            else:
                delattr(obj, name)

    def __enter__(self) -> AttributePatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def check_patchable_unet(model: Any, feature: str) -> None:
    """Refuse a model whose UNet a module-patching feature (DeepCache, token merging) cannot reach:
    another runtime than torch, a ``torch.compile``'d UNet, or not a diffusers UNet2DConditionModel.
    ``feature`` names the feature in the :class:`~aipaint.errors.UnsupportedFeature` raised."""
    if getattr(model, "runtime", "torch") != "torch":
        raise UnsupportedFeature(
            f"{feature} patches the torch UNet, but this model runs on the {model.runtime!r} runtime; "
            "load it with runtime='torch' to use it"
        )
    if getattr(model.unet, "_compiled_call_impl", None) is not None:
        raise UnsupportedFeature(f"{feature} cannot patch a torch.compile'd UNet; load without compile=True to use it")
    if not hasattr(model.unet, "up_blocks"):
        raise UnsupportedFeature(f"{feature} needs a diffusers UNet2DConditionModel, not {type(model.unet).__name__}")
