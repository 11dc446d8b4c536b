"""Model sources: Civitai, the Hugging Face Hub and plain URLs, by id, link or hash.

:func:`get` resolves a source (a Civitai model or version link, an AIR such as
``urn:air:sd1:lora:civitai:12345@67890``, ``civitai:ID[@VERSION]``, a file's sha256 or AutoV2
hash, a Hugging Face repo or file link, ``hf:ORG/NAME[/FILE]``, or a plain https URL with an
expected sha256), downloads the file into its kind's folder under the aipaint home (resumable,
verified, atomic) and writes its card beside it. :func:`ensure` does the same unless the file is
installed already (what a loader calls where a user names a model by its source);
:func:`identify` finds a local file's card by its hash.

Modules: :mod:`~aipaint.sources.client` (HTTP, tokens, scrubbed messages),
:mod:`~aipaint.sources.civitai`, :mod:`~aipaint.sources.huggingface` and
:mod:`~aipaint.sources.url` (the resolvers), :mod:`~aipaint.sources.downloader` (resume,
verify, confine names), :mod:`~aipaint.sources.cards` (cards, base-model checks, trigger
words, what is installed) and :mod:`~aipaint.sources.hashes`. HTTP libraries are imported when
a download starts, never on import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aipaint.errors import AipaintError, DownloadError, InvalidParameter
from aipaint.sources import civitai, huggingface, url
from aipaint.sources.base import KINDS, Download, check_kind, folder_for, kind_words
from aipaint.sources.cards import (
    InstalledModel,
    add_trigger_words,
    base_model_warning,
    card_path,
    family_of_base_model,
    installed,
    lora_base_model_warning,
    prompt_with_trigger_words,
    read_card,
    trigger_words,
    write_card,
)
from aipaint.sources.client import Client
from aipaint.sources.downloader import DEFAULT_RETRIES, confine, download, existing_matches
from aipaint.sources.hashes import autov2, file_sha256, is_hash, parse_hash

__all__ = [
    "KINDS", "Download", "Installed", "InstalledModel", "add_trigger_words", "base_model_warning", "card_path",
    "ensure", "family_of_base_model", "folder_for", "get", "identify", "install", "installed", "is_source",
    "lora_base_model_warning", "prompt_with_trigger_words", "read_card", "resolve_source", "trigger_words",
]

SOURCE_FORMS = ("a Civitai model link or AIR (urn:air:sd1:lora:civitai:ID@VERSION), civitai:ID[@VERSION], "
                "a file's sha256 or AutoV2 hash, a Hugging Face link or hf:ORG/NAME[/FILE], or an https URL")


@dataclass(frozen=True)
class Installed:
    """A file :func:`install` put in place (or found there already, ``downloaded`` False)."""

    path: Path
    card: dict[str, Any]
    card_path: Path
    downloaded: bool


def is_source(text: str) -> bool:
    """Whether ``text`` is written as a source :func:`get` takes (nothing is fetched)."""
    if not isinstance(text, str) or not text.strip():
        return False
    text = text.strip()
    if is_hash(text) or url.is_url(text):
        return True
    try:
        return civitai.parse(text) is not None or huggingface.parse(text) is not None
    except AipaintError:
        return True  # written as one, but wrongly: get() says what is wrong


def resolve_source(text: str, *, kind: str | None = None, file: str | None = None, sha256: str | None = None,
                   allow_pickle: bool = False, name: str | None = None, client: Client | None = None) -> Download:
    """What ``text`` names, asked of its source: the file to download and its card."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidParameter("source", text, f"must be {SOURCE_FORMS}")
    text = text.strip()
    if kind is not None:
        kind = check_kind(kind)
    if sha256 is not None:
        form, sha256 = parse_hash(sha256)
        if form != "sha256":
            raise InvalidParameter("sha256", sha256, "must be a full sha256 (64 hex digits)")
    own = client is None
    client = client or Client()
    try:
        if is_hash(text):
            _, digest = parse_hash(text, "hash")
            return civitai.resolve(civitai.CivitaiRef(file_hash=digest), client, kind=kind, file=file,
                                   allow_pickle=allow_pickle, sha256=sha256)
        ref = civitai.parse(text)
        if ref is not None:
            return civitai.resolve(ref, client, kind=kind, file=file, allow_pickle=allow_pickle, sha256=sha256)
        hub = huggingface.parse(text)
        if hub is not None:
            return huggingface.resolve(hub, client, kind=kind, file=file, allow_pickle=allow_pickle, sha256=sha256)
        if url.is_url(text):
            return url.resolve(text, kind=kind, sha256=sha256, name=name)
    finally:
        if own:
            client.close()
    raise InvalidParameter("source", text, f"must be {SOURCE_FORMS}")


