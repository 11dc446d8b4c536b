"""The settings a LoRA asks for: few-step LoRAs (LCM, TCD, Hyper-SD, SDXL-Lightning, …) only work
with their own sampler, step count and CFG scale.

When a request uses such a LoRA and leaves a setting unset, the LoRA's setting is used instead of
the model's default (a setting the request gives always wins). Where they come from, first found:

1. **a sidecar file** beside the LoRA, ``<name>.json`` — the file A1111's LoRA cards write ("user
   metadata": ``activation text``, ``preferred weight``, …) — with a ``defaults`` object::

       {"preferred weight": 1.0, "defaults": {"sampler": "LCM", "steps": 4, "cfg_scale": 1.5}}

2. **a LoRA card in the zoo** (``zoo/cards/loras/*.json``) whose ``name`` or one of whose
   ``aliases`` (the file names the publishers use) is the LoRA's name, for the model's family.

Keys: ``sampler``, ``schedule`` (A1111's labels), ``steps`` and ``cfg_scale``; others are
refused with an error naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

from aipaint.errors import InvalidParameter
from aipaint.plugin.adapters import REQUEST_DEFAULT_FIELDS, AdapterContext

SIDECAR_KEY = "defaults"


def _checked(defaults: Any, where: str) -> dict[str, Any]:
    if not isinstance(defaults, dict):
        raise InvalidParameter("defaults", defaults, f"must be an object in {where}")
    unknown = sorted(set(defaults) - set(REQUEST_DEFAULT_FIELDS))
    if unknown:
        raise InvalidParameter("defaults", unknown[0], f"is not a setting a LoRA can ask for ({where}); "
                               f"use {', '.join(REQUEST_DEFAULT_FIELDS)}")
    return dict(defaults)


def sidecar_defaults(path: Path, root: Path) -> dict[str, Any]:
    """The ``defaults`` of the sidecar JSON beside the LoRA file ``path`` (inside ``root``), or {}."""
    sidecar = path.with_suffix(".json")
    try:
        if not sidecar.is_file() or not sidecar.resolve().is_relative_to(root.resolve()):
            return {}
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidParameter("lora", str(sidecar), f"its sidecar file cannot be read: {exc}") from exc
    if not isinstance(data, dict) or SIDECAR_KEY not in data:
        return {}
    return _checked(data[SIDECAR_KEY], str(sidecar))


def cards_root() -> Path:
    from aipaint.models.zoo import zoo_root

    return zoo_root() / "cards" / "loras"


@lru_cache(maxsize=4)
def lora_cards(root: Path | None = None) -> tuple[dict[str, Any], ...]:
    """The zoo's LoRA cards (read once)."""
    folder = root or cards_root()
    cards = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        card = json.loads(path.read_text(encoding="utf-8"))
        card["defaults"] = _checked(card.get("defaults", {}), str(path))
        cards.append(card)
    return tuple(cards)


def card_for(name: str, family: str, cards: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The card whose name or alias is ``name`` (its stem, case-insensitive) for ``family``."""
    stem = Path(name).name
    for suffix in (".safetensors", ".pt", ".ckpt"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    key = stem.lower()
    for card in cards:
        names = [card.get("name", ""), *card.get("aliases", ())]
        if card.get("family") == family and key in (n.lower() for n in names):
            return card
    return None


def defaults_for(name: str, context: AdapterContext) -> dict[str, Any]:
    """What the LoRA ``name`` asks for: its sidecar's ``defaults``, else its zoo card's."""
    from aipaint_plugins.lora import LoraOptions
    from aipaint_plugins.lora.library import lora_folder

    folder = lora_folder(context.request.option(LoraOptions).folder, allow_pickle=context.request.allow_pickle)
    try:
        found = folder.resolve(name)
    except Exception:  # a missing or refused name is the activation's error to raise, with its message
        found = None
    if found is not None:
        asked = sidecar_defaults(found.path, folder.root)
        if asked:
            return asked
    card = card_for(name, getattr(context.model, "family", ""), lora_cards())
    return dict(card["defaults"]) if card else {}


def request_defaults(context: AdapterContext) -> dict[str, Any]:
    """The settings the job's LoRAs ask for (the first LoRA that asks for a setting wins)."""
    from aipaint_plugins.lora import uses_from_units

    names = [ref.name for ref in context.prompt_refs] + [use.name for use in uses_from_units(context.units)]
    asked: dict[str, Any] = {}
    for name in names:
        for key, value in defaults_for(name, context).items():
            asked.setdefault(key, value)
    return asked
