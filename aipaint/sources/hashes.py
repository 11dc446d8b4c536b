"""The hashes sources publish: sha256, and AutoV2 (its first ten hex digits in upper case, the
"Model hash" A1111 writes and Civitai lists per file). Reading files goes through the kit's one
hash cache (:mod:`aipaint.plugin.kit.hashing`); verifying a download reads every byte."""

from __future__ import annotations

import re
from pathlib import Path

from aipaint.errors import InvalidParameter

AUTOV2_LENGTH = 10
_HEX = re.compile(r"^[0-9a-fA-F]+$")


def autov2(sha256: str) -> str:
    """The AutoV2 hash of a file whose sha256 is ``sha256``."""
    return sha256[:AUTOV2_LENGTH].upper()


def file_sha256(path: Path | str, *, verify: bool = True) -> str:
    """The file's sha256: every byte read when ``verify`` (deciding whether a file is the one
    published), else the kit's remembered digest (for display and look-ups)."""
    from aipaint.plugin.kit.hashing import sha256_bytes, sha256_file

    return sha256_bytes(path) if verify else sha256_file(path)


def parse_hash(text: str, what: str = "sha256") -> tuple[str, str]:
    """``("sha256", lower-case hex)`` or ``("autov2", upper-case hex)`` for a 64- or 10-digit hash."""
    value = str(text).strip()
    if value.lower().startswith("sha256:"):
        value = value[7:]
    if not _HEX.match(value) or len(value) not in (64, AUTOV2_LENGTH):
        raise InvalidParameter(what, text, "must be a sha256 (64 hex digits) or an AutoV2 hash (10 hex digits)")
    return ("sha256", value.lower()) if len(value) == 64 else ("autov2", value.upper())


def is_hash(text: str) -> bool:
    """Whether ``text`` is written like a sha256 or an AutoV2 hash (nothing is looked up)."""
    value = str(text).strip()
    return bool(_HEX.match(value)) and len(value) in (64, AUTOV2_LENGTH)


def matches(actual_sha256: str, *, sha256: str | None = None, autov2_hash: str | None = None) -> bool:
    """Whether a file with digest ``actual_sha256`` is the published one: equal to ``sha256`` when
    that is known, else starting with the AutoV2 hash."""
    if sha256:
        return actual_sha256.lower() == sha256.lower()
    if autov2_hash:
        return autov2(actual_sha256) == autov2_hash.upper()
    return False
