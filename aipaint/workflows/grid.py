"""A labelled grid of images, as the A1111 X/Y/Z plot draws it: the column headers on top, the
row labels on the left, an optional title above (the Z value).

Each image is pasted unchanged (never resized) in the middle of its slot, so a cell cut out of
the grid at its box is the image itself. Labels use a real TrueType font: Pillow's own
(``ImageFont.load_default(size=…)``, Pillow 10.1 and later), else Pillow's small bitmap font.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from aipaint.imageutil import check_pixels

MAX_LABEL_CHARS = 200
"""A label longer than this is cut (with an ellipsis) so that the grid stays a grid."""

Box = tuple[int, int, int, int]


def label_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's TrueType font at ``size`` pixels, or its bitmap font where Pillow lacks FreeType or is older than 10.1."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 (no size), or built without FreeType
        return ImageFont.load_default()


@dataclass(frozen=True)
class Grid:
    """A drawn grid: the image, and the box of each cell's image (by row, then column)."""

    image: Image.Image
    boxes: list[list[Box]]


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 1] + "…"


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` (a word wider than that is broken)."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width or not line and font.getlength(word) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:  # a word too wide for a line of its own
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    if line or not lines:
        lines.append(line)
    return lines


def draw_grid(rows: Sequence[Sequence[Image.Image]], column_labels: Sequence[str] = (), row_labels: Sequence[str] = (),
              title: str | None = None, *, font_size: int | None = None) -> Grid:
    """The images of ``rows`` (each a list of columns) in a grid with ``column_labels`` on top,
    ``row_labels`` on the left and ``title`` above; empty label lists leave their band out.
    The font size follows A1111's (the cell's width plus height over 25), at least 12 pixels."""
    images = [image for row in rows for image in row]
    if not images:
        raise ValueError("a grid needs at least one image")
    cell_w = max(image.width for image in images)
    cell_h = max(image.height for image in images)
    size = font_size or min(72, max(12, (cell_w + cell_h) // 25))
    font = label_font(size)
    pad = max(2, size // 3)
    top, bottom = font.getbbox("Ag")[1], font.getbbox("Ág")[3]
    line_h = bottom - min(top, 0) + max(1, size // 6)
    columns = max(len(row) for row in rows)
    column_labels = [_cut(label) for label in column_labels]
    row_labels = [_cut(label) for label in row_labels]

    def widest_word(labels: Sequence[str]) -> int:
        return max((math.ceil(font.getlength(word)) for label in labels for word in label.split(" ")), default=0)

    slot_w = cell_w
    if column_labels:  # small cells get room for a short label on one line (up to 8 font sizes wide)
        natural = max(math.ceil(font.getlength(label)) for label in column_labels) + 2 * pad
        slot_w = max(cell_w, min(natural, 8 * size), widest_word(column_labels) + 2 * pad)
    header_lines = [_wrap(label, font, slot_w - 2 * pad) for label in column_labels]
    header_h = max(len(lines) for lines in header_lines) * line_h + 2 * pad if column_labels else 0
    if row_labels:
        natural = max(math.ceil(font.getlength(label)) for label in row_labels)
        label_w = max(min(natural, max(2 * slot_w, 12 * size)), widest_word(row_labels)) + 2 * pad
    else:
        label_w = 0
    label_lines = [_wrap(label, font, label_w - 2 * pad) for label in row_labels]
    slot_h = max([cell_h] + [len(lines) * line_h + 2 * pad for lines in label_lines])
    width = label_w + columns * slot_w
    title_lines = _wrap(_cut(title), font, max(width - 2 * pad, 1)) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title_lines else 0
    height = title_h + header_h + len(rows) * slot_h
    check_pixels("grid", width, height)

    alpha = any(image.mode in ("RGBA", "LA") or "transparency" in image.info for image in images)
    canvas = Image.new("RGBA" if alpha else "RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)

    def text_block(lines: list[str], left: int, upper: int, box_w: int, box_h: int) -> None:
        y = upper + (box_h - len(lines) * line_h) // 2 - min(top, 0)
        for line in lines:
            x = left + (box_w - math.ceil(font.getlength(line))) // 2
            draw.text((x, y), line, fill="black", font=font)
            y += line_h

    if title_lines:
        text_block(title_lines, 0, 0, width, title_h)
    for column, lines in enumerate(header_lines):
        text_block(lines, label_w + column * slot_w, title_h, slot_w, header_h)
    boxes: list[list[Box]] = []
    for r, row in enumerate(rows):
        upper = title_h + header_h + r * slot_h
        if r < len(label_lines):
            text_block(label_lines[r], 0, upper, label_w, slot_h)
        row_boxes = []
        for c, image in enumerate(row):
            left = label_w + c * slot_w + (slot_w - image.width) // 2
            cell_top = upper + (slot_h - image.height) // 2
            converted = image.convert(canvas.mode) if image.mode != canvas.mode else image
            canvas.paste(converted, (left, cell_top))
            row_boxes.append((left, cell_top, left + image.width, cell_top + image.height))
        boxes.append(row_boxes)
    return Grid(canvas, boxes)
