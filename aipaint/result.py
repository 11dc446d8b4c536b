"""The result of a generation: images, the seeds used, A1111 parameters, timings."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def save_png(image: Image.Image, path: str | Path, parameters: str | None) -> Path:
    """Write ``image`` as PNG with A1111's ``parameters`` text chunk, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Result:
    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: Any
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def parameters(self) -> str:
        return self.infotexts[0]

    def save(self, path: str | Path, index: int = 0) -> Path:
        """Save image ``index`` with its parameters chunk."""
        return save_png(self.images[index], path, self.infotexts[index])

    def save_all(self, path: str | Path) -> list[Path]:
        """Save every image; with a batch, ``out.png`` becomes ``out-0.png``, ``out-1.png``, …"""
        path = Path(path)
        if len(self.images) == 1:
            return [self.save(path)]
        return [self.save(path.with_name(f"{path.stem}-{i}{path.suffix or '.png'}"), i) for i in range(len(self.images))]
