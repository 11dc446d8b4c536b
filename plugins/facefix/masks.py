"""Masks for face fix: dilated boxes, feathering that stays inside the mask, and pasting.

The promise of face fix is that pixels outside the faces' masks are unchanged, so the
feathered edge fades *inward* from the mask's border (a distance transform), never
outward as a Gaussian blur would.
"""

from __future__ import annotations

import numpy as np

from aipaint.errors import InvalidParameter


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int], dilation: int) -> np.ndarray:
    """A boolean (height, width) mask of ``box`` grown by ``dilation`` px (shrunk if negative)."""
    width, height = size
    x0, y0, x1, y1 = box
    x0, y0 = max(0, x0 - dilation), max(0, y0 - dilation)
    x1, y1 = min(width, x1 + dilation), min(height, y1 + dilation)
    mask = np.zeros((height, width), dtype=bool)
    if x1 > x0 and y1 > y0:
        mask[y0:y1, x0:x1] = True
    return mask


def feather(mask: np.ndarray, width: int) -> np.ndarray:
    """Alpha in [0, 1]: 1 deep inside ``mask``, ramping to 0 at its border, exactly 0 outside."""
    import cv2

    if width <= 0:
        return mask.astype(np.float32)
    # Edge padding: the image border is not "outside" (there is nothing there to blend with).
    padded = np.pad(mask.astype(np.uint8), 1, mode="edge")
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 3)[1:-1, 1:-1]
    return np.clip(distance / float(width), 0.0, 1.0).astype(np.float32) * mask


def paste(base: np.ndarray, patch: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend ``patch`` over ``base`` (uint8 HWC) with ``alpha``; where alpha is 0 the base is kept bit for bit."""
    if base.shape != patch.shape or alpha.shape != base.shape[:2]:
        raise InvalidParameter("patch", patch.shape, f"must match the image {base.shape} and mask {alpha.shape}")
    a = alpha[..., None]
    mixed = np.clip(np.round(base.astype(np.float32) * (1 - a) + patch.astype(np.float32) * a), 0, 255).astype(np.uint8)
    return np.where(a > 0, mixed, base)


def crop_region(mask_box: tuple[int, int, int, int], size: tuple[int, int], padding: int, aspect: float) -> tuple[int, int, int, int]:
    """The region to redraw: the mask's box plus ``padding``, widened to ``aspect`` (w/h), inside the image."""
    width, height = size
    x0, y0, x1, y1 = mask_box
    x0, y0, x1, y1 = x0 - padding, y0 - padding, x1 + padding, y1 + padding
    w, h = x1 - x0, y1 - y0
    if w / h < aspect:
        grow = int(round(h * aspect)) - w
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = int(round(w / aspect)) - h
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    # Slide back inside the image, then clip what still sticks out.
    for lo, hi, limit in ((0, 2, width), (1, 3, height)):
        box = [x0, y0, x1, y1]
        if box[lo] < 0:
            box[hi] -= box[lo]
            box[lo] = 0
        if box[hi] > limit:
            box[lo] -= box[hi] - limit
            box[hi] = limit
        box[lo] = max(0, box[lo])
        x0, y0, x1, y1 = box
    return x0, y0, x1, y1


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
