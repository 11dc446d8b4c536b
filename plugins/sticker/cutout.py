"""Cut a subject out of its background and make a sticker: transparent PNG with an outline.

Cut-out methods (offline, no weights):

* ``floodfill`` (default): the background colour is the median of the image border;
  everything connected to the border within ``tolerance`` of that colour (Euclidean
  distance in RGB, 0–255 units) is background. Holes inside the subject stay opaque.
* ``grabcut``: OpenCV's GrabCut, seeded with a rectangle ``margin`` px inside the image,
  for subjects on busy backgrounds.

A segmentation model can be used instead by passing ``method=callable`` where
``callable(image) -> bool mask (H, W)``, True on the subject.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from aipaint.errors import ImageError, InvalidParameter, UnknownName

if TYPE_CHECKING:
    from PIL import Image

CUTOUT_METHODS = ("floodfill", "grabcut")
MaskFn = Callable[["Image.Image"], np.ndarray]


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def border_colour(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def floodfill_mask(image: Image.Image, tolerance: float = 40.0) -> np.ndarray:
    """Subject mask: everything not reachable from the border through background-coloured pixels."""
    import cv2

    pixels = _rgb(image)
    distance = np.linalg.norm(pixels.astype(np.float32) - border_colour(pixels), axis=2)
    background_like = (distance <= tolerance).astype(np.uint8)
    # Connected components of background-coloured pixels; those touching the border are background.
    _, labels = cv2.connectedComponents(background_like, connectivity=4)
    touching = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, touching[touching != 0])  # label 0: pixels unlike the background
    return ~background


def grabcut_mask(image: Image.Image, margin: int | None = None, iterations: int = 5) -> np.ndarray:
    """Subject mask from GrabCut, starting from a rectangle ``margin`` px inside the borders."""
    import cv2

    pixels = _rgb(image)
    height, width = pixels.shape[:2]
    margin = max(1, min(width, height) // 20) if margin is None else margin
    if width <= 2 * margin + 1 or height <= 2 * margin + 1:
        raise InvalidParameter("margin", margin, f"leaves no subject rectangle in a {width}x{height} image")
    mask = np.zeros((height, width), np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    rect = (margin, margin, width - 2 * margin, height - 2 * margin)
    cv2.grabCut(cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), mask, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    return np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD))


def subject_mask(image: Image.Image, method: str | MaskFn = "floodfill", *, tolerance: float = 40.0,
                 keep_largest: bool = True) -> np.ndarray:
    """The subject's mask by ``method``, optionally only its largest connected part."""
    import cv2

    if callable(method):
        mask = np.asarray(method(image)).astype(bool)
        if mask.shape != (image.height, image.width):
            raise ImageError(f"the cut-out method returned a {mask.shape} mask for a {image.width}x{image.height} image")
    elif method == "floodfill":
        mask = floodfill_mask(image, tolerance)
    elif method == "grabcut":
        mask = grabcut_mask(image)
    else:
        raise UnknownName("cut-out method", str(method), list(CUTOUT_METHODS))
    if keep_largest and mask.any():
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        if count > 2:
            largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            mask = labels == largest
    if not mask.any():
        raise ImageError("no subject found: the whole picture looks like background; lower the tolerance or try method='grabcut'")
    if mask.all():
        raise ImageError("no background found: nothing around the subject matches the border colour; raise the tolerance "
                         "or try method='grabcut'")
    return mask


def parse_colour(value: Any) -> tuple[int, int, int]:
    """``"white"``, ``"#ff8800"``, ``"255,136,0"`` or a 3-tuple → RGB."""
    from PIL import ImageColor

    if isinstance(value, (tuple, list)) and len(value) == 3:
        rgb = tuple(int(v) for v in value)
    else:
        text = str(value).strip()
        try:
            if "," in text:
                rgb = tuple(int(v) for v in text.split(","))
            else:
                rgb = ImageColor.getrgb(text)[:3]
        except ValueError:
            raise InvalidParameter("outline_colour", value, "must be a colour name, #rrggbb, or r,g,b") from None
    if len(rgb) != 3 or any(not 0 <= v <= 255 for v in rgb):
        raise InvalidParameter("outline_colour", value, "must be a colour name, #rrggbb, or r,g,b with 0-255 values")
    return rgb  # type: ignore[return-value]


def make_sticker(
    image: Image.Image,
    *,
    method: str | MaskFn = "floodfill",
    tolerance: float = 40.0,
    outline_width: int = 8,
    outline_colour: Any = "white",
    keep_largest: bool = True,
    padding: int | None = None,
) -> tuple[Image.Image, np.ndarray]:
    """An RGBA sticker (and the subject mask on the padded canvas).

    The canvas grows by ``padding`` px (default: the outline width + 2) on every side so
    the outline is never clipped. Alpha is 255 on the subject and its outline, 0 elsewhere;
    the outline's outer edge is antialiased over one pixel.
    """
    import cv2
    from PIL import Image

    if isinstance(outline_width, bool) or not isinstance(outline_width, int) or not 0 <= outline_width <= 512:
        raise InvalidParameter("outline_width", outline_width, "must be a whole number of pixels from 0 to 512")
    if not 0 <= float(tolerance) <= 442:
        raise InvalidParameter("tolerance", tolerance, "must be from 0 to 442 (RGB distance)")
    colour = np.array(parse_colour(outline_colour), dtype=np.float32)
    rgb = image.convert("RGB")
    mask = subject_mask(rgb, method, tolerance=float(tolerance), keep_largest=keep_largest)
    pad = outline_width + 2 if padding is None else int(padding)
    pixels = np.pad(np.asarray(rgb, dtype=np.float32), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    mask = np.pad(mask, pad)
    # Distance from every pixel to the subject: the outline is the band within outline_width.
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    outline_alpha = np.clip(outline_width + 0.5 - distance, 0.0, 1.0) if outline_width else np.zeros_like(distance)
    outline_alpha[mask] = 1.0
    out = np.where(mask[..., None], pixels, colour)
    alpha = np.where(mask, 255.0, np.round(outline_alpha * 255))
    rgba = np.dstack([out, alpha]).astype(np.uint8)
    return Image.fromarray(rgba, "RGBA"), mask
