"""Downloads that resume, verify and land atomically, and the only way a name from the network
becomes a path.

A file is fetched into a hidden partial file in its destination folder
(``.aipaint-<hash>.part``, keyed by the expected hash so a partial always belongs to one
published file). A cut connection keeps what arrived; the next attempt (automatic, a few times,
then the next run of the same command) asks for the rest with an HTTP ``Range`` request. The
bytes are hashed as they arrive; only a file whose sha256 is the published one is renamed into
place (``os.replace``, atomic on one file system). A mismatch deletes the partial: nothing is
left behind.

Names come from the network and are untrusted: :func:`confine` accepts one plain file name
with a weights suffix, and refuses absolute paths, ``..``, separators, hidden names, control
characters and links that lead out of the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aipaint.errors import DownloadError, InvalidParameter, UnsafeFileError
from aipaint.plugin.kit.folders import (
    PICKLE_SUFFIXES,
    SAFE_SUFFIXES,
    NameOutsideFolder,
    check_name,
    is_inside,
)
from aipaint.sources.client import Client, shown_url
from aipaint.sources.hashes import matches

CHUNK_BYTES = 1 << 16  # what a cut connection can lose of the last read; the rest is kept
DEFAULT_RETRIES = 3
PART_PREFIX = ".aipaint-"
PART_SUFFIX = ".part"

Progress = Callable[[int, int], None]


def confine(name: str, folder: Path, kind: str, *, allow_pickle: bool = False, allow_subfolders: bool = False) -> Path:
    """The path ``name`` means inside ``folder``, or an error when it would lead anywhere else.

    ``name`` comes from a source (untrusted): one plain file name with a weights suffix.
    ``allow_subfolders`` lets a name the user typed (``--name style/ink.safetensors``) keep its
    sub-folders; they are checked the same way."""
    what = f"{kind} file name"
    if any(ord(c) < 32 or ord(c) == 127 for c in str(name)):
        raise NameOutsideFolder(what, name, folder, "it contains control characters")
    relative = check_name(what, name, folder)
    if len(relative.parts) > 1 and not allow_subfolders:
        raise NameOutsideFolder(what, name, folder, "a name from a source must not name folders")
    if "\\" in str(name) and not allow_subfolders:
        raise NameOutsideFolder(what, name, folder, "a name from a source must not name folders")
    if any(part.startswith(".") for part in relative.parts):
        raise NameOutsideFolder(what, name, folder, "hidden names (starting with '.') are not allowed")
    suffix = relative.suffix.lower()
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise InvalidParameter(what, name, f"must end in {', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)}",
                               "aipaint reads .safetensors weights (and pickles on request); pass --name to rename it")
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise UnsafeFileError(
            f"{name} is a Python pickle ({suffix}), which can run code when loaded; aipaint prefers .safetensors. "
            "Pass --allow-pickle (allow_pickle=True) to download it anyway if you trust its author")
    path = folder.joinpath(*relative.parts)
    ancestor = path.parent
    while ancestor != folder and not ancestor.exists():
        ancestor = ancestor.parent
    if folder.exists() and not is_inside(ancestor, folder):
        raise NameOutsideFolder(what, name, folder, "it leads through a link out of the folder")
    if path.is_symlink() or (path.exists() and not is_inside(path, folder)):
        raise NameOutsideFolder(what, name, folder, "a link is in its place")
    return path


def _part_path(folder: Path, key: str) -> Path:
    return folder / f"{PART_PREFIX}{key}{PART_SUFFIX}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX), so two commands never write one partial file."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: one writer is the user's to ensure
        yield
        return
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
    held = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DownloadError(f"another aipaint is downloading the same file into {path.parent}; wait for it") from None
        held = True
        yield
    finally:
        if held:  # only the holder removes the lock file
            with contextlib.suppress(OSError):
                lock.unlink()
        os.close(fd)


def _hash_of(path: Path) -> tuple[Any, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return h, size


def download(client: Client, url: str, dest: Path, *, sha256: str | None = None, autov2_hash: str | None = None,
             size: int | None = None, what: str = "the download", progress: Progress | None = None,
             retries: int = DEFAULT_RETRIES, backoff_s: float = 1.0) -> str:
    """Fetch ``url`` into ``dest`` (resumable, verified, atomic); return the file's sha256.

    ``sha256`` (or, when a source publishes nothing longer, ``autov2_hash``) is required: a
    download that cannot be verified is refused. ``size`` in bytes, when known, lets a
    partial be finished without asking and a short body be seen as cut. ``progress(done,
    total)`` after each chunk (total 0 when unknown). ``retries`` more attempts follow a cut
    connection, ``backoff_s`` apart (doubling)."""
    import requests

    if not sha256 and not autov2_hash:
        raise DownloadError(f"{what}: no sha256 to verify it against; refusing to download an unverifiable file")
    key = (sha256 or autov2_hash or "").lower()[:32]
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {folder} ({exc.strerror or exc})") from None
    part = _part_path(folder, key)
    with _locked(part):
        hasher, have = _hash_of(part) if part.exists() else (hashlib.sha256(), 0)
        if size is not None and have > size:
            part.unlink()
            hasher, have = hashlib.sha256(), 0
        if size is not None and have < size:
            free = shutil.disk_usage(folder).free
            if free < size - have:
                raise DownloadError(f"{what} needs {size - have:,} more bytes in {folder}, which has {free:,} free")
        attempt = 0
        while True:
            if size is not None and have == size:
                break
            try:
                done = _fetch_into(client, url, part, hasher, have, size, what, progress, requests)
            except _Cut as cut:
                hasher, have = cut.hasher, cut.have
                if attempt >= retries:
                    total = f" of {size:,}" if size is not None else ""
                    raise client.failure(
                        f"{what} stopped after {have:,}{total} bytes; run the same command again to resume it",
                        cut.cause) from None
                attempt += 1
                if backoff_s:
                    time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            hasher, have = done
            break
        actual = hasher.hexdigest()
        if not matches(actual, sha256=sha256, autov2_hash=autov2_hash):
            part.unlink(missing_ok=True)
            expected = sha256 or f"AutoV2 {autov2_hash}"
            raise DownloadError(f"{what}: the file from {shown_url(url)} has sha256 {actual}, but {expected} was "
                                "expected; it was deleted (a corrupt download, or not the published file)")
        try:
            os.replace(part, dest)
        except OSError as exc:
            raise DownloadError(f"cannot move the download into {dest} ({exc.strerror or exc})") from None
    return actual


class _Cut(Exception):
    def __init__(self, hasher: Any, have: int, cause: BaseException | None) -> None:
        super().__init__("cut")
        self.hasher, self.have, self.cause = hasher, have, cause


def _fetch_into(client: Client, url: str, part: Path, hasher: Any, have: int, size: int | None, what: str,
                progress: Progress | None, requests: Any) -> tuple[Any, int]:
    """One attempt: ask for the bytes from ``have`` on and append them. Raises :class:`_Cut`
    (with the state so far) when the connection breaks or the body ends short."""
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        response = client.request(url, headers=headers, stream=True, what=what)
    except DownloadError as exc:
        if have:  # the host went away mid-file: keep what arrived and try again
            raise _Cut(hasher, have, exc) from None
        raise
    with response:
        if response.status_code == 416 and have:
            # Nothing after ``have``: the partial is complete (or wrong, which the hash will say).
            return hasher, have
        client.check(response, what, service=_service_of(url))
        if "text/html" in response.headers.get("Content-Type", "").lower():
            raise client.failure(f"{what}: {shown_url(response.url or url)} answered with a web page, not a file "
                                 "(a login page? an API token may be needed)")
        if response.status_code == 206:
            if _range_start(response.headers.get("Content-Range", "")) != have:
                raise client.failure(f"{what}: {shown_url(response.url or url)} answered a range request "
                                     "with other bytes than those asked for")
        elif have:
            hasher, have = hashlib.sha256(), 0  # the server sent the whole file again: start over
        mode = "ab" if have else "wb"
        total = size or _total(response, have) or 0
        try:
            with open(part, mode) as f:
                try:
                    for block in response.iter_content(CHUNK_BYTES):
                        if not block:
                            continue
                        f.write(block)
                        hasher.update(block)
                        have += len(block)
                        if size is not None and have > size:
                            break
                        if progress:
                            progress(have, total)
                except (requests.RequestException, ConnectionError, TimeoutError) as exc:
                    # (requests' errors are OSErrors too: a full disk, below, is not one of them)
                    f.flush()
                    raise _Cut(hasher, have, exc) from None
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise DownloadError(f"{what}: cannot write {part} ({exc.strerror or exc}); what arrived is kept") from None
    if size is not None and have < size:
        raise _Cut(hasher, have, None)
    return hasher, have


def _service_of(url: str) -> str | None:
    from aipaint.sources.client import SERVICE_BASES, origin

    for service, base in SERVICE_BASES.items():
        if origin(base()) == origin(url):
            return service
    return None


def _range_start(content_range: str) -> int | None:
    # "bytes 100-999/1000"
    try:
        unit, rest = content_range.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit.strip().lower() == "bytes" else None
    except ValueError:
        return None


def _total(response: Any, have: int) -> int | None:
    length = response.headers.get("Content-Length")
    try:
        return have + int(length) if length is not None else None
    except ValueError:
        return None


def existing_matches(path: Path, sha256: str | None, autov2_hash: str | None) -> tuple[bool, str]:
    """Whether the file already at ``path`` is the published one, and its sha256."""
    from aipaint.sources.hashes import file_sha256

    actual = file_sha256(path, verify=True)
    return matches(actual, sha256=sha256, autov2_hash=autov2_hash), actual

