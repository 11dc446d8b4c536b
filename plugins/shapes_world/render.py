"""Render a :class:`~aipaint_plugins.shapes_world.scene.Scene` to a 32×32 antialiased RGB image.

Shapes are drawn with PIL at 4× (128 px) and box-filtered down, so edges are
antialiased like a camera would see them.
"""
from __future__ import annotations

import numpy as np
from aipaint_plugins.shapes_world.scene import BACKGROUNDS, COLOURS, IMAGE_SIZE, Scene
from PIL import Image, ImageDraw

SUPERSAMPLE = 4
CROSS_THICKNESS = 0.36  # arm thickness as a fraction of the extent


def shape_polygons(shape: str, cx: float, cy: float, s: float) -> list[list[tuple[float, float]]]:
    """Polygons (in the given coordinate frame) making up a shape; circles are
    returned as a bounding box with a single 2-point list."""
    h = s / 2.0
    if shape == "circle":
        return [[(cx - h, cy - h), (cx + h, cy + h)]]
    if shape == "square":
        return [[(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "triangle":
        return [[(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]]
    if shape == "cross":
        t = s * CROSS_THICKNESS / 2.0
        return [
            [(cx - h, cy - t), (cx + h, cy - t), (cx + h, cy + t), (cx - h, cy + t)],
            [(cx - t, cy - h), (cx + t, cy - h), (cx + t, cy + h), (cx - t, cy + h)],
        ]
    raise ValueError(f"unknown shape {shape!r}")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, fill, scale: float) -> None:
    # pixel centres of the 32×32 grid are at i + 0.5; PIL's are at integer coords
    polys = shape_polygons(shape, cx * scale, cy * scale, s * scale)
    if shape == "circle":
        (x0, y0), (x1, y1) = polys[0]
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
        return
    for p in polys:
        draw.polygon([(x, y) for x, y in p], fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """Render at ``size`` px (default 32). Geometry is defined at 32 px and scaled."""
    big = size * SUPERSAMPLE
    scale = big / IMAGE_SIZE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        draw_shape(d, o.shape, o.cx, o.cy, o.extent, COLOURS[o.colour], scale)
    return img.resize((size, size), Image.BOX)


def render_array(scene: Scene) -> np.ndarray:
    """uint8 HWC array at 32×32."""
    return np.asarray(render(scene), dtype=np.uint8)
