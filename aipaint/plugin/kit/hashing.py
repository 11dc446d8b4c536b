"""File hashes. :func:`sha256_file` remembers big files by (path, size, mtime) so a multi-GB
checkpoint is read once; that is for display (A1111's short model hash in PNG parameters),
since a file edited with its mtime put back keeps its cached hash. Checks that a file is
the one published (zoo downloads) use :func:`sha256_bytes`, which reads every byte."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("AIPAINT_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")), "aipaint")
    return Path(root)


def sha256_bytes(path: Path | str) -> str:
    """The sha256 of the file's bytes as they are now: what verifies a download."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: Path | str) -> str:
    """:func:`sha256_bytes`, remembered by (path, size, mtime) for files over 64 MiB: for display,
    never to decide whether a file is the one expected."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_file = cache_dir() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = sha256_bytes(path)
    if stat.st_size > 64 << 20:  # only worth remembering for big files
        cache[key] = digest
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    return digest
