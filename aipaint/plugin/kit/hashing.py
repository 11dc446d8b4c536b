"""File hashes, with one cache. :func:`sha256_file` and :func:`short_hash` remember a file's
digest by (path, size, mtime) for the life of the process, and big files also on disk, so a
multi-GB checkpoint is read once; that is for display (A1111's model, "Lora hashes" and
"TI hashes" in PNG parameters), since a file edited with its mtime put back keeps its cached
hash. Checks that a file is the one published (zoo downloads) use :func:`sha256_bytes`,
which reads every byte."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("AIPAINT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "aipaint")
    return Path(root)


def sha256_bytes(path: Path | str, *, skip_safetensors_header: bool = False) -> str:
    """The sha256 of the file's bytes as they are now: what verifies a download.

    ``skip_safetensors_header`` hashes everything after a safetensors header (A1111's "addnet"
    hash, which editing the metadata does not change)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header:
            header_length = int.from_bytes(f.read(8), "little")
            f.seek(8 + header_length)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_REMEMBERED: dict[str, str] = {}  # the one cache: key -> hex digest, for this process
_DISK_MIN_BYTES = 64 << 20  # only files this big are worth remembering across processes


def _remembered(path: Path, variant: str, compute: Callable[[Path], str]) -> str:
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}{variant}"
    if key in _REMEMBERED:
        return _REMEMBERED[key]
    cache_file = cache_dir() / "hashes.json"
    big = stat.st_size > _DISK_MIN_BYTES
    cache: dict[str, str] = {}
    if big:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
    digest = cache.get(key) or compute(path)
    _REMEMBERED[key] = digest
    if big and key not in cache:
        cache[key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return digest


def sha256_file(path: Path | str) -> str:
    """:func:`sha256_bytes`, remembered by (path, size, mtime): for display, never to decide
    whether a file is the one expected."""
    return _remembered(Path(path).resolve(), "", sha256_bytes)


def short_hash(path: Path | str, *, addnet: bool = True) -> str:
    """The 12-hex-digit hash A1111 writes in "Lora hashes" (``addnet=True``) and "TI hashes" (False).

    For safetensors files with ``addnet`` it is the "addnet" hash (everything after the
    header); otherwise the sha256 of the whole file. Remembered like :func:`sha256_file`."""
    path = Path(path).resolve()
    if addnet and path.suffix.lower() == ".safetensors":
        return _remembered(path, "|addnet", lambda p: sha256_bytes(p, skip_safetensors_header=True))[:12]
    return sha256_file(path)[:12]
