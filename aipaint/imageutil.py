"""Images and masks for the image-conditioned modes: loading, resizing, masks, compositing.

Pure PIL/numpy (no torch), so requests can validate their images cheaply.

Masks
-----
White means "repaint". Any input becomes a binary mask (0 or 255, mode ``L``):

* an image with an alpha channel that is not fully opaque (``RGBA``, ``LA``, ``PA``):
  its alpha is the mask, as in A1111's sketch masks;
* any other image: its luminance (``L`` conversion);
* a numpy array: ``bool`` as is; floats from 0 to 1 (or up to 255 when larger values
  occur); integers from 0 to 255; 2-D, or H×W×1/3/4 read like the images above.

A value counts as white when it is at least half way up (>= 128 of 255, >= 0.5 of 1).

Sizes
-----
Image files are read up to ``PIL.Image.MAX_IMAGE_PIXELS`` (about 89 MP; a larger one is
refused as a likely decompression bomb), and every image aipaint makes at a size a user
asks for is checked against :func:`max_pixels` (``$AIPAINT_MAX_PIXELS``, default
4096×4096) before any memory is allocated for it.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from aipaint.errors import ImageError, InvalidParameter

OUTPAINT_FILLS = ("edge", "blur", "noise")
"""How outpainting starts the new area: edge colours, blurred surroundings, or noise."""

BACKGROUND = (255, 255, 255)  # what transparent input pixels are flattened onto (A1111's default)
MAX_PIXELS_VARIABLE = "AIPAINT_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 4096 * 4096


def max_pixels() -> int:
    """The most pixels an image aipaint makes may have: ``$AIPAINT_MAX_PIXELS``, else 4096×4096."""
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise InvalidParameter(MAX_PIXELS_VARIABLE, text, "must be a whole number of pixels above 0",
                               f"e.g. {DEFAULT_MAX_PIXELS} for 4096x4096")
    return int(text)


def check_pixels(what: str, width: int, height: int) -> None:
    """Refuse, before anything is allocated, an image of ``width``×``height`` above :func:`max_pixels`."""
    limit = max_pixels()
    if width * height > limit:
        raise InvalidParameter(what, f"{width}x{height}", f"is {width * height:,} pixels, more than the limit of {limit:,}",
                               f"set {MAX_PIXELS_VARIABLE} to a larger pixel count to allow it, memory permitting")


def read_image_file(path: str | Path, what: str = "the image") -> Image.Image:
    """The decoded image in a file; any failure is an :class:`ImageError` naming the file.

    A file whose header claims more than ``PIL.Image.MAX_IMAGE_PIXELS`` is refused before
    it is decoded: a few kilobytes of PNG can otherwise claim gigabytes. PNG text chunks
    (A1111's ``parameters``) are kept in ``info``, also those stored after the pixels.
    """
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice that; both are refusals here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                copy = image.copy()
                copy.info.update(getattr(image, "text", None) or {})
                return copy
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"cannot read {what} {str(path)!r}: it has more than {Image.MAX_IMAGE_PIXELS:,} pixels, the most aipaint "
            "decodes from a file (a guard against decompression bombs)"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ImageError(f"cannot read {what} {str(path)!r}: {exc}") from exc


def _open(source: Any, what: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, Path)):
        return read_image_file(source, f"the {what}")
    if isinstance(source, np.ndarray):
        return _from_array(source, what)
    raise ImageError(f"the {what} must be a PIL image, a numpy array or a file path, not {type(source).__name__}")


def _from_array(array: np.ndarray, what: str) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)) or 0 in array.shape:
        raise ImageError(f"the {what} array has shape {array.shape}; expected H×W, H×W×3 or H×W×4")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        scale = 255.0 if float(np.nanmax(array)) <= 1.0 else 1.0
        array = np.clip(np.nan_to_num(array) * scale, 0, 255).round().astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        array = np.clip(array, 0, 255).astype(np.uint8)
    else:
        raise ImageError(f"the {what} array has dtype {array.dtype}; expected bool, integers or floats")
    return Image.fromarray(np.ascontiguousarray(array))  # H×W → L, H×W×3 → RGB, H×W×4 → RGBA


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def load_image(source: Any, what: str = "image") -> Image.Image:
    """An RGB image from a PIL image, numpy array or path; transparency is flattened onto white."""
    image = _open(source, what)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def load_mask(source: Any) -> Image.Image:
    """A binary ``L`` mask (255 = repaint) from any image mode or array (see the module doc)."""
    image = _open(source, "mask")
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        grey = alpha if alpha.getextrema() != (255, 255) else image.convert("L")
    else:
        grey = image.convert("L")
    return grey.point(lambda v: 255 if v >= 128 else 0)


def check_mask(mask: Image.Image, image_size: tuple[int, int]) -> None:
    """Raise :class:`ImageError` for a mask that does not fit the image or selects nothing."""
    if mask.size != image_size:
        raise ImageError(
            f"the mask is {mask.width}x{mask.height} but the image is {image_size[0]}x{image_size[1]}; "
            "resize the mask to the image's size"
        )
    if mask.getextrema()[1] == 0:
        raise ImageError(
            "the mask is empty (no white pixels), so there is nothing to repaint: paint the area to "
            "change white, or pass inpainting_mask_invert=True (--invert-mask) if it is the other way round"
        )


def invert_mask(mask: Image.Image) -> Image.Image:
    return ImageOps.invert(mask.convert("L"))


def blur_mask(mask: Image.Image, radius: int) -> Image.Image:
    """A1111's mask blur: a Gaussian of standard deviation ``radius`` (kernel 2·⌊2.5r+0.5⌋+1)."""
    if radius <= 0:
        return mask
    import cv2

    size = 2 * int(2.5 * radius + 0.5) + 1
    return Image.fromarray(cv2.GaussianBlur(np.array(mask.convert("L")), (size, size), radius))


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """Resize to ``width``×``height`` the way A1111 does for each resize mode.

    * ``just resize``: stretch (the aspect ratio may change);
    * ``crop and resize``: scale to cover, centre, crop the overflow;
    * ``resize and fill``: scale to fit, centre, fill the bands by stretching the edge rows/columns.

    The image is returned unchanged when it already has the size.
    """
    if image.size == (width, height):
        return image
    check_pixels("resized image", width, height)
    resample = Image.Resampling.LANCZOS
    if mode == "just resize":
        return image.resize((width, height), resample)
    ratio, src_ratio = width / height, image.width / image.height
    cover = mode == "crop and resize"
    if (ratio > src_ratio) == cover:
        src_w, src_h = width, image.height * width // image.width
    else:
        src_w, src_h = image.width * height // image.height, height
    check_pixels("resized image", src_w, src_h)  # covering a very long, thin image scales it far past the crop
    resized = image.resize((max(src_w, 1), max(src_h, 1)), resample)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if cover:
        return out
    if ratio < src_ratio:
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, band), box=(0, resized.height, width, resized.height)), (0, band + src_h))
    elif ratio > src_ratio:
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((band, height), box=(resized.width, 0, resized.width, height)), (band + src_w, 0))
    return out


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int]:
    """The box ``(x1, y1, x2, y2)`` around the mask's non-zero pixels, grown by ``padding``."""
    box = mask.getbbox()
    if box is None:
        raise ImageError("the mask is empty: there is no region to inpaint")
    x1, y1, x2, y2 = box
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, mask.width), min(y2 + padding, mask.height)


