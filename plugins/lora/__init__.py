"""LoRA: low-rank weight patches, loaded as people share them and applied reversibly.

A generation uses LoRAs named by ``<lora:name:weight>`` / ``<lora:name:te_weight:unet_weight>``
/ ``<lyco:…>`` tags in its prompt, or by API units
``AdapterUnit("lora", {"name": "ink", "weight": 0.8, "te_weight": 0.5})``. Names resolve only
inside the LoRA folder (``request.extra["lora_dir"]``, else ``$AIPAINT_LORA_DIR``, else
``$AIPAINT_HOME/loras``); ``request.extra["allow_pickle"]`` opts in to ``.pt``/``.ckpt`` files.
While the generation runs, the weights carry the patches; afterwards they are restored bit for
bit, even when the generation fails. The infotext records ``Lora hashes`` as A1111 does.

See ``docs/lora.md``. The Python API lives in :mod:`aipaint_plugins.lora.api`, training in
:mod:`aipaint_plugins.lora.train`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from aipaint import hookimpl
from aipaint.adapters import AdapterActivation, AdapterContext, AdapterSpec
from aipaint.errors import InvalidParameter

if TYPE_CHECKING:
    from aipaint_plugins.lora.api import AppliedLoras, LoraUse

UNIT_OPTIONS = ("name", "weight", "unet_weight", "te_weight")

__all__ = ["LoraUse", "apply_loras", "train_lora"]


def __getattr__(name: str) -> Any:
    # torch-heavy modules load on first use, so plugin registration and `aipaint --help` stay quick.
    if name in ("LoraUse", "apply_loras", "AppliedLoras", "lora_folder"):
        from aipaint_plugins.lora import api

        return getattr(api, name)
    if name == "train_lora":
        from aipaint_plugins.lora.train import train_lora

        return train_lora
    raise AttributeError(f"module 'aipaint_plugins.lora' has no attribute {name!r}")


def uses_from_context(context: AdapterContext) -> list[LoraUse]:
    """The LoRAs a generation asks for: prompt tags first, then API units (validated)."""
    from aipaint_plugins.lora.api import LoraUse

    uses = [LoraUse(ref.name, ref.unet_weight, ref.te_weight) for ref in context.prompt_refs]
    for unit in context.units:
        options = dict(unit.options)
        unknown = sorted(set(options) - set(UNIT_OPTIONS))
        if unknown:
            raise InvalidParameter("lora unit", unknown[0], "options are " + ", ".join(UNIT_OPTIONS))
        if "name" not in options:
            raise InvalidParameter("lora unit", options, "needs a 'name' (a file in the LoRA folder)")
        if "weight" in options and "unet_weight" in options:
            raise InvalidParameter("lora unit", options, "give 'weight' or 'unet_weight', not both")
        weight = options.get("weight", options.get("unet_weight", 1.0))
        uses.append(LoraUse(options["name"], weight, options.get("te_weight")))
    return uses


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    """Patch the model for one generation; restore it on exit, error or not."""
    from aipaint_plugins.lora.api import apply_loaded, load_loras

    extra = context.request.extra or {}
    loaded = load_loras(
        context.model, uses_from_context(context), folder=extra.get("lora_dir"), allow_pickle=bool(extra.get("allow_pickle"))
    )
    applied: AppliedLoras = apply_loaded(context.model, loaded)
    try:
        yield AdapterActivation(infotext=applied.infotext())
    finally:
        applied.unload()


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="lora",
            activate=activate,
            prompt_tags=("lora", "lyco"),
            aliases=("lycoris", "locon"),
            description="LoRA / LyCORIS (LoHa, LoKr) weight patches from the LoRA folder",
        )
    )


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint_plugins.lora.commands import add_commands

    add_commands(subparsers)
