"""Hugging Face Hub links, read with the Hub's own URL conventions.

``https://huggingface.co/ORG/NAME`` (a repo: its one safetensors weights file at the top),
``…/blob/REV/PATH`` and ``…/resolve/REV/PATH`` (a file), ``…/tree/REV`` (a revision), and
``hf:ORG/NAME[/PATH]``. The repo's card (``GET /api/models/{repo}``) gives tags, the licence,
the base model and a DreamBooth ``instance_prompt`` (its trigger words); its file listing
(``GET /api/models/{repo}/tree/{rev}/{folder}``) gives each LFS file's sha256 and size. The file
itself comes from ``/{repo}/resolve/{rev}/{path}``. The endpoint is ``$AIPAINT_HF_ENDPOINT`` or
``$HF_ENDPOINT``; a token (``$HF_TOKEN``) opens gated repos.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aipaint.errors import InvalidParameter, UnsafeFileError, UnsupportedFeature
from aipaint.plugin.kit.folders import PICKLE_SUFFIXES, SAFE_SUFFIXES
from aipaint.sources.base import Download, check_kind
from aipaint.sources.cards import family_of_base_model
from aipaint.sources.client import Client, hf_endpoint, origin, shown_url

HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_REPO_MAX = 96
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TAG_KINDS = (("lora", "lora"), ("textual_inversion", "embedding"), ("controlnet", "controlnet"))


@dataclass(frozen=True)
class HubRef:
    repo: str
    path: str | None = None
    revision: str = "main"


def is_hub_url(text: str) -> bool:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        return False
    return (parts.hostname or "").lower() in HUB_HOSTS or origin(text) == origin(hf_endpoint())


def _check_repo(repo: str, text: str) -> str:
    if len(repo) > _REPO_MAX or not _REPO.match(repo) or ".." in repo:
        raise InvalidParameter("Hugging Face repo", text, "must name a repo as ORG/NAME")
    return repo


def _check_path(path: str, text: str) -> str:
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or "\\" in path or "\x00" in path:
        raise InvalidParameter("Hugging Face file", text, "must be a path inside the repo")
    return path


def parse(text: str) -> HubRef | None:
    """The Hub reference ``text`` is, None when it is not one (nothing is fetched)."""
    text = text.strip()
    if text.lower().startswith("hf:"):
        rest = text[3:].strip("/")
        pieces = rest.split("/")
        if len(pieces) < 2:
            raise InvalidParameter("Hugging Face repo", text, "write hf:ORG/NAME or hf:ORG/NAME/FILE")
        repo = _check_repo("/".join(pieces[:2]), text)
        path = "/".join(pieces[2:]) or None
        return HubRef(repo, _check_path(path, text) if path else None)
    if not is_hub_url(text):
        return None
    parts = urlsplit(text)
    path = parts.path
    prefix = urlsplit(hf_endpoint()).path.rstrip("/")
    if prefix and origin(text) == origin(hf_endpoint()) and path.startswith(prefix + "/"):
        path = path[len(prefix):]
    segments = [unquote(s) for s in path.split("/") if s]
    if segments and segments[0] in ("datasets", "spaces"):
        raise UnsupportedFeature(f"{shown_url(text)} is a Hugging Face {segments[0][:-1]}, not a model repo")
    if len(segments) < 2:
        raise InvalidParameter("Hugging Face link", shown_url(text), "must name a model repo: https://huggingface.co/ORG/NAME")
    repo = _check_repo(f"{segments[0]}/{segments[1]}", text)
    if len(segments) == 2:
        return HubRef(repo)
    if segments[2] in ("resolve", "blob") and len(segments) >= 5:
        return HubRef(repo, _check_path("/".join(segments[4:]), text), segments[3])
    if segments[2] == "tree" and len(segments) >= 4:
        return HubRef(repo, None, segments[3])
    raise InvalidParameter("Hugging Face link", shown_url(text),
                           "must be a repo or a file link (…/blob/REV/PATH or …/resolve/REV/PATH)")


def _guess_kind(info: dict[str, Any], card_data: dict[str, Any]) -> str | None:
    tags = {str(t).lower() for t in (info.get("tags") or []) + (card_data.get("tags") or []) if isinstance(t, str)}
    for tag, kind in _TAG_KINDS:
        if tag in tags:
            return kind
    if info.get("pipeline_tag") == "text-to-image":
        return "checkpoint"
    return None


def _first(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str)), None)
    return value if isinstance(value, str) and value.strip() else None


def resolve(ref: HubRef, client: Client, *, kind: str | None = None, file: str | None = None,
            allow_pickle: bool = False, sha256: str | None = None) -> Download:
    """Ask the Hub's API about ``ref`` and return the file to download, with its card."""
    client.use_token("huggingface")
    base = hf_endpoint()
    rev = quote(ref.revision, safe="")
    what = f"Hugging Face repo {ref.repo}"
    info_url = f"{base}/api/models/{ref.repo}" + ("" if ref.revision == "main" else f"/revision/{rev}")
    info = client.get_json(info_url, what, service="huggingface")
    if not isinstance(info, dict):
        raise client.failure(f"{what}: the API answered with something that is not a model")
    path = ref.path or (_check_path(file, file) if file else None)
    folder = path.rsplit("/", 1)[0] if path and "/" in path else ""
    tree_url = f"{base}/api/models/{ref.repo}/tree/{rev}" + (f"/{quote(folder)}" if folder else "")
    tree = client.get_json(tree_url, f"the file list of {ref.repo}", service="huggingface")
    files = [e for e in tree if isinstance(e, dict) and e.get("type") == "file" and isinstance(e.get("path"), str)] \
        if isinstance(tree, list) else []
    if path:
        entry = next((e for e in files if e["path"] == path), None)
        if entry is None:
            raise InvalidParameter("file", path, f"is not in {ref.repo} at {ref.revision}")
    else:
        weights = [e for e in files if e["path"].lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES)]
        safe = [e for e in weights if e["path"].lower().endswith(SAFE_SUFFIXES)]
        if len(safe) == 1:
            entry = safe[0]
        elif len(safe) > 1:
            names = ", ".join(e["path"] for e in safe[:12])
            raise InvalidParameter("file", None, f"{ref.repo} has several weights files ({names})",
                                   f"name one: {base}/{ref.repo}/blob/{ref.revision}/<file> or --file <file>")
        elif weights and allow_pickle and len(weights) == 1:
            entry = weights[0]
        elif weights:
            raise UnsafeFileError(
                f"{ref.repo} has weights only as Python pickles ({', '.join(e['path'] for e in weights[:6])}), which can "
                "run code when loaded; name one and pass --allow-pickle (allow_pickle=True) if you trust its author")
        elif any(e["path"] == "model_index.json" for e in files):
            raise UnsupportedFeature(
                f"{ref.repo} is a diffusers model folder, not one file: load it by its id (aipaint generate -m {ref.repo}); "
                "the Hub client downloads and caches it")
        else:
            raise UnsupportedFeature(f"{ref.repo} has no weights file at the top of {ref.revision}; link the file itself")
    lfs = entry.get("lfs") if isinstance(entry.get("lfs"), dict) else {}
    published = str(lfs.get("oid") or "").lower()
    published = published if _SHA256.match(published) else None
    if sha256 and published and sha256.lower() != published:
        raise InvalidParameter("sha256", sha256, f"differs from the sha256 the Hub publishes for {entry['path']} ({published})")
    expected = (sha256 or published or "").lower() or None
    if not expected:
        raise UnsupportedFeature(f"the Hub publishes no sha256 for {entry['path']} (it is not an LFS file); "
                                 "pass --sha256 to download it")
    card_data = info.get("cardData") if isinstance(info.get("cardData"), dict) else {}
    if kind is not None:
        kind = check_kind(kind)
    else:
        kind = _guess_kind(info, card_data)
        if kind is None:
            raise InvalidParameter("kind", None, f"the Hub does not say what {ref.repo} is",
                                   "say it with --kind checkpoint, lora, embedding, vae, controlnet or upscaler")
    base_model = _first(card_data.get("base_model"))
    licence = _first(card_data.get("license")) or next(
        (t.split(":", 1)[1] for t in info.get("tags") or [] if isinstance(t, str) and t.startswith("license:")), "")
    prompt = _first(card_data.get("instance_prompt"))
    size = entry.get("size") if isinstance(entry.get("size"), int) else None
    card = {
        "source": "huggingface",
        "name": ref.repo,
        "version": ref.revision,
        "base_model": base_model,
        "family": family_of_base_model(base_model),
        "trigger_words": [prompt.strip()] if prompt else [],
        "recommended_weight": None,
        "license": licence,
        "link": f"{base}/{ref.repo}/blob/{ref.revision}/{entry['path']}",
        "tags": [t for t in info.get("tags") or [] if isinstance(t, str)][:50],
    }
    ids = {"hf_repo": ref.repo, "hf_path": entry["path"], "hf_revision": ref.revision, "hf_commit": info.get("sha")}
    return Download(
        source="huggingface", url=f"{base}/{ref.repo}/resolve/{rev}/{quote(entry['path'])}",
        filename=entry["path"].rsplit("/", 1)[-1], kind=kind, sha256=expected, size=size, card=card,
        token_service="huggingface", ids=ids,
    )
