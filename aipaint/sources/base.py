"""What a source resolves to (:class:`Download`), the kinds of model files, and each kind's folder.

A kind's folder is the one the rest of aipaint reads that kind from: ``$AIPAINT_LORA_DIR``,
else ``$AIPAINT_HOME/loras``, and so on (:data:`KINDS`). ``aipaint get`` writes only there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aipaint.errors import UnknownName
from aipaint.plugin.kit.folders import default_folder

KINDS: dict[str, tuple[str, str, str]] = {
    # kind: (environment variable, sub-folder of $AIPAINT_HOME, the words messages use)
    "checkpoint": ("AIPAINT_CHECKPOINT_DIR", "checkpoints", "checkpoint"),
    "lora": ("AIPAINT_LORA_DIR", "loras", "LoRA"),
    "embedding": ("AIPAINT_EMBEDDINGS_DIR", "embeddings", "embedding"),
    "vae": ("AIPAINT_VAE_DIR", "vae", "VAE"),
    "controlnet": ("AIPAINT_CONTROLNET_DIR", "controlnet", "ControlNet"),
    "upscaler": ("AIPAINT_UPSCALER_DIR", "upscalers", "upscaler"),
}
"""Every kind of file ``aipaint get`` installs, with where it goes."""

_KIND_ALIASES = {
    "checkpoints": "checkpoint", "model": "checkpoint", "models": "checkpoint", "ckpt": "checkpoint",
    "loras": "lora", "locon": "lora", "lycoris": "lora", "lyco": "lora", "dora": "lora",
    "embeddings": "embedding", "textual-inversion": "embedding", "textual_inversion": "embedding",
    "textualinversion": "embedding", "ti": "embedding",
    "vaes": "vae", "controlnets": "controlnet", "control-net": "controlnet", "upscalers": "upscaler",
}


def check_kind(kind: str) -> str:
    """``kind`` (or an alias such as ``loras``, ``textual-inversion``) as one of :data:`KINDS`."""
    key = str(kind).strip().lower()
    key = _KIND_ALIASES.get(key, key)
    if key not in KINDS:
        raise UnknownName("kind", kind, list(KINDS))
    return key


def kind_words(kind: str) -> str:
    return KINDS[kind][2]


def folder_for(kind: str) -> Path:
    """The folder files of ``kind`` are installed in (it may not exist yet)."""
    env_var, subfolder, _ = KINDS[check_kind(kind)]
    return default_folder(env_var, subfolder)


@dataclass(frozen=True)
class Download:
    """One file a source publishes, resolved and not yet fetched.

    ``filename`` is the name the source gives, untrusted until the installer confines it.
    ``sha256`` is the full published digest (lower case); ``autov2`` is its first ten hex
    digits (upper case), used alone only when a source publishes nothing longer.
    ``token_service`` names the service whose API token may be sent (only to that service's
    own origin, never to the hosts it redirects to)."""

    source: str
    url: str
    filename: str
    kind: str
    sha256: str | None = None
    autov2: str | None = None
    size: int | None = None
    card: dict[str, Any] = field(default_factory=dict)
    token_service: str | None = None
    ids: dict[str, Any] = field(default_factory=dict)
