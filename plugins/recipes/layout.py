"""Type and layout for the recipes: real fonts, a cover's title placed where the subject is not,
and a labelled contact sheet.

Fonts: a TrueType file the user names, else the system's (``fc-match``, then DejaVu / Liberation
at their usual paths), else Pillow's own scalable font (``ImageFont.load_default(size=…)``).
Where the subject is: each pixel's colour distance from the picture's background (the median of
its border) plus its edge strength; the cover's text goes in the band (top, bottom, left or right)
where that is lowest, so the title avoids the subject.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from aipaint.errors import InvalidParameter

SYSTEM_FONTS = {
    "bold": ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf",
             "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf", "/Library/Fonts/Arial Bold.ttf",
             "C:/Windows/Fonts/arialbd.ttf"),
    "regular": ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf", "/Library/Fonts/Arial.ttf",
                "C:/Windows/Fonts/arial.ttf"),
}
BANDS = ("top", "bottom", "left", "right")

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=8)
def system_font(weight: str = "bold") -> str | None:
    """A TrueType file on this machine for ``weight`` (``bold`` or ``regular``), or None."""
    if shutil.which("fc-match"):
        pattern = "sans:bold" if weight == "bold" else "sans"
        try:
            found = subprocess.run(["fc-match", "-f", "%{file}", pattern], capture_output=True, text=True,
                                   timeout=10, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            found = ""
        if found.lower().endswith((".ttf", ".otf")) and Path(found).is_file():
            return found
    return next((path for path in SYSTEM_FONTS[weight] if Path(path).is_file()), None)


def load_font(size: int, path: str | None = None, weight: str = "bold") -> tuple[Font, str]:
    """``(font, its name)`` at ``size`` px: ``path`` when given (an error when it cannot be read),
    else the system's, else Pillow's own."""
    if path:
        try:
            return ImageFont.truetype(path, size), Path(path).name
        except OSError as exc:
            raise InvalidParameter("font", path, f"is not a TrueType/OpenType font file that can be read ({exc})") from None
    found = system_font(weight)
    if found:
        return ImageFont.truetype(found, size), Path(found).name
    try:
        return ImageFont.load_default(size=size), "Pillow default"
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or without FreeType
        return ImageFont.load_default(), "Pillow bitmap"


def subject_map(image: Image.Image) -> np.ndarray:
    """How much each pixel looks like subject (0..1): distance from the border's median colour, plus edges."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - background, axis=2) / 441.7
    edges = np.asarray(image.convert("L").filter(ImageFilter.FIND_EDGES), dtype=np.float32) / 255.0
    return np.clip(distance + 0.5 * edges, 0.0, 1.0)


def band_box(band: str, size: tuple[int, int], fraction: float) -> tuple[int, int, int, int]:
    width, height = size
    if band == "top":
        return 0, 0, width, round(height * fraction)
    if band == "bottom":
        return 0, height - round(height * fraction), width, height
    if band == "left":
        return 0, 0, round(width * fraction), height
    return width - round(width * fraction), 0, width, height


def emptiest_band(image: Image.Image, fraction: float, bands: tuple[str, ...] = BANDS) -> tuple[str, dict[str, float]]:
    """The band (of ``fraction`` of the picture) with the least subject in it, and every band's score."""
    weights = subject_map(image)
    scores = {}
    for band in bands:
        left, top, right, bottom = band_box(band, image.size, fraction)
        scores[band] = float(weights[top:bottom, left:right].mean())
    return min(scores, key=scores.get), scores


