"""The result of a generation: images, the seeds used, A1111 parameters, timings.

Saving never follows a planted link and, unless asked to, never replaces a file: each PNG
is written to a new file of an unpredictable name in the target folder (created with
``O_EXCL``), then moved into place with ``os.replace`` (``overwrite=True``) or hard-linked
to its name, which fails instead of replacing a file that appeared in the meantime.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from aipaint.errors import InvalidParameter

DEFAULT_OUTPUT = "aipaint.png"


def batch_paths(path: str | Path, count: int) -> list[Path]:
    """Where ``count`` images go: ``out.png`` for one; ``out-0.png``, ``out-1.png``, … for a batch."""
    path = Path(path)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}") for i in range(count)]


def check_writable(path: str | Path, *, overwrite: bool = False) -> None:
    """Raise :class:`InvalidParameter` when a PNG cannot be saved at ``path``: it is a folder,
    it exists (without ``overwrite``), it lies under a file, or its folder is not writable.
    Cheap, so commands call it before the work whose result would be lost."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InvalidParameter("output", str(path), "is a folder", f"give a file name, e.g. {path / 'image.png'}")
        if os.path.lexists(path) and not overwrite:
            raise InvalidParameter("output", str(path), "exists already",
                                   "replace it with --overwrite or overwrite=True, or choose another name")
        folder = path.parent
        while not os.path.lexists(folder):  # the folders save_png would create: try the first that exists
            folder = folder.parent
        if not folder.is_dir():
            raise InvalidParameter("output", str(path), f"cannot be written: {folder} is a file, not a folder")
        probe = folder / f".aipaint-write-test.{secrets.token_hex(8)}"
        os.close(_new_file(probe))
        os.unlink(probe)
    except OSError as exc:
        raise InvalidParameter("output", str(path), f"cannot be written: {exc.strerror or exc}") from exc


def output_path(output: str | Path | None, count: int, *, overwrite: bool = False, default: str = DEFAULT_OUTPUT) -> Path:
    """The path to save ``count`` images at (as :func:`batch_paths` names them), checked now.

    ``output`` is the user's choice, refused when a file is in the way and ``overwrite`` is
    False; without one, ``default`` is used, or ``stem-1``, ``stem-2``, … : the first whose
    files are all new, so an earlier image is never replaced (A1111 never does either).
    """
    if output is not None:
        for path in batch_paths(output, count):
            check_writable(path, overwrite=overwrite)
        return Path(output)
    base, number = Path(default), 0
    while True:
        candidate = base if number == 0 else base.with_name(f"{base.stem}-{number}{base.suffix}")
        paths = batch_paths(candidate, count)
        if not any(os.path.lexists(path) for path in paths):
            for path in paths:
                check_writable(path)
            return candidate
        number += 1


def _new_file(path: Path) -> int:
    """A file descriptor of a newly created file: ``O_EXCL`` never opens a file, or a link, that is already there."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)


def save_png(image: Image.Image, path: str | Path, parameters: str | None, *, overwrite: bool = True) -> Path:
    """Write ``image`` as PNG with A1111's ``parameters`` text chunk, atomically (see the module doc).

    Without ``overwrite``, an existing ``path`` is an :class:`InvalidParameter`, also one that
    appears while the PNG is being written.
    """
    path = Path(path)
    check_writable(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with os.fdopen(_new_file(tmp), "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                _link_without_replacing(tmp, path)
            except FileExistsError as exc:
                raise InvalidParameter("output", str(path), "appeared while aipaint was writing it, and was not replaced",
                                       "replace it with --overwrite or overwrite=True, or choose another name") from exc
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def _link_without_replacing(tmp: Path, path: Path) -> None:
    """Give ``tmp``'s content the name ``path`` unless that exists (then FileExistsError)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links (FAT, some network shares): copy into a new file instead
        fd = _new_file(path)
        try:
            with os.fdopen(fd, "wb") as target, open(tmp, "rb") as source:
                shutil.copyfileobj(source, target)
        except BaseException:
            os.unlink(path)
            raise


@dataclass(frozen=True)
class Result:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: Any
    timings: dict[str, float] = field(default_factory=dict)
    # The final latents (N × C × h × w) before decoding, where the model has them: what a
    # second pass (hires fix) continues from without a VAE round trip.
    latents: Any = field(default=None, repr=False, compare=False)
    # The PNG parameters that adapters, the family and the mode added to the core ones
    # (e.g. "Lora hashes", "Denoising strength"), as one mapping for all images.
    added_parameters: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def parameters(self) -> str:
        return self.infotexts[0]

    def save(self, path: str | Path, index: int = 0, *, overwrite: bool = True) -> Path:
        """Save image ``index`` with its parameters chunk."""
        return save_png(self.images[index], path, self.infotexts[index], overwrite=overwrite)

    def save_all(self, path: str | Path, *, overwrite: bool = True) -> list[Path]:
        """Save every image; with a batch, ``out.png`` becomes ``out-0.png``, ``out-1.png``, …
        (:func:`batch_paths`). Without ``overwrite`` nothing is written when any of them exists."""
        paths = batch_paths(path, len(self.images))
        for target in paths:
            check_writable(target, overwrite=overwrite)
        return [self.save(target, index, overwrite=overwrite) for index, target in enumerate(paths)]
