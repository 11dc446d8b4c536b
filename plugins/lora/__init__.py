"""LoRA: low-rank weight patches, loaded as people share them and applied reversibly.

A generation uses LoRAs named by ``<lora:name:weight>`` / ``<lora:name:te_weight:unet_weight>``
/ ``<lyco:…>`` tags in its prompt, or by API units
``AdapterUnit("lora", {"name": "ink", "weight": 0.8, "te_weight": 0.5})``. Names resolve only
inside the LoRA folder (the request's ``lora.folder`` option, :class:`LoraOptions`; on the command
line ``--lora-dir``; else ``$AIPAINT_LORA_DIR``, else ``$AIPAINT_HOME/loras``); the request's
``allow_pickle`` (the command line's ``--allow-pickle``) opts in to ``.pt``/``.ckpt`` files.
While the generation runs, the weights carry the patches; afterwards they are restored bit for
bit, even when the generation fails. The infotext records ``Lora hashes`` as A1111 does, and
the API units as A1111 tags in ``Lora units`` (the recorded prompt keeps only what the user
wrote), which ``--from-png`` turns back into units.

See ``docs/lora.md``. The Python API lives in :mod:`aipaint_plugins.lora.api`, training in
:mod:`aipaint_plugins.lora.train`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from aipaint import hookimpl
from aipaint.api.options import OptionGroup
from aipaint.errors import InvalidParameter
from aipaint.infotext import format_number
from aipaint.plugin.adapters import AdapterActivation, AdapterContext, AdapterSpec, AdapterUnit
from aipaint.plugin.kit.codecs import TextCodec

if TYPE_CHECKING:
    from aipaint_plugins.lora.api import AppliedLoras, LoraUse

UNIT_OPTIONS = ("name", "weight", "unet_weight", "te_weight")
RECORDED_UNITS = "Lora units"  # the infotext entry that records the API units, as <lora:…> tags

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


def uses_from_units(units: Sequence[AdapterUnit]) -> list[LoraUse]:
    """The LoRAs of API units, validated; each must be recordable as a ``<lora:…>`` tag."""
    from aipaint_plugins.lora.api import LoraUse

    uses = []
    for unit in units:
        options = dict(unit.options)
        unknown = sorted(set(options) - set(UNIT_OPTIONS))
        if unknown:
            raise InvalidParameter("lora unit", unknown[0], "options are " + ", ".join(UNIT_OPTIONS))
        if "name" not in options:
            raise InvalidParameter("lora unit", options, "needs a 'name' (a file in the LoRA folder)")
        if "weight" in options and "unet_weight" in options:
            raise InvalidParameter("lora unit", options, "give 'weight' or 'unet_weight', not both")
        weight = options.get("weight", options.get("unet_weight", 1.0))
        use = LoraUse(options["name"], weight, options.get("te_weight"))
        # A name that is no string is refused by the LoRA folder, with its own message.
        if isinstance(use.name, str) and _effect(_read_tags(lora_tag(use))) != _effect([use]):
            raise InvalidParameter(
                "lora unit", use.name, "must be a name that a <lora:name:weight> tag can spell (the infotext "
                "records units as tags)", "rename the file without ':', '<', '>' or surrounding spaces",
            )
        uses.append(use)
    return uses


def _effect(uses: Sequence[LoraUse] | None) -> list[tuple[str, float, float]] | None:
    return None if uses is None else [(use.name, float(use.unet_weight), use.text_encoder_weight) for use in uses]


def lora_tag(use: LoraUse) -> str:
    """A1111's tag for a use: ``<lora:name:weight>``, or ``<lora:name:te_weight:unet_weight>``."""
    weights = [use.unet_weight] if use.te_weight is None else [use.te_weight, use.unet_weight]
    return "<lora:" + ":".join([use.name, *(format_number(float(w)) for w in weights)]) + ">"


def _read_tags(text: str) -> list[LoraUse] | None:
    """The LoRAs of a text made only of ``<lora:…>`` tags; None when it holds anything else."""
    from aipaint_plugins.lora.api import LoraUse

    from aipaint.prompt import parse_prompt

    parsed = parse_prompt(text)
    if parsed.warnings or parsed.extra_networks or any(part.text for part in parsed.subprompts):
        return None
    return [LoraUse(ref.name, ref.unet_weight, ref.te_weight) for ref in parsed.loras]


def uses_from_recorded_units(text: str) -> list[LoraUse]:
    """The LoRAs of a ``Lora units`` infotext entry, e.g. ``<lora:ink:0.8> <lora:paper:0.2:0.5>``."""
    uses = _read_tags(text)
    if uses is None:
        raise InvalidParameter(
            RECORDED_UNITS, text, "must be <lora:name:weight> or <lora:name:te_weight:unet_weight> tags",
            "fix the entry in the PNG's parameters, or remove it",
        )
    return uses


# The API units, recorded as A1111 tags and read back by --from-png.
UNITS_ENTRY: TextCodec[list[LoraUse]] = TextCodec(
    RECORDED_UNITS, lambda uses: " ".join(lora_tag(use) for use in uses), uses_from_recorded_units
)


@dataclass(frozen=True)
class LoraOptions(OptionGroup):
    """Where this job's LoRA names resolve (``--lora-dir`` on the command line)."""

    namespace: ClassVar[str] = "lora"
    description: ClassVar[str] = "LoRA: the folder <lora:name> tags and units are looked up in"
    folder: Path | None = None


@contextmanager
def activate(context: AdapterContext) -> Iterator[AdapterActivation]:
    """Patch the model for one generation; restore it on exit, error or not."""
    from aipaint_plugins.lora.api import LoraUse, apply_loaded, load_loras

    tagged = [LoraUse(ref.name, ref.unet_weight, ref.te_weight) for ref in context.prompt_refs]
    from_units = uses_from_units(context.units)
    folder = context.request.option(LoraOptions).folder
    loaded = load_loras(context.model, tagged + from_units, folder=folder, allow_pickle=context.request.allow_pickle)
    applied: AppliedLoras = apply_loaded(context.model, loaded)
    info = applied.infotext()
    if from_units:  # the tags are in the recorded prompt already; the units would be lost without this
        info.update(UNITS_ENTRY.write(from_units))
    try:
        yield AdapterActivation(infotext=info)
    finally:
        applied.unload()


@hookimpl
def register_options(register: Callable[[type[OptionGroup]], None]) -> None:
    register(LoraOptions)


def request_defaults(context: AdapterContext) -> dict[str, Any]:
    """A few-step LoRA's sampler, steps and CFG, for settings the request leaves unset (see
    :mod:`aipaint_plugins.lora.defaults`)."""
    from aipaint_plugins.lora.defaults import request_defaults as asked

    return asked(context)


@hookimpl
def register_adapters(register: Callable[[AdapterSpec], None]) -> None:
    register(
        AdapterSpec(
            name="lora",
            activate=activate,
            prompt_tags=("lora", "lyco"),
            aliases=("lycoris", "locon"),
            description="LoRA / LyCORIS (LoHa, LoKr) weight patches from the LoRA folder",
            request_defaults=request_defaults,
        )
    )


@hookimpl
def register_commands(subparsers: argparse._SubParsersAction) -> None:
    from aipaint_plugins.lora.commands import add_commands

    add_commands(subparsers)