def install(item: Download, *, folder: Path | str | None = None, name: str | None = None, force: bool = False,
            allow_pickle: bool = False, progress: Callable[[int, int], None] | None = None,
            client: Client | None = None, retries: int = DEFAULT_RETRIES, backoff_s: float = 1.0) -> Installed:
    """Download ``item`` into its kind's folder (or ``folder``) and write its card beside it.

    The file keeps the name its source gives (``name`` renames it; sub-folders allowed there)
    and never lands outside the folder. A file already there with the published hash is kept;
    one with another hash is an error unless ``force``."""
    root = Path(folder).expanduser() if folder else folder_for(item.kind)
    words = kind_words(item.kind)
    target = confine(name or item.filename, root, words, allow_pickle=allow_pickle, allow_subfolders=name is not None)
    what = f"the {words} {target.name}"
    actual: str | None = None
    if target.is_file():
        same, found = existing_matches(target, item.sha256, item.autov2)
        if same:
            actual = found
        elif not force:
            raise DownloadError(f"{target} already exists and is another file (sha256 {found}); pass --force "
                                "(force=True) to replace it, or --name to install this one beside it")
    elif target.exists():
        raise DownloadError(f"{target} exists and is not a file; pass --name to install under another name")
    downloaded = actual is None
    if actual is None:
        own = client is None
        client = client or Client()
        try:
            if item.token_service:
                client.use_token(item.token_service)
            actual = download(client, item.url, target, sha256=item.sha256, autov2_hash=item.autov2, size=item.size,
                              what=what, progress=progress, retries=retries, backoff_s=backoff_s)
        finally:
            if own:
                client.close()
    card = {
        **item.card, "kind": item.kind, "file": target.name, "sha256": actual, "autov2": autov2(actual),
        "size": target.stat().st_size, "ids": {k: v for k, v in item.ids.items() if v is not None},
        "installed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return Installed(target, card, write_card(target, card), downloaded)


def get(source: str, *, kind: str | None = None, name: str | None = None, file: str | None = None,
        sha256: str | None = None, folder: Path | str | None = None, allow_pickle: bool = False, force: bool = False,
        progress: Callable[[int, int], None] | None = None, retries: int = DEFAULT_RETRIES,
        backoff_s: float = 1.0) -> Installed:
    """Resolve ``source`` and install its file (see :func:`resolve_source` and :func:`install`)."""
    client = Client()
    try:
        item = resolve_source(source, kind=kind, file=file, sha256=sha256, allow_pickle=allow_pickle, name=name,
                              client=client)
        return install(item, folder=folder, name=name, force=force, allow_pickle=allow_pickle, progress=progress,
                       client=client, retries=retries, backoff_s=backoff_s)
    finally:
        client.close()


def _same_source(text: str, card: dict[str, Any]) -> bool:
    ids = card.get("ids") if isinstance(card.get("ids"), dict) else {}
    if is_hash(text):
        form, digest = parse_hash(text, "hash")
        value = card.get("sha256") if form == "sha256" else card.get("autov2")
        return isinstance(value, str) and value.lower() == digest.lower()
    ref = civitai.parse(text)
    if ref is not None:
        if ref.version_id is not None:
            return ids.get("civitai_version") == ref.version_id
        return ref.model_id is not None and ids.get("civitai_model") == ref.model_id
    hub = huggingface.parse(text)
    if hub is not None:
        return (ids.get("hf_repo") == hub.repo and ids.get("hf_revision") == hub.revision
                and (hub.path is None or ids.get("hf_path") == hub.path))
    if url.is_url(text):
        from aipaint.sources.client import shown_url

        return ids.get("url") == shown_url(text.strip())
    return False


def find_installed(source: str, kind: str | None = None) -> InstalledModel | None:
    """The installed file whose card says it came from ``source``, if any (nothing is fetched)."""
    text = source.strip()
    for model in installed(kind):
        if model.card and model.path.is_file() and _same_source(text, model.card):
            return model
    return None


def ensure(source: str, *, kind: str | None = None, **options: Any) -> Path:
    """The local path of ``source``: the installed file when its card says it came from there,
    else :func:`get` it. For loaders where users name a model by its source."""
    found = find_installed(source, kind)
    if found is not None:
        return found.path
    return get(source, kind=kind, **options).path


def identify(path: Path | str, *, write: bool = True, client: Client | None = None) -> dict[str, Any]:
    """Look a local file up on Civitai by its AutoV2 hash (checked against its full sha256) and
    return its card, written beside the file unless ``write`` is False."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidParameter("file", str(path), "must be an existing model file")
    actual = file_sha256(path, verify=False)
    own = client is None
    client = client or Client()
    try:
        item = civitai.resolve(civitai.CivitaiRef(file_hash=autov2(actual)), client, allow_pickle=True)
    finally:
        if own:
            client.close()
    if item.sha256 and item.sha256 != actual:
        raise DownloadError(f"Civitai's file with AutoV2 {autov2(actual)} ({item.filename}) has sha256 {item.sha256}, "
                            f"but {path.name} has {actual}: it is not that file")
    card = {**item.card, "kind": item.kind, "file": path.name, "sha256": actual, "autov2": autov2(actual),
            "size": path.stat().st_size, "ids": {k: v for k, v in item.ids.items() if v is not None},
            "published_name": item.filename}
    if write:
        write_card(path, card)
    return card
