"""The LoRA folder. Name resolution, containment and hashing are the plugin kit's
(:mod:`aipaint.plugin.kit.folders`, :mod:`aipaint.plugin.kit.hashing`); this module says where
LoRAs live and how a LoRA name is written."""

from __future__ import annotations

from pathlib import Path

from aipaint.plugin.kit.folders import ModelFolder, default_folder
from aipaint.plugin.kit.hashing import short_hash

__all__ = ["lora_folder", "short_hash"]  # short_hash: what `aipaint lora list --hashes` prints


def lora_folder(folder: Path | str | None = None, *, allow_pickle: bool = False) -> ModelFolder:
    """The LoRA folder: ``folder`` if given, else ``$AIPAINT_LORA_DIR``, else ``$AIPAINT_HOME/loras``."""
    from aipaint.sources.folders import SourcedFolder  # a LoRA may be named by its source (or hash)

    root = Path(folder) if folder is not None else default_folder("AIPAINT_LORA_DIR", "loras")
    return SourcedFolder(root, "lora", allow_pickle=allow_pickle, source_kind="lora",
                         name_example="<lora:my_style:0.8> for my_style.safetensors")
