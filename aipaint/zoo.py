"""The model zoo: cards (one JSON file per model), the embedded model, and downloads.

A card says where a model comes from (``source``), which family loads it, its files
with sha256, its licence and its default settings. Downloads go through the Hugging
Face Hub client (atomic writes in its cache), and every file with a published sha256
is verified before use.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from aipaint.errors import DownloadError, ModelLoadError, UnknownName

DEFAULT_MODEL = "shapes-tiny"


def zoo_root() -> Path:
    spec = importlib.util.find_spec("aipaint_zoo")
    if spec is not None and spec.origin:
        return Path(spec.origin).parent
    return Path(__file__).resolve().parent.parent / "zoo"


@dataclass(frozen=True)
class ModelCard:
    id: str
    family: str
    source: dict[str, Any]
    name: str = ""
    aliases: tuple[str, ...] = ()
    description: str = ""
    license: str = ""
    files: tuple[dict[str, Any], ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)
    config: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: Path) -> ModelCard:
        data = json.loads(path.read_text())
        missing = [k for k in ("id", "family", "source") if k not in data]
        if missing:
            raise ModelLoadError(f"zoo card {path} lacks {', '.join(missing)}")
        return cls(
            id=data["id"],
            family=data["family"],
            source=data["source"],
            name=data.get("name", data["id"]),
            aliases=tuple(data.get("aliases", ())),
            description=data.get("description", ""),
            license=data.get("license", ""),
            files=tuple(data.get("files", ())),
            defaults=dict(data.get("defaults", {})),
            config=data.get("config"),
            data=data,
        )

    @property
    def config_path(self) -> Path | None:
        return zoo_root() / self.config if self.config else None


def _card_dirs() -> list[Path]:
    dirs = [zoo_root() / "cards"]
    extra = os.environ.get("AIPAINT_ZOO_PATH")
    if extra:
        dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


@lru_cache(maxsize=1)
def _cards() -> dict[str, ModelCard]:
    cards: dict[str, ModelCard] = {}
    for folder in _card_dirs():
        for path in sorted(folder.glob("*.json")):
            card = ModelCard.from_file(path)
            cards.setdefault(card.id, card)
    return cards


def cards() -> list[ModelCard]:
    return list(_cards().values())


def find(model_id: str) -> ModelCard | None:
    key = model_id.strip().lower()
    for card in _cards().values():
        if key == card.id.lower() or key in (a.lower() for a in card.aliases):
            return card
    return None


def get(model_id: str) -> ModelCard:
    card = find(model_id)
    if card is None:
        raise UnknownName("zoo model", model_id, [c.id for c in cards()])
    return card


def _verify(path: Path, sha256: str | None) -> None:
    if not sha256:
        return
    from aipaint.hashing import sha256_file

    actual = sha256_file(path)
    if actual.lower() != sha256.lower():
        raise DownloadError(
            f"{path} has sha256 {actual}, but the zoo card expects {sha256}; the file is corrupt or "
            "not the published one: delete it and download again"
        )


def _offline_message(what: str, exc: Exception) -> str:
    detail = " ".join(str(exc).split())  # one line, for the CLI
    return (
        f"could not download {what} from the Hugging Face Hub ({type(exc).__name__}: {detail}). "
        "This machine may be offline: download the files on a connected machine "
        "(e.g. `huggingface-cli download …`) and pass the local file or folder to aipaint instead"
    )


def fetch(card: ModelCard) -> Path:
    """A local path for the card's model, downloading it if needed."""
    source = card.source
    kind = source.get("kind")
    if kind == "embedded":
        path = zoo_root() / source["path"]
        if not path.exists():
            raise ModelLoadError(
                f"the embedded model {card.id!r} is missing from {path}; reinstall aipaint or "
                "recreate it with `python -m aipaint.world.train`"
            )
        return path
    if kind == "hub":
        return download_from_hub(source["repo"], source.get("file"), card)
    if kind == "local":
        return Path(os.path.expanduser(source["path"]))
    raise ModelLoadError(f"zoo card {card.id!r} has an unknown source kind {kind!r}")


def download_from_hub(
    repo: str, filename: str | None = None, card: ModelCard | None = None, patterns: list[str] | None = None
) -> Path:
    """Download one file (verified against the card's sha256) or a diffusers folder.

    ``patterns`` narrows a folder download (e.g. a cascade stage that reuses another
    stage's text encoder need not fetch its own copy)."""
    try:
        import huggingface_hub
    except ImportError as exc:  # pragma: no cover - a dependency of diffusers
        raise DownloadError("downloading needs the huggingface_hub package") from exc
    try:
        if filename:
            path = Path(huggingface_hub.hf_hub_download(repo, filename))
            expected = next((f.get("sha256") for f in (card.files if card else ()) if f.get("name") == filename), None)
            _verify(path, expected)
            return path
        # Configs, tokenizers and the full-precision safetensors weights of each component.
        patterns = patterns or [
            "*.json", "*.txt", "*.model", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
            # big components (a T5-XXL text encoder) are published as shards with an index
            "*/diffusion_pytorch_model-*-of-*.safetensors", "*/model-*-of-*.safetensors",
        ]
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=patterns))
    except DownloadError:
        raise
    except Exception as exc:  # network errors come in many types
        raise DownloadError(_offline_message(f"{repo}{'/' + filename if filename else ''}", exc)) from exc
