"""Civitai: model and version links, AIRs, ``civitai:ID[@VERSION]`` and file hashes, resolved
through Civitai's public REST API (``/api/v1/models/{id}``, ``/api/v1/model-versions/{id}``,
``/api/v1/model-versions/by-hash/{hash}``) into one :class:`~aipaint.sources.base.Download`.

Of a version's files the weights are chosen (type ``Model``, ``Pruned Model`` or ``Negative``),
safetensors before pickles and the primary file first; a version published only as a pickle is
refused unless pickles are allowed. The published ``SHA256`` (else ``AutoV2``) verifies the
download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aipaint.errors import InvalidParameter, UnsafeFileError, UnsupportedFeature
from aipaint.sources.base import Download, check_kind, kind_words
from aipaint.sources.cards import air_ecosystem, family_of_base_model
from aipaint.sources.client import Client, civitai_base_url, origin, shown_url

CIVITAI_HOSTS = ("civitai.com", "www.civitai.com", "civitai.green", "www.civitai.green")
MODEL_TYPES = {
    # Civitai's model types, as the kinds aipaint installs
    "checkpoint": "checkpoint", "lora": "lora", "locon": "lora", "dora": "lora", "lycoris": "lora",
    "textualinversion": "embedding", "vae": "vae", "controlnet": "controlnet", "upscaler": "upscaler",
}
AIR_TYPES = {"checkpoint": "checkpoint", "lora": "lora", "lycoris": "lora", "locon": "lora", "dora": "lora",
             "embedding": "embedding", "textualinversion": "embedding", "vae": "vae", "controlnet": "controlnet",
             "upscaler": "upscaler"}
WEIGHT_FILE_TYPES = ("Model", "Pruned Model", "Negative")

_AIR = re.compile(
    r"^urn:air:(?P<ecosystem>[a-z0-9_.-]+):(?P<type>[a-z0-9_-]+):(?P<source>[a-z0-9_-]+):"
    r"(?P<id>[^@\s]+?)(?:@(?P<version>[^.\s]+))?(?:\.(?P<format>[a-z0-9]+))?$",
    re.IGNORECASE,
)
_SHORT = re.compile(r"^civitai:(?P<id>\d+)(?:@(?P<version>\d+))?$", re.IGNORECASE)
_ID = re.compile(r"^\d{1,12}$")


@dataclass(frozen=True)
class CivitaiRef:
    """What a Civitai reference names: a model (its newest version), a version, or a file hash."""

    model_id: int | None = None
    version_id: int | None = None
    file_hash: str | None = None
    air_kind: str | None = None


def is_civitai_url(text: str) -> bool:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        return False
    host = (parts.hostname or "").lower()
    return host in CIVITAI_HOSTS or origin(text) == origin(civitai_base_url())


def parse(text: str) -> CivitaiRef | None:
    """The Civitai reference ``text`` is, None when it is not one (nothing is fetched).

    ``https://civitai.com/models/ID[/slug][?modelVersionId=V]``,
    ``https://civitai.com/api/download/models/V``, ``/api/v1/models/ID``,
    ``/api/v1/model-versions/V``, ``urn:air:ECOSYSTEM:TYPE:civitai:ID[@V]``, ``civitai:ID[@V]``."""
    text = text.strip()
    air = _AIR.match(text)
    if air:
        if air["source"].lower() != "civitai":
            raise UnsupportedFeature(f"AIR source {air['source']!r} is not supported; aipaint gets AIRs from civitai")
        air_type = air["type"].lower()
        if air_type not in AIR_TYPES:
            raise UnsupportedFeature(f"AIR type {air['type']!r} is not a kind aipaint installs "
                                     f"({', '.join(sorted(set(AIR_TYPES)))})")
        model_id, version = air["id"], air["version"]
        if not _ID.match(model_id) or (version is not None and not _ID.match(version)):
            raise InvalidParameter("AIR", text, "a Civitai AIR has numeric ids: urn:air:sd1:lora:civitai:12345@67890")
        return CivitaiRef(int(model_id), int(version) if version else None, air_kind=AIR_TYPES[air_type])
    short = _SHORT.match(text)
    if short:
        return CivitaiRef(int(short["id"]), int(short["version"]) if short["version"] else None)
    if not is_civitai_url(text):
        return None
    parts = urlsplit(text)
    segments = [s for s in parts.path.split("/") if s]
    query = parse_qs(parts.query)
    version = query.get("modelVersionId", [None])[0]

    def number(value: str | None) -> int | None:
        if value is None:
            return None
        if not _ID.match(value):
            raise InvalidParameter("Civitai link", shown_url(text), "has an id that is not a number")
        return int(value)

    if len(segments) >= 2 and segments[0] == "models":
        return CivitaiRef(number(segments[1]), number(version))
    if len(segments) == 4 and segments[:3] == ["api", "download", "models"]:
        return CivitaiRef(None, number(segments[3]))
    if len(segments) == 4 and segments[:3] == ["api", "v1", "models"]:
        return CivitaiRef(number(segments[3]), number(version))
    if len(segments) == 4 and segments[:3] == ["api", "v1", "model-versions"]:
        return CivitaiRef(None, number(segments[3]))
    raise InvalidParameter("Civitai link", shown_url(text),
                           "is not a model link: use https://civitai.com/models/ID (optionally ?modelVersionId=V)")


def shown_link(text: str) -> str:
    from aipaint.sources.client import shown_url

    return shown_url(text)


# --- the API ---------------------------------------------------------------------------------
def _model(client: Client, model_id: int) -> dict[str, Any]:
    data = client.get_json(f"{civitai_base_url()}/api/v1/models/{model_id}", f"Civitai model {model_id}", service="civitai")
    if not isinstance(data, dict):
        raise client.failure(f"Civitai model {model_id}: the API answered with something that is not a model")
    return data


def _version(client: Client, version_id: int) -> dict[str, Any]:
    data = client.get_json(f"{civitai_base_url()}/api/v1/model-versions/{version_id}",
                           f"Civitai model version {version_id}", service="civitai")
    if not isinstance(data, dict):
        raise client.failure(f"Civitai model version {version_id}: the API answered with something that is not a version")
    return data


def version_by_hash(client: Client, file_hash: str) -> dict[str, Any]:
    """The model version that holds a file with this hash (AutoV2, SHA256, …): Civitai's look-up by hash."""
    data = client.get_json(f"{civitai_base_url()}/api/v1/model-versions/by-hash/{file_hash}",
                           f"the Civitai look-up of hash {file_hash}", service="civitai")
    if not isinstance(data, dict):
        raise client.failure(f"the Civitai look-up of hash {file_hash} answered with something that is not a version")
    return data