def expand_to_ratio(box: tuple[int, int, int, int], width: int, height: int, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Grow ``box`` to the aspect ratio ``width``/``height`` inside the image (A1111's expand_crop_region)."""
    x1, y1, x2, y2 = box
    limit_w, limit_h = image_size
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) * height / width - (y2 - y1)), limit_h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * width / height - (x2 - x1)), limit_w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    lo -= extra // 2
    hi += extra - extra // 2
    if hi > limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi = min(hi - lo, limit)
        lo = 0
    return lo, hi


def _gaussian(array: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur; wide ones run on a downscaled copy (a 256-pixel sigma would be slow)."""
    import cv2

    step = max(1, int(sigma // 4))
    if step == 1:
        return cv2.GaussianBlur(array, (0, 0), sigma)
    h, w = array.shape[:2]
    small = cv2.resize(array, (max(1, w // step), max(1, h // step)), interpolation=cv2.INTER_AREA)
    return cv2.resize(cv2.GaussianBlur(small, (0, 0), sigma / step), (w, h), interpolation=cv2.INTER_LINEAR)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Replace the masked area by blurred colours of its surroundings (A1111's "fill").

    Unmasked pixels are averaged with Gaussian weights of decreasing radius and layered
    coarse to fine, so the hole gets smooth colours from its border while every
    unmasked pixel keeps its value.
    """
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    known = 1.0 - np.asarray(mask.convert("L"), dtype=np.float32) / 255
    out = np.zeros_like(rgb)
    out_alpha = np.zeros(known.shape)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        if radius:
            alpha = _gaussian(known, radius)
            colour = _gaussian(rgb * known[..., None], radius) / np.maximum(alpha, 1e-8)[..., None]
        else:
            alpha, colour = known, rgb
        for _ in range(repeats):  # alpha-composite this layer over what is there
            total = alpha + out_alpha * (1 - alpha)
            out = (colour * alpha[..., None] + out * (out_alpha * (1 - alpha))[..., None]) / np.maximum(total, 1e-8)[..., None]
            out_alpha = total
    filled = np.clip(out * 255, 0, 255).round().astype(np.uint8)
    exact = known >= 1.0
    filled[exact] = np.asarray(image.convert("RGB"))[exact]
    return Image.fromarray(filled)


def composite(original: Image.Image, generated: Image.Image, mask: Image.Image) -> Image.Image:
    """``generated`` where ``mask`` is white, ``original`` where it is black, blended between.

    Integer arithmetic, so where the mask is 0 the result is bit-for-bit ``original``.
    """
    a = np.asarray(original.convert("RGB"), dtype=np.uint32)
    b = np.asarray(generated.convert("RGB"), dtype=np.uint32)
    m = np.asarray(mask.convert("L"), dtype=np.uint32)[..., None]
    return Image.fromarray(((a * (255 - m) + b * m + 127) // 255).astype(np.uint8))


def extend_canvas(image: Image.Image, left: int, top: int, right: int, bottom: int, fill: str, seed: int = 0) -> Image.Image:
    """The image on a larger canvas whose new area holds a starting guess for outpainting.

    ``edge`` repeats the nearest edge pixel, ``blur`` fills with blurred surrounding colours,
    ``noise`` uses random colours around the image's mean (seeded).
    """
    array = np.asarray(image.convert("RGB"))
    if fill == "edge":
        return Image.fromarray(np.pad(array, ((top, bottom), (left, right), (0, 0)), mode="edge"))
    canvas = Image.new("RGB", (image.width + left + right, image.height + top + bottom))
    canvas.paste(image, (left, top))
    if fill == "blur":
        return fill_masked(canvas, outpaint_mask(image.size, left, top, right, bottom))
    if fill == "noise":
        rng = np.random.default_rng(seed)
        noisy = np.clip(rng.normal(array.reshape(-1, 3).mean(0), 64.0, (canvas.height, canvas.width, 3)), 0, 255)
        noise_image = Image.fromarray(noisy.round().astype(np.uint8))
        noise_image.paste(image, (left, top))
        return noise_image
    raise InvalidParameter("fill", fill, "must be one of " + ", ".join(repr(f) for f in OUTPAINT_FILLS))


def outpaint_mask(size: tuple[int, int], left: int, top: int, right: int, bottom: int) -> Image.Image:
    """White over the new area of a canvas grown by the given margins, black over the original."""
    mask = Image.new("L", (size[0] + left + right, size[1] + top + bottom), 255)
    mask.paste(0, (left, top, left + size[0], top + size[1]))
    return mask


def feather_inside(mask: Image.Image, radius: int) -> Image.Image:
    """A soft version of a binary mask that is 0 on all its black pixels and ramps to 255 inside.

    Used to blend outpainted pixels over the starting fill: the original area stays
    exact while the seam fades over about ``radius`` pixels of the new area.
    """
    if radius <= 0:
        return mask
    blurred = np.asarray(blur_mask(mask, radius), dtype=np.int32)
    ramp = np.clip(2 * blurred - 255, 0, 255)
    ramp[np.asarray(mask) == 0] = 0
    return Image.fromarray(ramp.astype(np.uint8))