def _wrap(text: str, font: Font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


@dataclass(frozen=True)
class Typeset:
    """A cover with its text: the picture, the band the text went in, the box it fills, the font."""

    image: Image.Image
    band: str
    box: tuple[int, int, int, int]
    font: str
    scores: dict[str, float]


def typeset_cover(image: Image.Image, title: str, lines: list[str], *, font: str | None = None,
                  band: str = "auto", fraction: float = 0.4, colour: str = "auto") -> Typeset:
    """``image`` with ``title`` (bold, as large as fits) and ``lines`` (regular) set in the band
    where the subject is not (``band="auto"``) or the band named; the text colour is black or
    white, whichever stands out more against that band, with a soft shadow."""
    if band != "auto" and band not in BANDS:
        raise InvalidParameter("band", band, f"must be auto or one of {', '.join(BANDS)}")
    chosen, scores = emptiest_band(image, fraction) if band == "auto" else (band, {})
    box = band_box(chosen, image.size, fraction)
    pad = max(2, round(min(image.size) * 0.03))
    inner = (box[0] + pad, box[1] + pad, box[2] - pad, box[3] - pad)
    width, height = inner[2] - inner[0], inner[3] - inner[1]
    if width < 8 or height < 8:
        raise InvalidParameter("fraction", fraction, "leaves no room for text on a picture this small",
                               "upscale the cover first (upscale=4) or use a larger fraction")
    region = np.asarray(image.convert("L").crop(box), dtype=np.float32)
    if colour == "auto":
        ink = (0, 0, 0) if region.mean() > 140 else (255, 255, 255)
    else:
        from PIL import ImageColor

        try:
            ink = ImageColor.getrgb(colour)[:3]
        except ValueError:
            raise InvalidParameter("colour", colour, "must be auto, a colour name or #rrggbb") from None
    shadow = tuple(255 - c for c in ink)
    # The largest title size whose wrapped lines, with the other lines below, fit the band.
    size = max(6, height // 2)
    while True:
        title_font, font_name = load_font(size, font, "bold")
        body_font, _ = load_font(max(5, size * 2 // 5), font, "regular")
        title_lines = _wrap(title, title_font, width) if title else []
        body_lines = [wrapped for line in lines for wrapped in _wrap(line, body_font, width)]
        line_gap = max(1, size // 8)
        needed = (len(title_lines) * (size + line_gap) + len(body_lines) * (body_font.size + line_gap)
                  if hasattr(body_font, "size") else 0)
        widest = max([title_font.getlength(t) for t in title_lines] + [body_font.getlength(t) for t in body_lines] + [0])
        if (needed <= height and widest <= width) or size <= 6:
            break
        size = max(6, int(size * 0.9))
    out = image.convert("RGB").copy()
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    y = inner[1] + max(0, (height - needed) // 2)
    text_box = [inner[2], y, inner[0], y]
    offset = max(1, size // 20)
    for text, face in [(t, title_font) for t in title_lines] + [(t, body_font) for t in body_lines]:
        length = face.getlength(text)
        x = inner[0] + (width - length) / 2
        draw.text((x + offset, y + offset), text, font=face, fill=(*shadow, 110))
        draw.text((x, y), text, font=face, fill=(*ink, 255))
        step = (face.size if hasattr(face, "size") else 10) + line_gap
        text_box = [min(text_box[0], int(x)), text_box[1], max(text_box[2], int(x + length) + offset), y + step]
        y += step
    out = Image.alpha_composite(out.convert("RGBA"), layer).convert("RGB")
    return Typeset(out, chosen, tuple(text_box), font_name, scores)


def contact_sheet(images: list[Image.Image], labels: list[str], *, title: str = "",
                  swatches: list[tuple[int, int, int]] | None = None, columns: int = 0,
                  cell: int = 256) -> Image.Image:
    """The pictures side by side (each scaled to fit ``cell`` px), each labelled below, with an
    optional title and a strip of colour swatches (a brand's palette) on top."""
    count = len(images)
    columns = columns or min(count, 4)
    rows = -(-count // columns)
    label_font, _ = load_font(max(10, cell // 14), None, "regular")
    title_font, _ = load_font(max(12, cell // 9), None, "bold")
    label_h = label_font.size + 8 if hasattr(label_font, "size") else 18
    head = (title_font.size + 16 if title and hasattr(title_font, "size") else 0) + (cell // 6 if swatches else 0)
    gap = 8
    sheet = Image.new("RGB", (columns * (cell + gap) + gap, head + rows * (cell + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    y = gap
    if title:
        draw.text((gap, y), title, font=title_font, fill=(20, 20, 20))
        y += title_font.size + 8 if hasattr(title_font, "size") else 20
    if swatches:
        side = cell // 6 - 8
        for i, colour in enumerate(swatches):
            draw.rectangle((gap + i * (side + 4), y, gap + i * (side + 4) + side, y + side), fill=tuple(colour),
                           outline=(120, 120, 120))
    for index, (picture, label) in enumerate(zip(images, labels)):
        row, column = divmod(index, columns)
        scaled = picture.convert("RGBA")
        factor = cell / max(scaled.size)
        scaled = scaled.resize((max(1, round(scaled.width * factor)), max(1, round(scaled.height * factor))),
                               Image.Resampling.NEAREST if factor >= 2 else Image.Resampling.LANCZOS)
        left = gap + column * (cell + gap) + (cell - scaled.width) // 2
        top = head + gap + row * (cell + label_h + gap) + (cell - scaled.height) // 2
        sheet.paste(scaled, (left, top), scaled)
        text = label if label_font.getlength(label) <= cell else label[: max(1, int(len(label) * cell / label_font.getlength(label)) - 1)] + "…"
        draw.text((gap + column * (cell + gap), head + gap + row * (cell + label_h + gap) + cell + 3), text,
                  font=label_font, fill=(40, 40, 40))
    return sheet


__all__ = ["BANDS", "Typeset", "band_box", "contact_sheet", "emptiest_band", "load_font", "subject_map",
           "system_font", "typeset_cover"]
