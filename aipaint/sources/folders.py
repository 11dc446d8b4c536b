"""Folders that also take a model's source where its name goes.

A :class:`SourcedFolder` is the plugin kit's :class:`~aipaint.plugin.kit.folders.ModelFolder` (names
strictly inside the folder) that also takes a name written as a source: a Civitai link, AIR or
``civitai:ID``, a Hugging Face link or ``hf:`` reference, an https URL with its sha256, or a bare
sha256 / AutoV2 hash. The file is installed once into its kind's folder, as ``aipaint get`` does,
and used from there; asked again, it is found by its card. A hash is looked up on Civitai only when
no local file has that name, so a plain name that is not there stays the usual error and asks
nobody. The LoRA folder, the upscaler folder and the ControlNet resolver use it.
"""

from __future__ import annotations

from pathlib import Path

from aipaint.errors import InvalidParameter, UnknownName
from aipaint.plugin.kit.folders import ModelFolder, NamedFile, NameOutsideFolder

__all__ = ["SourcedFolder", "fetch_source"]


def fetch_source(name: str, kind: str, *, allow_pickle: bool = False, hashes: bool = False) -> Path | None:
    """The local file for ``name`` when it is written as a source, installed into ``kind``'s folder
    on first use; ``None`` for a plain name. A bare hash counts only with ``hashes=True`` (callers
    try it as a local name first)."""
    if not isinstance(name, str):
        return None
    from aipaint import sources  # the HTTP client loads only when a source is named

    if not sources.is_source(name) or (sources.is_hash(name) and not hashes):
        return None
    return sources.ensure(name.strip(), kind=kind, allow_pickle=allow_pickle)


class SourcedFolder(ModelFolder):
    """A :class:`ModelFolder` whose :meth:`resolve` also takes a source; ``source_kind`` is the
    :data:`aipaint.sources.KINDS` kind its files are (``"lora"``, ``"upscaler"``, …)."""

    def __init__(self, root: Path | str, kind: str, *, source_kind: str, allow_pickle: bool = False,
                 name_example: str | None = None) -> None:
        super().__init__(root, kind, allow_pickle=allow_pickle, name_example=name_example)
        self.source_kind = source_kind

    def resolve(self, name: str) -> NamedFile:
        fetched = fetch_source(name, self.source_kind, allow_pickle=self.allow_pickle)
        if fetched is not None:
            return NamedFile(fetched.stem, fetched)
        try:
            return super().resolve(name)
        except (UnknownName, InvalidParameter) as exc:
            if isinstance(exc, NameOutsideFolder):
                raise
            fetched = fetch_source(name, self.source_kind, allow_pickle=self.allow_pickle, hashes=True)
            if fetched is None:
                raise
            return NamedFile(fetched.stem, fetched)
