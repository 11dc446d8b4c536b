"""Cards: what a source says about an installed file, kept beside it as ``<name>.aipaint.json``.

A card holds the source's name and link, the file's sha256 and AutoV2, its kind, the base
model it was made for (the source's words, e.g. Civitai's "SD 1.5", and the aipaint family
they mean), trigger words, a recommended weight when the source gives one, and the licence.
Cards are data written by aipaint from what a source published: nothing in them is run, and
they never hold a token.

This module also answers the questions cards are for: which files are installed
(:func:`installed`), whether a LoRA suits the loaded model (:func:`base_model_warning`,
:func:`lora_base_model_warning`) and which words to add to a prompt (:func:`add_trigger_words`,
:func:`prompt_with_trigger_words`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aipaint.errors import AipaintError

CARD_SUFFIX = ".aipaint.json"
CARD_VERSION = 1
MAX_CARD_BYTES = 1 << 20  # a card is a few kB; a bigger file beside a model is not read as one
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin", ".pth")


def card_path(weights: Path | str) -> Path:
    """Where the card of ``weights`` (a file, or a diffusers folder) lives: beside it."""
    path = Path(weights)
    stem = path.stem if path.suffix.lower() in _WEIGHT_SUFFIXES else path.name
    return path.with_name(stem + CARD_SUFFIX)


def read_card(weights: Path | str) -> dict[str, Any] | None:
    """The card beside ``weights``, or None when there is none (or it is not a readable card)."""
    path = card_path(weights)
    try:
        if path.stat().st_size > MAX_CARD_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_card(weights: Path | str, card: dict[str, Any]) -> Path:
    """Write ``card`` beside ``weights`` atomically (a temporary file, then a rename)."""
    path = card_path(weights)
    data = {"aipaint_card": CARD_VERSION, **card}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AipaintError(f"cannot write the card {path} ({type(exc).__name__}: {exc.strerror or exc})") from None
    return path


# --- base models and families ----------------------------------------------------------------
# Which family a source's base model means is each family plugin's to say (``ModelFamily.base_models``):
# the core names no family. Architectures aipaint loads no family of still get a name of their own,
# so that a LoRA made for one is seen not to match the loaded model.
_OTHER_ARCHITECTURES: tuple[tuple[str, str], ...] = (
    (r"pony v7|auraflow", "auraflow"),
    (r"^sd ?2\.|stable-diffusion-2", "sd2"),
    (r"^sd ?3|stable-diffusion-3", "sd3"),
    (r"flux\.?1|flux-1", "flux1"),
    (r"flux\.?2|flux-2", "flux2"),
    (r"stable cascade|stable-cascade", "stable-cascade"),
    (r"pixart", "pixart"),
    (r"hunyuan", "hunyuan"),
    (r"kolors", "kolors"),
)


def _families() -> list[Any]:
    from aipaint.plugin.host import default_host

    return list(default_host().registry.families)


def family_of_base_model(base_model: str | None) -> str | None:
    """The aipaint family a source's base model means, by the families' own ``base_models``
    patterns (e.g. "SD 1.5" → the SD 1.5 family, "Pony" → the SDXL one); an architecture aipaint
    has no family for gets a name of its own (``sd2``, ``flux2``, ``auraflow``); None when unknown
    ("Other", empty)."""
    if not isinstance(base_model, str) or not base_model.strip():
        return None
    text = base_model.strip().lower()
    for family in _families():
        if any(re.search(pattern, text, re.IGNORECASE) for pattern in getattr(family, "base_models", ())):
            return family.name
    for pattern, name in _OTHER_ARCHITECTURES:
        if re.search(pattern, text):
            return name
    return None


def air_ecosystem(family_name: str | None) -> str | None:
    """The ecosystem of a Civitai AIR for files of ``family_name`` (its plugin's ``air_ecosystem``;
    the other architectures' own names), None when unknown."""
    if not family_name:
        return None
    from aipaint.plugin.host import default_host

    models = default_host().registry.families
    if family_name in models:
        return getattr(models.get(family_name), "air_ecosystem", "") or None
    return family_name if family_name in {name for _, name in _OTHER_ARCHITECTURES} else None


def canonical_family(name: str) -> str:
    """A family's registered name for any of its aliases (``sd1`` → the SD 1.5 family's name)."""
    from aipaint.plugin.host import default_host

    models = default_host().registry.families
    key = str(name).strip()
    return models.get(key).name if key in models else key.lower()


def base_model_warning(card: dict[str, Any] | None, family: str, name: str = "") -> str | None:
    """A warning when the file ``card`` describes was made for another family than ``family``
    (the loaded model's); None when they agree or the card does not say."""
    if not card:
        return None
    made_for = card.get("family") or family_of_base_model(card.get("base_model"))
    if not made_for or not family:
        return None
    if canonical_family(made_for) == canonical_family(family):
        return None
    from aipaint.sources.base import KINDS

    kind = card.get("kind")
    label = KINDS[kind][2] if isinstance(kind, str) and kind in KINDS else "file"
    what = f"{label} {name or card.get('file') or card.get('name') or ''}".strip()
    base = card.get("base_model") or made_for
    return (f"{what} was made for {base} ({canonical_family(made_for)}), but the loaded model is "
            f"{canonical_family(family)}: expect it to fail to apply or to spoil the image")


def lora_base_model_warning(weights: Path | str, family: str, name: str = "") -> str | None:
    """:func:`base_model_warning` for the card beside a LoRA (or any other) file: what the LoRA
    plugin can call when it loads one. None when there is no card."""
    return base_model_warning(read_card(weights), family, name or Path(weights).stem)


# --- trigger words ---------------------------------------------------------------------------
def trigger_words(card: dict[str, Any] | None) -> list[str]:
    words = card.get("trigger_words") if card else None
    if not isinstance(words, list):
        return []
    return [w.strip() for w in words if isinstance(w, str) and w.strip()]


def add_trigger_words(prompt: str, words: Iterable[str]) -> str:
    """``prompt`` with each of ``words`` that it does not already contain put in front."""
    lowered = prompt.lower()
    missing: list[str] = []
    for word in words:
        if word and word.lower() not in lowered and word not in missing:
            missing.append(word)
    if not missing:
        return prompt
    return ", ".join(missing) + (f", {prompt}" if prompt.strip() else "")


def prompt_with_trigger_words(prompt: str, *, lora_folder: Path | str | None = None) -> tuple[str, list[str]]:
    """``prompt`` with the trigger words of every ``<lora:NAME:…>`` it names (read from the cards
    beside those LoRAs in the LoRA folder) added in front, and the words it added. A name that
    is not in the folder is left for the generation to report."""
    from aipaint.plugin.kit.folders import ModelFolder
    from aipaint.prompt.parser import parse_prompt
    from aipaint.sources.base import folder_for

    folder = ModelFolder(Path(lora_folder) if lora_folder else folder_for("lora"), "LoRA", allow_pickle=True)
    words: list[str] = []
    for ref in parse_prompt(prompt).loras:
        try:
            found = folder.resolve(ref.name)
        except AipaintError:
            continue
        words += [w for w in trigger_words(read_card(found.path)) if w not in words]
    result = add_trigger_words(prompt, words)
    lowered = prompt.lower()
    return result, [w for w in words if w.lower() not in lowered]


# --- what is installed -----------------------------------------------------------------------
@dataclass(frozen=True)
class InstalledModel:
    kind: str
    name: str
    path: Path
    card: dict[str, Any] | None

    def as_dict(self) -> dict[str, Any]:
        card = self.card or {}
        return {
            "kind": self.kind, "name": self.name, "path": str(self.path),
            "base_model": card.get("base_model"), "family": card.get("family"),
            "trigger_words": trigger_words(card), "recommended_weight": card.get("recommended_weight"),
            "license": card.get("license"), "link": card.get("link"), "source": card.get("source"),
            "sha256": card.get("sha256"), "autov2": card.get("autov2"), "has_card": self.card is not None,
        }


def installed(kind: str | None = None) -> list[InstalledModel]:
    """Every model file (and diffusers folder) in the kinds' folders, with its card if it has one."""
    from aipaint.plugin.kit.folders import model_entries
    from aipaint.sources.base import KINDS, check_kind, folder_for

    kinds = [check_kind(kind)] if kind else list(KINDS)
    found: list[InstalledModel] = []
    for each in kinds:
        for name, path in sorted(model_entries(folder_for(each)).items(), key=lambda item: item[0].lower()):
            found.append(InstalledModel(each, name, path, read_card(path)))
    return found
