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
    from aipaint.plugin.kit.hashing import sha256_bytes

    actual = sha256_bytes(path)  # every byte: the cached hash would miss an edit that kept the mtime
    if actual.lower() != sha256.lower():
        raise DownloadError(
            f"{path} has sha256 {actual}, but the zoo card expects {sha256}; the file is corrupt or "
            "not the published one: delete it and download again"
        )


HUB_CONNECT_TIMEOUT_S = 3.0
"""How long a download waits to connect to the Hub before taking the machine as offline (left to
itself, the hub client retries for about 23 s). Once connected, a slow answer is waited for as
long as the hub client waits for its own (``HF_HUB_ETAG_TIMEOUT``)."""


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be asked now, or None when it answers.

    ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is read now, not only when the hub client
    was imported. Otherwise one request goes to the endpoint through the hub client's own
    session, so the proxies and certificates it is configured with apply as for the download."""
    import huggingface_hub
    from huggingface_hub import constants

    said_offline = any(os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")
                       for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if said_offline or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        huggingface_hub.get_session().head(constants.ENDPOINT, timeout=(HUB_CONNECT_TIMEOUT_S, constants.HF_HUB_ETAG_TIMEOUT))
    except Exception as exc:  # the transport's error types differ between hub client versions
        return f"{constants.ENDPOINT} cannot be reached ({_one_line(exc)})"
    return None


def _download_failed(repo: str, filename: str | None, cause: str) -> str:
    what, kind = (f"{repo}/{filename}", "file") if filename else (repo, "folder")
    command = f"hf download {repo}{' ' + filename if filename else ''} --local-dir <folder>"
    return (
        f"could not download {what} from the Hugging Face Hub ({cause}). If this machine is offline, "
        f"run `{command}` on a connected one and pass the downloaded {kind} to aipaint instead"
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
                "recreate it with `python -m aipaint_plugins.shapes_world.train`"
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
    unreachable = hub_unreachable()
    # Without the Hub the local cache is the only source; asked for it alone, the client answers at once.
    cache_only = unreachable is not None
    try:
        if filename:
            path = Path(huggingface_hub.hf_hub_download(repo, filename, local_files_only=cache_only))
            expected = next((f.get("sha256") for f in (card.files if card else ()) if f.get("name") == filename), None)
            _verify(path, expected)
            return path
        # Configs, tokenizers and the full-precision safetensors weights of each component.
        patterns = patterns or [
            "*.json", "*.txt", "*.model", "*/diffusion_pytorch_model.safetensors", "*/model.safetensors",
            # big components (a T5-XXL text encoder) are published as shards with an index
            "*/diffusion_pytorch_model-*-of-*.safetensors", "*/model-*-of-*.safetensors",
        ]
        return Path(huggingface_hub.snapshot_download(repo, allow_patterns=patterns, local_files_only=cache_only))
    except DownloadError:
        raise
    except Exception as exc:  # network errors come in many types
        cause = f"{unreachable}, and no copy is in the local cache" if cache_only else _one_line(exc)
        raise DownloadError(_download_failed(repo, filename, cause)) from exc