def _is_safetensors(entry: dict[str, Any]) -> bool:
    metadata = entry.get("metadata") or {}
    return metadata.get("format") == "SafeTensor" or str(entry.get("name", "")).lower().endswith(".safetensors")


def choose_file(files: list[dict[str, Any]], *, wanted: str | None = None, allow_pickle: bool = False,
                file_hash: str | None = None, what: str = "this version") -> dict[str, Any]:
    """The file to download among a version's ``files``: ``wanted`` by name, the one with
    ``file_hash``, else the weights (safetensors first, the primary file first)."""
    files = [f for f in files if isinstance(f, dict) and f.get("name")]
    if not files:
        raise UnsupportedFeature(f"{what} has no files to download (it may be archived or taken down)")
    if wanted:
        chosen = [f for f in files if f["name"] == wanted]
        if not chosen:
            raise InvalidParameter("file", wanted, f"is not one of the files of {what}: "
                                   + ", ".join(repr(f["name"]) for f in files))
        return chosen[0]
    if file_hash:
        key = file_hash.upper()
        for entry in files:
            hashes = {str(v).upper() for v in (entry.get("hashes") or {}).values()}
            if key in hashes:
                return entry
    weights = [f for f in files if f.get("type") in WEIGHT_FILE_TYPES] or files
    ordered = sorted(weights, key=lambda f: (not _is_safetensors(f), not f.get("primary", False)))
    best = ordered[0]
    if not _is_safetensors(best) and not allow_pickle:
        raise UnsafeFileError(
            f"{what} is published only as {best['name']}, a Python pickle that can run code when loaded; "
            "pass --allow-pickle (allow_pickle=True) to download it anyway if you trust its author")
    return best


