"""Plain http(s) URLs: a file anywhere, verified against a sha256 the user gives
(``--sha256 HEX``, or the URL's fragment ``#sha256=HEX`` as pip writes it). Without one the
download is refused: nothing else says the bytes are the ones meant. No token is ever sent.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit, urlunsplit

from aipaint.errors import InvalidParameter
from aipaint.sources.base import Download, check_kind
from aipaint.sources.client import shown_url
from aipaint.sources.hashes import parse_hash


def is_url(text: str) -> bool:
    parts = urlsplit(text.strip())
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def resolve(url: str, *, kind: str | None = None, sha256: str | None = None, name: str | None = None) -> Download:
    url = url.strip()
    parts = urlsplit(url)
    fragment = parts.fragment
    if not sha256 and fragment.lower().startswith("sha256="):
        sha256 = fragment[7:]
    if not sha256:
        raise InvalidParameter("sha256", None, f"is needed to download {shown_url(url)}: a plain URL publishes none",
                               "pass --sha256 HEX (the hash its author publishes) or add #sha256=HEX to the URL")
    form, digest = parse_hash(sha256)
    if form != "sha256":
        raise InvalidParameter("sha256", sha256, "must be the full sha256 (64 hex digits) for a plain URL")
    if kind is None:
        raise InvalidParameter("kind", None, f"is needed for {shown_url(url)}",
                               "say what it is with --kind checkpoint, lora, embedding, vae, controlnet or upscaler")
    kind = check_kind(kind)
    filename = name or unquote(parts.path.rsplit("/", 1)[-1])
    if not filename:
        raise InvalidParameter("name", None, f"{shown_url(url)} names no file", "pass --name NAME.safetensors")
    fetch = urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))
    card = {"source": "url", "name": filename.rsplit(".", 1)[0], "link": shown_url(url), "base_model": None,
            "family": None, "trigger_words": [], "recommended_weight": None, "license": ""}
    return Download(source="url", url=fetch, filename=filename, kind=kind, sha256=digest, card=card,
                    ids={"url": shown_url(url)})
