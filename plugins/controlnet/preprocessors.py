"""The built-in ControlNet preprocessors: real image-processing algorithms, no weights.

Each turns an RGB image (already at the generation's size) into the map a ControlNet
of that kind was trained on. Edge-like maps follow the ControlNet convention: white
lines on a black background.

* ``canny``    — OpenCV's Canny edge detector on the colour image (hysteresis thresholds).
* ``scribble`` — Canny edges of a lightly blurred image, dilated into thick, rounded strokes.
* ``lineart``  — dark-line detector: where the image is darker (in any channel) than its
  Gaussian-blurred surroundings, normalised, thresholded and cleaned of specks.
* ``invert``   — a black-on-white drawing to white-on-black.
* ``tile``     — down-sampled (and optionally blurred) copy of the image.
* ``qrcode``   — pass-through, after checking that the image is a two-tone code.
* ``inpaint``  — pass-through with the masked pixels marked unknown (transparent).
* ``none``     — pass-through (the image already is a control map).

Preprocessors that need weights (depth, pose, …) come from plugins through the
``register_preprocessors`` hook; see :mod:`aipaint.plugin.preprocess`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from aipaint.errors import ImageError
from aipaint.plugin.preprocess import PreprocessorParam, PreprocessorSpec

if TYPE_CHECKING:
    from PIL import Image


def _rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _from_gray(gray: np.ndarray) -> Image.Image:
    from PIL import Image

    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2).astype(np.uint8), "RGB")


def _auto(value: float, image: Image.Image, per_pixel: float, minimum: float) -> float:
    """A size-dependent default: ``value`` when set (> 0), else ``per_pixel`` × the shorter side."""
    return value if value > 0 else max(minimum, per_pixel * min(image.size))


def canny(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    """Canny edges. On the colour image, so an object that differs from its background
    only in hue (cyan on gray) still has edges, as A1111 does."""
    import cv2

    edges = cv2.Canny(_rgb_array(image), params["low_threshold"], params["high_threshold"])
    return _from_gray(edges)


def scribble(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    """Thick strokes along the image's main contours, like a quick hand-drawn scribble.

    Blur first so that texture does not become strokes; Canny finds the contours;
    dilating with a disc makes each a stroke ``stroke_width`` pixels wide (auto: about
    1/96 of the shorter side, at least 2 px).
    """
    import cv2

    width = int(round(_auto(params["stroke_width"], image, 1 / 96, 2)))
    sigma = max(0.5, min(image.size) / 256)
    blurred = cv2.GaussianBlur(_rgb_array(image), (0, 0), sigma)
    edges = cv2.Canny(blurred, params["low_threshold"], 2 * params["low_threshold"])
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (width, width))
    strokes = cv2.dilate(edges, kernel) if width > 1 else edges
    return _from_gray(strokes)


def lineart(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    """Line art from a difference of Gaussians, the algorithm of A1111's ``lineart_standard``.

    A line is where the image is darker than its blurred surroundings; taking the largest
    difference over the colour channels keeps edges between colours of equal brightness.
    The response is normalised by its median strength (so contrast does not matter),
    weak responses are dropped and connected specks smaller than a few pixels removed.
    """
    import cv2

    x = _rgb_array(image).astype(np.float32)
    sigma = _auto(params["sigma"], image, 6 / 512, 0.8)
    blurred = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = np.clip(blurred - x, 0, 255).max(axis=2)
    strong = intensity[intensity > 8]
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    lines = np.clip(intensity / scale * 127, 0, 255)
    lines[lines < params["threshold"]] = 0
    # Clean: drop connected specks smaller than ~1/1000 of the image (at least 2 px).
    binary = (lines > 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    min_area = max(2, int(image.size[0] * image.size[1] / 1000))
    small = np.isin(labels, [i for i in range(1, count) if stats[i, cv2.CC_STAT_AREA] < min_area])
    lines[small] = 0
    return _from_gray(lines.round())


def invert(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    """A drawing in black on white becomes white on black, the way line ControlNets read it."""
    from PIL import Image

    return Image.fromarray(255 - _rgb_array(image), "RGB")


def tile(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    """The image with detail removed: down-sampled by ``down_sampling_rate`` (area average),
    scaled back with a bicubic filter, then optionally blurred. A tile ControlNet adds the
    detail back while keeping colours and layout."""
    import cv2
    from PIL import Image

    x = _rgb_array(image)
    height, width = x.shape[:2]
    rate = params["down_sampling_rate"]
    if rate > 1:
        small = cv2.resize(x, (max(1, round(width / rate)), max(1, round(height / rate))), interpolation=cv2.INTER_AREA)
        x = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)
    if params["blur_sigma"] > 0:
        x = cv2.GaussianBlur(x, (0, 0), params["blur_sigma"])
    return Image.fromarray(x, "RGB")


def qrcode(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    """Pass a QR code through unchanged, after checking it is one: dark and light modules
    only (≥ 90% of pixels near black or white, both present). A photo or a colour image
    passed by mistake would otherwise steer the image with nonsense."""
    gray = np.asarray(image.convert("L"), dtype=np.float32)
    dark, light = gray < 80, gray > 175
    two_tone = float((dark | light).mean())
    if two_tone < 0.9 or dark.mean() < 0.05 or light.mean() < 0.05:
        raise ImageError(
            f"the qrcode preprocessor expects a black-and-white code, but only {two_tone:.0%} of the image's pixels "
            f"are near black or white ({dark.mean():.0%} dark, {light.mean():.0%} light); make the code with a QR "
            "generator (e.g. `qrcode` or `segno`), or use preprocessor 'none' for other images"
        )
    return image.convert("RGB")


def inpaint(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    """The image with the area to repaint made transparent: ControlNet inpaint models read
    those pixels as unknown (-1) and fill them consistently with the rest."""
    from PIL import Image

    assert mask is not None  # PreprocessorSpec.apply checks needs_mask
    masked = np.asarray(mask, dtype=np.uint8) > 127
    if not masked.any():
        raise ImageError("the inpaint preprocessor's mask is empty: paint the area to repaint in white")
    alpha = np.where(masked, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([_rgb_array(image), alpha]), "RGBA")


def none(image: Image.Image, params: dict[str, float], mask: Image.Image | None = None) -> Image.Image:
    return image.convert("RGB")


THRESHOLD = (1.0, 255.0)


def builtin_preprocessors() -> list[PreprocessorSpec]:
    return [
        PreprocessorSpec("none", none, description="the image is already a control map"),
        PreprocessorSpec(
            "canny",
            canny,
            params=(
                PreprocessorParam("low_threshold", 100.0, *THRESHOLD, "Canny hysteresis: weaker edges are dropped"),
                PreprocessorParam("high_threshold", 200.0, *THRESHOLD, "Canny hysteresis: stronger edges start a line"),
            ),
            description="Canny edges (OpenCV), white on black",
        ),
        PreprocessorSpec(
            "scribble",
            scribble,
            params=(
                PreprocessorParam("stroke_width", 0.0, 0.0, 64.0, "stroke width in pixels (0: 1/96 of the shorter side)"),
                PreprocessorParam("low_threshold", 50.0, *THRESHOLD, "edge threshold (the high one is twice this)"),
            ),
            description="thick strokes along the main contours, white on black",
        ),
        PreprocessorSpec(
            "lineart",
            lineart,
            params=(
                PreprocessorParam("sigma", 0.0, 0.0, 32.0, "Gaussian sigma in pixels (0: 6/512 of the shorter side)"),
                PreprocessorParam("threshold", 16.0, 0.0, 255.0, "line strength below which a pixel is cleared"),
            ),
            aliases=("lineart_standard",),
            description="dark lines (difference of Gaussians), cleaned, white on black",
        ),
        PreprocessorSpec("invert", invert, aliases=("invert (from white bg & black line)",), description="255 - image"),
        PreprocessorSpec(
            "tile",
            tile,
            params=(
                PreprocessorParam("down_sampling_rate", 1.0, 1.0, 8.0, "how much detail to remove"),
                PreprocessorParam("blur_sigma", 0.0, 0.0, 16.0, "Gaussian blur after resampling, in pixels"),
            ),
            aliases=("tile_resample",),
            description="down-sampled, optionally blurred copy of the image",
        ),
        PreprocessorSpec("qrcode", qrcode, aliases=("qr",), description="a black-and-white code, checked, passed through"),
        PreprocessorSpec(
            "inpaint",
            inpaint,
            needs_mask=True,
            aliases=("inpaint_only", "inpaint_global_harmonious"),
            description="the image with the masked area marked unknown",
        ),
    ]