def _licence(model: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    keys = ("allowNoCredit", "allowCommercialUse", "allowDerivatives", "allowDifferentLicense")
    permissions = {k: model[k] for k in keys if k in model}
    if not permissions:
        return "", {}
    commercial = permissions.get("allowCommercialUse")
    if isinstance(commercial, list):
        commercial = ", ".join(str(c) for c in commercial) or "none"
    parts = [f"commercial use: {commercial if commercial not in (None, '') else 'unspecified'}"]
    if "allowDerivatives" in permissions:
        parts.append(f"derivatives: {'yes' if permissions['allowDerivatives'] else 'no'}")
    if "allowNoCredit" in permissions:
        parts.append(f"credit required: {'no' if permissions['allowNoCredit'] else 'yes'}")
    return "Civitai permissions (" + "; ".join(parts) + ")", permissions


def resolve(ref: CivitaiRef, client: Client, *, kind: str | None = None, file: str | None = None,
            allow_pickle: bool = False, sha256: str | None = None) -> Download:
    """Ask Civitai's API about ``ref`` and return the file to download, with its card."""
    client.use_token("civitai")
    model: dict[str, Any] | None = None
    version: dict[str, Any] | None = None
    if ref.file_hash:
        version = version_by_hash(client, ref.file_hash)
    if ref.model_id is not None:
        model = _model(client, ref.model_id)
        versions = [v for v in model.get("modelVersions") or [] if isinstance(v, dict)]
        if ref.version_id is not None:
            version = next((v for v in versions if v.get("id") == ref.version_id), None)
            if version is None:
                version = _version(client, ref.version_id)
                if version.get("modelId") not in (None, ref.model_id):
                    raise InvalidParameter("Civitai version", ref.version_id, f"belongs to model {version.get('modelId')}, "
                                           f"not to model {ref.model_id}")
        elif not versions:
            raise UnsupportedFeature(f"Civitai model {ref.model_id} has no published version")
        else:
            version = versions[0]  # the API lists the newest first
    elif version is None and ref.version_id is not None:
        version = _version(client, ref.version_id)
    assert version is not None
    model_id = ref.model_id if ref.model_id is not None else version.get("modelId")
    if model is None and isinstance(model_id, int):
        model = _model(client, model_id)
    model = model or {}
    version_id = version.get("id")
    summary = version.get("model") if isinstance(version.get("model"), dict) else {}
    model_type = str(model.get("type") or summary.get("type") or "")
    mapped = MODEL_TYPES.get(model_type.lower())
    what = f"Civitai model {model_id} version {version_id}"
    if kind is not None:
        kind = check_kind(kind)
        if mapped is not None and mapped != kind:
            raise InvalidParameter("kind", kind, f"Civitai says {what} is a {model_type} ({kind_words(mapped)})")
    elif mapped is not None:
        kind = mapped
    elif ref.air_kind is not None:
        kind = ref.air_kind
    else:
        raise UnsupportedFeature(f"{what} is a {model_type or 'model of no type'}, not a kind aipaint installs; "
                                 f"if it is one, say which with --kind ({', '.join(MODEL_TYPES.values())})")
    entry = choose_file(list(version.get("files") or []), wanted=file, allow_pickle=allow_pickle,
                        file_hash=ref.file_hash, what=what)
    hashes = {str(k).upper(): str(v) for k, v in (entry.get("hashes") or {}).items() if isinstance(v, str)}
    published_sha = hashes.get("SHA256", "").lower() or None
    if sha256 and published_sha and sha256.lower() != published_sha:
        raise InvalidParameter("sha256", sha256, f"differs from the sha256 Civitai publishes for {entry['name']} ({published_sha})")
    expected = (sha256 or published_sha or "").lower() or None
    auto = hashes.get("AUTOV2", "").upper() or None
    if not expected and not auto:
        raise UnsupportedFeature(f"Civitai publishes no sha256 for {entry['name']}; pass --sha256 to download it")
    download_url = entry.get("downloadUrl") or version.get("downloadUrl") or f"{civitai_base_url()}/api/download/models/{version_id}"
    base_model = version.get("baseModel")
    family = family_of_base_model(base_model)
    licence, permissions = _licence(model)
    settings = version.get("settings") if isinstance(version.get("settings"), dict) else {}
    weight = settings.get("strength") if isinstance(settings.get("strength"), (int, float)) else None
    air = version.get("air")
    ecosystem = air_ecosystem(family)
    if not air and ecosystem and model_id is not None:
        air = f"urn:air:{ecosystem}:{model_type.lower()}:civitai:{model_id}@{version_id}"
    link = f"{civitai_base_url()}/models/{model_id}?modelVersionId={version_id}" if model_id is not None else \
        f"{civitai_base_url()}/api/download/models/{version_id}"
    card = {
        "source": "civitai",
        "name": model.get("name") or summary.get("name") or entry["name"],
        "version": version.get("name"),
        "civitai_type": model_type,
        "base_model": base_model,
        "family": family,
        "trigger_words": [w.strip() for w in version.get("trainedWords") or [] if isinstance(w, str) and w.strip()],
        "recommended_weight": weight,
        "license": licence,
        "permissions": permissions,
        "link": link,
        "air": air,
        "tags": [t for t in model.get("tags") or [] if isinstance(t, str)],
        "file_format": (entry.get("metadata") or {}).get("format"),
        "precision": (entry.get("metadata") or {}).get("fp"),
    }
    ids = {"civitai_model": model_id, "civitai_version": version_id, "civitai_file": entry.get("id")}
    return Download(
        source="civitai", url=str(download_url), filename=str(entry["name"]), kind=kind, sha256=expected,
        autov2=None if expected else auto,
        card=card, token_service="civitai", ids=ids,
    )
