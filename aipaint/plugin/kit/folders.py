"""Folders of named weight files (LoRAs, embeddings, upscalers, ControlNets), and the only way a
name becomes a path.

Names come from prompts, and prompts come from users, sometimes over a network. So a
name resolves strictly inside its folder: absolute paths, drive letters, ``..``, parts
longer than a file system stores and symbolic links that lead out of the folder are refused
with :class:`NameOutsideFolder` (or :class:`~aipaint.errors.InvalidParameter`) *before*
anything is opened. safetensors files are preferred; pickle-based files (``.pt``, ``.ckpt``,
``.bin``, ``.pth``) are considered only when the caller opts in.

:class:`aipaint.sources.folders.SourcedFolder` is a :class:`ModelFolder` that also takes a name
written as a source (a Civitai link or AIR, a Hugging Face reference, a URL, a hash).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from aipaint.errors import InvalidParameter, UnknownName, UnsafeFileError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")
NAME_MAX_BYTES = 255  # the longest file name (one path part) common file systems store


class NameOutsideFolder(InvalidParameter):
    """A name that would resolve outside its folder (absolute path, ``..``, an escaping symlink).

    ``example`` shows how a name of this kind is written where it is used (the folder's
    ``name_example``), so the advice fits a LoRA tag, an embedding in a prompt, or a file name."""

    def __init__(self, kind: str, name: str, folder: Path, why: str, example: str | None = None) -> None:
        self.why = why
        super().__init__(
            kind, name, f"must be a name inside {folder} ({why})",
            f"use the {kind} file's name inside that folder, without its extension"
            + (f", e.g. {example}" if example else ""),
        )


def aipaint_home() -> Path:
    """``$AIPAINT_HOME``, by default ``~/.aipaint``: where user-installed LoRAs and embeddings live."""
    return Path(os.environ.get("AIPAINT_HOME") or Path.home() / ".aipaint").expanduser()


def default_folder(env_var: str, subfolder: str) -> Path:
    """``$<env_var>`` if set, else ``$AIPAINT_HOME/<subfolder>``."""
    value = os.environ.get(env_var)
    return Path(value).expanduser() if value else aipaint_home() / subfolder


@dataclass(frozen=True)
class NamedFile:
    """A file found in a folder: its name (relative path without suffix, ``/``-separated) and path."""

    name: str
    path: Path

    @property
    def is_pickle(self) -> bool:
        return self.path.suffix.lower() in PICKLE_SUFFIXES


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symbolic links resolved, lies inside ``root`` (also resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def check_name(kind: str, name: str, folder: Path, example: str | None = None) -> PurePosixPath:
    """Reject names that could address anything outside ``folder``; return the relative path.

    ``kind`` names the parameter in errors (``"LoRA"``, ``"ControlNet model"``); ``example``
    shows how a name is written where users give one."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidParameter(kind, name, "must be a non-empty name")
    if "\x00" in name:
        raise NameOutsideFolder(kind, name, folder, "it contains a NUL character", example)
    windows = PureWindowsPath(name)
    if name.startswith(("/", "\\")) or windows.drive or windows.root or Path(name).is_absolute():
        raise NameOutsideFolder(kind, name, folder, "absolute paths are not allowed", example)
    if name.startswith("~"):  # read as a home folder by shells and by Path.expanduser
        raise NameOutsideFolder(kind, name, folder, "'~' is not allowed", example)
    parts = name.replace("\\", "/").split("/")
    if any(part in ("..", ".", "") for part in parts):
        raise NameOutsideFolder(kind, name, folder, "'..', '.' and empty parts are not allowed", example)
    if any(len(part.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES for part in parts):
        raise InvalidParameter(kind, name, f"is too long: a file name has at most {NAME_MAX_BYTES} bytes")
    return PurePosixPath(*parts)


def path_is(test: Callable[[Path], bool], path: Path) -> bool:
    """``test(path)`` (``Path.is_file``, ``Path.is_dir``), where a path the file system cannot hold
    (a name too long once its suffix is added, a path past the length limit) is simply not there
    rather than an ``OSError``."""
    try:
        return test(path)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
        return False


class ModelFolder:
    """A folder of weight files addressed by name (e.g. the LoRA folder).

    ``resolve("style/ink")`` finds ``<root>/style/ink.safetensors``; a bare name such as
    ``"ink"`` is also looked up by file stem anywhere below the root, as A1111 does with
    its sub-folders. Every candidate's real path (symlinks resolved) must lie inside the
    root's real path. ``name_example`` shows how a name is written where users give one
    (``<lora:my_style:0.8>``); refusals quote it.
    """

    def __init__(self, root: Path | str, kind: str, *, allow_pickle: bool = False, name_example: str | None = None) -> None:
        if not isinstance(allow_pickle, bool):  # the string "no" is truthy and must never mean yes
            raise InvalidParameter("allow_pickle", allow_pickle, "must be True or False")
        self.root = Path(root).expanduser()
        self.kind = kind
        self.allow_pickle = allow_pickle
        self.name_example = name_example

    @property
    def suffixes(self) -> tuple[str, ...]:
        return SAFE_SUFFIXES + (PICKLE_SUFFIXES if self.allow_pickle else ())

    def _contained(self, path: Path) -> bool:
        return is_inside(path, self.root)

    def files(self) -> list[NamedFile]:
        """Every usable file below the root (symlinks that lead outside are skipped), safetensors first."""
        if not path_is(Path.is_dir, self.root):
            return []
        found: dict[str, NamedFile] = {}
        all_suffixes = SAFE_SUFFIXES + PICKLE_SUFFIXES
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                suffix = path.suffix.lower()
                if suffix not in all_suffixes or not path.is_file() or not self._contained(path):
                    continue
                name = path.relative_to(self.root).with_suffix("").as_posix()
                previous = found.get(name)
                # For one name, a safetensors file wins over a pickle; among pickles the first one found.
                if previous is None or (previous.is_pickle and suffix in SAFE_SUFFIXES):
                    found[name] = NamedFile(name, path)
        return sorted(found.values(), key=lambda f: f.name.lower())

    def names(self) -> list[str]:
        return [f.name for f in self.files()]

    def resolve(self, name: str) -> NamedFile:
        """The file a name refers to. Raises :class:`NameOutsideFolder`, :class:`UnsafeFileError` or
        :class:`aipaint.errors.UnknownName`."""
        relative = check_name(self.kind, name, self.root, self.name_example)
        base = self.root / relative
        stem_candidates: list[Path] = []
        if relative.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES:
            stem_candidates.append(base)
        else:
            stem_candidates.extend(base.with_name(base.name + s) for s in self.suffixes)
        pickle_seen: Path | None = None
        for candidate in stem_candidates:
            if not path_is(Path.is_file, candidate):
                continue
            if not self._contained(candidate):
                raise NameOutsideFolder(self.kind, name, self.root, "it is a link to a file outside the folder", self.name_example)
            if candidate.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
                pickle_seen = candidate
                continue
            return NamedFile(relative.with_suffix("").as_posix() if candidate == base else relative.as_posix(), candidate)
        if len(relative.parts) == 1:
            matches = [f for f in self.files() if PurePosixPath(f.name).name == relative.name]
            usable = [f for f in matches if self.allow_pickle or not f.is_pickle]
            if len(usable) == 1:
                return usable[0]
            if len(usable) > 1:
                raise InvalidParameter(
                    self.kind, name, "is ambiguous: " + ", ".join(f.name for f in usable),
                    "write the sub-folder too, e.g. " + usable[0].name,
                )
            if matches:
                pickle_seen = matches[0].path
        if pickle_seen is not None:
            raise UnsafeFileError(
                f"{self.kind} {name!r} is only available as {pickle_seen.name}, a Python pickle that can run code "
                "when loaded; convert it to .safetensors, or pass --allow-pickle (allow_pickle=True) if you trust it"
            )
        available = self.names()
        if not available:
            raise InvalidParameter(
                self.kind, name, f"was not found: the folder {self.root} holds no {self.kind} files",
                "put .safetensors files there or point the folder elsewhere",
            )
        raise UnknownName(self.kind, name, available[:50])


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a diffusers model folder (a folder with a ``config.json``)."""
    return path.is_dir() and (path / "config.json").is_file()


def model_entries(root: Path) -> dict[str, Path]:
    """Every model below ``root`` by name (relative path, no suffix): weight files and diffusers
    model folders (whose own files are not models). For one name a safetensors file wins over a
    pickle; entries whose real path leads out of ``root`` are skipped."""
    found: dict[str, Path] = {}
    if not path_is(Path.is_dir, root):
        return found
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        dirnames.sort()
        for sub in list(dirnames):
            if is_model_folder(here / sub) and is_inside(here / sub, root):
                found.setdefault((here / sub).relative_to(root).as_posix(), here / sub)
                dirnames.remove(sub)
        for filename in sorted(filenames):
            path = here / filename
            suffix = path.suffix.lower()
            if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES or not is_inside(path, root):
                continue
            name = path.relative_to(root).with_suffix("").as_posix()
            if name not in found or (found[name].suffix.lower() in PICKLE_SUFFIXES and suffix in SAFE_SUFFIXES):
                found[name] = path
    return found


def controlnet_dir() -> Path:
    """``$AIPAINT_CONTROLNET_DIR``, else ``$AIPAINT_HOME/controlnet``: the ControlNet adapter reads
    its models there, and post-processors look there for an installed ControlNet."""
    return default_folder("AIPAINT_CONTROLNET_DIR", "controlnet")
