"""The upscalers a user can pick by name, as in A1111's "Upscaler" menus.

Three kinds:

* **latent** (``Latent``, ``Latent (bicubic)``, …): resize the latents themselves. They
  work only inside a diffusion pass (hires fix), where the upscaled latents are denoised
  again; on a bare image they are refused with a pointer to a pixel upscaler.
* **pixel** (``Lanczos``, ``Nearest``): plain resampling.
* **model** (every weights file in the upscaler folder, by its path there without the
  suffix): a super-resolution network loaded through spandrel, run in overlapping tiles.

The catalogue is built on demand (a fresh one per call, no process-wide state), from the
built-ins plus the folder's files, so new weights show up without a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aipaint.errors import InvalidParameter, UnknownName, UnsupportedFeature
from aipaint.plugin.kit.image_models import load_image_model, resolve_weights, upscaler_dir, weight_files
from aipaint.plugin.registry import Catalogue

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_TILE = 192
DEFAULT_OVERLAP = 16


@dataclass(frozen=True)
class UpscaleSettings:
    """How a pixel or model upscaler runs: tiling, device, and whether pickles may load."""

    tile: int = DEFAULT_TILE
    overlap: int | None = None  # default: 16 px, at most a quarter of the tile
    device: str = "cpu"
    allow_pickle: bool = False

    @property
    def tile_overlap(self) -> int:
        return min(DEFAULT_OVERLAP, self.tile // 4) if self.overlap is None else self.overlap


@dataclass(frozen=True)
class Upscaler:
    """One pickable upscaler. ``kind`` is ``"latent"``, ``"pixel"`` or ``"model"``."""

    name: str
    kind: str
    aliases: tuple[str, ...] = ()
    description: str = ""
    latent_mode: tuple[str, bool] | None = None  # (torch interpolate mode, antialias) for latent upscalers
    pixel_filter: str | None = None  # PIL resampling filter name for pixel upscalers
    path: Path | None = None  # weights, for model upscalers
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_latent(self) -> bool:
        return self.kind == "latent"

    def upscale_latents(self, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Resize NCHW latents to ``size`` = (height, width) in latent pixels."""
        import torch.nn.functional as F

        if self.latent_mode is None:
            raise UnsupportedFeature(f"upscaler {self.name!r} works on pixels, not latents")
        mode, antialias = self.latent_mode
        kwargs: dict[str, Any] = {"mode": mode}
        if mode in ("bilinear", "bicubic"):
            kwargs.update(align_corners=False, antialias=antialias)
        return F.interpolate(latents.float(), size=size, **kwargs).to(latents.dtype)

    def upscale(self, image: Image.Image, size: tuple[int, int], settings: UpscaleSettings | None = None) -> Image.Image:
        """Upscale a PIL image to exactly ``size`` = (width, height)."""
        from PIL import Image

        settings = settings or UpscaleSettings()
        if self.kind == "latent":
            raise UnsupportedFeature(
                f"{self.name!r} resizes latents and only works inside hires fix; to upscale an image "
                "pick a pixel or model upscaler, e.g. 'Lanczos' or a Real-ESRGAN weights file"
            )
        from aipaint.imageutil import check_pixels

        check_pixels("upscale size", *size)
        image = image.convert("RGB")
        if self.kind == "pixel":
            return image.resize(size, getattr(Image.Resampling, self.pixel_filter or "LANCZOS"))
        return self._upscale_with_model(image, size, settings)

    def _upscale_with_model(self, image: Image.Image, size: tuple[int, int], settings: UpscaleSettings) -> Image.Image:
        from aipaint_plugins.upscale.tiling import process_tiled
        from PIL import Image

        from aipaint.imageutil import check_pixels
        from aipaint.plugin.kit.image_models import pil_to_tensor, tensor_to_pil

        assert self.path is not None
        model = load_image_model(self.path, allow_pickle=settings.allow_pickle, device=settings.device)
        if model.purpose == "FaceSR":
            raise InvalidParameter("upscaler", self.name, f"is a face-restoration model ({model.architecture}), not an upscaler",
                                   "use it with face fix (--restorer)")
        # As A1111 does: run the model until the image is at least the target size, then
        # resample to the exact size. A 1x model (restoration) runs once.
        current = image
        while current.width < size[0] or current.height < size[1] or current is image:
            # A pass can overshoot the target by up to the model's scale (a 4x model asked for 1.1x).
            check_pixels(f"{self.name} output", current.width * model.scale, current.height * model.scale)
            tensor = pil_to_tensor(current).to(settings.device, model.descriptor.dtype)
            out = process_tiled(tensor, model, scale=model.scale, tile=settings.tile, overlap=settings.tile_overlap)
            current = tensor_to_pil(out)
            if model.scale == 1:
                break
        if current.size != size:
            current = current.resize(size, Image.Resampling.LANCZOS)
        return current


LATENT_UPSCALERS: tuple[tuple[str, str, bool, tuple[str, ...]], ...] = (
    ("Latent", "bilinear", False, ("latent-bilinear",)),
    ("Latent (antialiased)", "bilinear", True, ("latent-antialiased",)),
    ("Latent (bicubic)", "bicubic", False, ("latent-bicubic",)),
    ("Latent (bicubic antialiased)", "bicubic", True, ()),
    ("Latent (nearest)", "nearest", False, ("latent-nearest",)),
    ("Latent (nearest-exact)", "nearest-exact", False, ()),
)


def builtin_upscalers() -> list[Upscaler]:
    items = [
        Upscaler(name, "latent", aliases, f"latents resized with {mode}{' (antialiased)' if aa else ''}", latent_mode=(mode, aa))
        for name, mode, aa, aliases in LATENT_UPSCALERS
    ]
    items.append(Upscaler("Lanczos", "pixel", ("lanczos4",), "Lanczos resampling", pixel_filter="LANCZOS"))
    items.append(Upscaler("Nearest", "pixel", (), "nearest-neighbour resampling", pixel_filter="NEAREST"))
    items.append(Upscaler("Bicubic", "pixel", (), "bicubic resampling", pixel_filter="BICUBIC"))
    return items


def upscaler_catalogue(folder: Path | None = None, extra: tuple[Upscaler, ...] = ()) -> Catalogue[Upscaler]:
    """Built-in upscalers, then ``extra`` ones, then one model upscaler per weights file in ``folder``."""
    catalogue: Catalogue[Upscaler] = Catalogue("upscaler")
    for item in (*builtin_upscalers(), *extra):
        catalogue.add(item, "upscale")
    for name, path in weight_files(folder or upscaler_dir()).items():
        if name not in catalogue:
            catalogue.add(Upscaler(name, "model", (), f"model from {path.name}", path=path), "upscale")
    return catalogue


def get_upscaler(name: str | Upscaler | Path, folder: Path | None = None) -> Upscaler:
    """An upscaler by name (case and spacing don't matter; a weights file in the upscaler
    folder, sub-folders included) or zoo id. A name never resolves outside the folder; a
    :class:`~pathlib.Path` is an explicit weights file."""
    if isinstance(name, Upscaler):
        return name
    if isinstance(name, Path):
        path = resolve_weights(name)
        return Upscaler(path.stem, "model", (), f"model from {path.name}", path=path)
    text = str(name)
    catalogue = upscaler_catalogue(folder)
    if text in catalogue:
        return catalogue.get(text)
    try:
        path = resolve_weights(text, folder or upscaler_dir())
    except UnknownName as exc:
        raise UnknownName("upscaler", text, catalogue.names()) from exc
    return Upscaler(path.stem, "model", (), f"model from {path.name}", path=path)

